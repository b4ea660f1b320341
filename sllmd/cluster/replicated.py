"""The replicated state machine: LocalStateMachine's interface, with every write going through Raft.

- `propose(command)` returns apply's result once the command committed and applied on THIS node. The
  leader proposes it itself. A follower sends FORWARD {id, command} to the leader, which proposes it and,
  once applied there, answers FORWARD_RESULT {id, index, result | error | retry}; the follower then waits
  (within the same deadline) until it applied that index too, so a client reads its own writes back from
  the node it wrote through.
- Retries happen only where the write certainly did not happen: the forward could not be queued (no
  connection to the leader), the leader was no leader, or a new leader replaced the entry before it
  committed. Past `propose_timeout_s` it is Overloaded 503 (code no_leader). A write that timed out, or
  whose leader changed while it was in flight (code leader_changed), may still commit: re-read before
  repeating a non-idempotent write.
- Reads (`deployments`, `deployment`, `instances`, `nodes`) are local LMDB reads of what this node has
  applied: on a follower they may lag the leader by a round trip or so (stale, not linearizable).
- Instance records (SOFT_OPS: idempotent puts and deletes) are best effort, so that serving never waits
  on consensus: they are queued in order (MAX_SOFT_QUEUE at most; past that the oldest drop) and written
  one at a time, each retried until it commits (one the state machine rejects is logged). The worker
  queues them with `record_soon`, which returns at once. `propose` of one returns apply's result if it
  commits within SOFT_WAIT_S, else None (at once while no leader is known).
- `on_applied(command, result)` runs on the event loop for every command applied without error, on
  every node, and as (None, None) after a snapshot replaced the whole state. An awaitable it returns runs
  as a task; `propose` on this node returns only once such tasks are done, and close() awaits them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import inspect
import itertools
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from sllmd.cluster.curve import cluster_curve_keys
from sllmd.cluster.membership import Membership
from sllmd.cluster.proposals import ConfigChangeError, NotLeaderError, ProposalDropped, settle
from sllmd.cluster.shell import ClusterNode, Timing
from sllmd.cluster.transport import Message, PeerTransport
from sllmd.config import ClusterConfig, Config
from sllmd.errors import InvalidRequest, Overloaded, SllmdError, error_from_wire
from sllmd.raft.core import Role
from sllmd.raft.lmdb import LmdbStorage
from sllmd.scheduler.status import ClusterView, NodeStatus, PeerInfo
from sllmd.state.machine import (
    SOFT_OPS,
    LocalStateMachine,
    NodeRecord,
    Op,
    StoreStateMachine,
    result_from_wire,
    result_to_wire,
)
from sllmd.state.models import Deployment, InstanceRecord
from sllmd.state.store import StateStore

log = logging.getLogger(__name__)

SOFT_WAIT_S = 1.0  # longest `propose` of an instance record waits for its result
SOFT_RETRY_S = 0.5
MAX_SOFT_QUEUE = 1000  # instance-record writes queued while there is no leader; the oldest drop first
RETRY_WAIT_S = 0.1  # after a certainly-not-applied attempt, wait this long (or for a leader change)
LEADER_CHANGE_GRACE_S = 1.0  # a forward's reply may still come from a deposed leader for this long

AppliedCallback = Callable[[dict[str, Any] | None, Any], Awaitable[Any] | None]


class ForwardMessage(enum.StrEnum):
    FORWARD = "forward"
    FORWARD_RESULT = "forward_result"


class _NotSent(Exception):
    """The forward could not be queued for the leader: it certainly was not proposed."""


class ReplicatedStateMachine:
    """Not thread-safe: use from the event loop that started it."""

    def __init__(self, store: StateStore, cluster: ClusterNode, me: NodeRecord, *, seed: str | None,
                 propose_timeout_s: float, dead_node_timeout_s: float = 0.0, on_applied: AppliedCallback | None = None,
                 soft_state: Callable[[], NodeStatus] | None = None) -> None:
        """`on_applied`: see the module doc; `soft_state`: this node's status, sent to every node (None: none)."""
        self.store = store
        self.cluster = cluster
        self.node_id = me.id
        self.propose_timeout_s = propose_timeout_s
        self._reads = LocalStateMachine(store)
        self.membership = Membership(cluster, self._reads, me, seed=seed, propose=self._propose_strict,
                                     propose_timeout_s=propose_timeout_s, dead_node_timeout_s=dead_node_timeout_s,
                                     soft_state=soft_state)
        self.on_applied = on_applied
        self._forward_ids = itertools.count(1)
        self._forwards: dict[int, tuple[str, asyncio.Future[dict[str, Any]]]] = {}
        self._soft_queue: collections.deque[tuple[dict[str, Any], asyncio.Future[Any]]] = collections.deque()
        self._soft_wake = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()  # forwarded writes being served
        self._callbacks: set[asyncio.Task[Any]] = set()  # awaitables returned by on_applied
        self._soft_writer: asyncio.Task[None] | None = None
        cluster.add_handler(ForwardMessage.FORWARD, self._on_forward)
        cluster.add_handler(ForwardMessage.FORWARD_RESULT, self._on_forward_result)
        cluster.add_apply_listener(self._on_applied)

    @classmethod
    def open(cls, config: Config, store: StateStore, node_id: str, *, on_applied: AppliedCallback | None = None,
             soft_state: Callable[[], NodeStatus] | None = None) -> ReplicatedStateMachine:
        """From the node's config; binds nothing until start()."""
        server = config.server
        host = config.cluster.advertise_host or server.host
        if host in ("0.0.0.0", "::", ""):
            host = socket.gethostname()
        me = NodeRecord(node_id, host_port(host, server.peer_port), host_port(host, server.port))
        return cls.create(store, me, bind_host=server.host, peer_port=server.peer_port, seed=server.join or None,
                          cluster_config=config.cluster, on_applied=on_applied, soft_state=soft_state)

    @classmethod
    def create(cls, store: StateStore, me: NodeRecord, *, bind_host: str, peer_port: int, seed: str | None,
               cluster_config: ClusterConfig | None = None, on_applied: AppliedCallback | None = None,
               soft_state: Callable[[], NodeStatus] | None = None) -> ReplicatedStateMachine:
        settings = cluster_config or ClusterConfig()
        curve = cluster_curve_keys(settings.secret_key, settings.public_key, settings.public_keys)
        transport = PeerTransport(me.id, bind_host, peer_port, curve=curve)
        cluster = ClusterNode(me.id, LmdbStorage(store.env), StoreStateMachine(store), transport,
                              timing=Timing.from_config(settings), is_joining=bool(seed))
        node = cls(store, cluster, me, seed=seed, propose_timeout_s=settings.propose_timeout_s,
                   dead_node_timeout_s=settings.dead_node_timeout_s, on_applied=on_applied, soft_state=soft_state)
        node.membership.server_key = curve.public_key if curve is not None else None
        return node

    async def start(self) -> None:
        await self.cluster.start()
        await self.membership.start()
        self._soft_writer = asyncio.get_running_loop().create_task(self._write_soft())

    async def close(self) -> None:
        """Leave, after giving the instance records still queued (a stopping worker's deletes) up to
        SOFT_WAIT_S to commit; any left then are dropped."""
        if self._soft_queue and self._soft_writer is not None and self.cluster.leader_id is not None:
            last = self._soft_queue[-1][1]  # written in order: once it settles, every one before it has
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(last), SOFT_WAIT_S)
        await self.membership.close()
        if self._soft_writer is not None:
            self._soft_writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._soft_writer
        if self._soft_queue:
            log.warning("instance-record writes dropped at shutdown", extra={"count": len(self._soft_queue)})
        for _, future in self._soft_queue:
            settle(future)
        self._soft_queue.clear()
        if self._tasks or self._callbacks:
            await asyncio.gather(*self._tasks, *self._callbacks, return_exceptions=True)
        await self.cluster.close()

    # ----------------------------------------------------------------------------------- interface

    async def propose(self, command: dict[str, Any]) -> Any:
        """Commit `command` and return apply's result (see the module doc for instance-record ops). Also
        waits for what `on_applied` started on this node, so the write's local effects (a removed model's
        instances stopped) are done when it returns, as with LocalStateMachine."""
        if Op(command["op"]) in SOFT_OPS:
            return await self._propose_soft(command)
        result = await self._propose_strict(command)
        if self._callbacks:
            await asyncio.gather(*self._callbacks, return_exceptions=True)
        return result

    def deployments(self) -> dict[str, Deployment]:
        return self._reads.deployments()

    def deployment(self, name: str) -> Deployment | None:
        return self._reads.deployment(name)

    def instances(self) -> list[InstanceRecord]:
        return self._reads.instances()

    def nodes(self) -> dict[str, NodeRecord]:
        return self._reads.nodes()

    def snapshot_id(self) -> int:
        """Changes whenever the replicated state may have (see `LocalStateMachine.snapshot_id`)."""
        return self._reads.snapshot_id()

    @property
    def leader_id(self) -> str | None:
        return self.cluster.leader_id

    @property
    def term(self) -> int:
        return self.cluster.term

    @property
    def role(self) -> Role:
        return self.cluster.role

    @property
    def is_leader(self) -> bool:
        return self.cluster.is_leader

    def cluster_view(self) -> ClusterView:
        return self.membership.view()

    def peers(self) -> tuple[PeerInfo, ...]:
        return self.membership.peers()

    # ------------------------------------------------------------------------------------- writing

    async def _propose_strict(self, command: dict[str, Any]) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.propose_timeout_s
        while (remaining := deadline - loop.time()) > 0:
            leader = self.cluster.leader_id
            try:
                if leader is None:
                    await self.cluster.wait_changed(remaining)
                elif leader == self.node_id:
                    return await self._commit_as_leader(command, remaining)
                else:
                    return await self._forward(leader, command, deadline)
            except (NotLeaderError, ProposalDropped, _NotSent):
                await self.cluster.wait_changed(min(RETRY_WAIT_S, remaining))
        raise Overloaded(f"no leader accepted the write within {self.propose_timeout_s:g}s", code="no_leader")

    async def _forward(self, leader: str, command: dict[str, Any], deadline: float) -> Any:
        request_id = next(self._forward_ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._forwards[request_id] = (leader, future)
        try:
            if not self.cluster.send(leader, ForwardMessage.FORWARD, {"id": request_id, "command": command}):
                raise _NotSent
            reply = await self._await_reply(future, leader, deadline)
        finally:
            self._forwards.pop(request_id, None)
        if reply.get("retry") is True:
            raise ProposalDropped("the leader did not propose it")
        if "error" in reply:
            raise error_from_wire(reply["error"])
        index = reply.get("index")
        if isinstance(index, int):  # read-your-writes on this node; the write itself is done either way
            await self.cluster.wait_applied(index, max(0.0, deadline - asyncio.get_running_loop().time()))
        return result_from_wire(reply.get("result"))

    async def _await_reply(self, future: asyncio.Future[dict[str, Any]], leader: str, deadline: float
                           ) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        changed_at = None
        while not future.done():
            now = loop.time()
            if changed_at is None and self.cluster.leader_id != leader:
                changed_at = now
            limit = deadline - now if changed_at is None else min(deadline, changed_at + LEADER_CHANGE_GRACE_S) - now
            if limit <= 0:
                if changed_at is not None:
                    raise Overloaded(f"leader {leader} changed while the write was in flight; it may or may not "
                                     "have been applied", code="leader_changed")
                raise Overloaded(f"no answer from leader {leader} within {self.propose_timeout_s:g}s; the write "
                                 "may still commit", code="no_leader")
            changed = loop.create_task(self.cluster.wait_changed(limit))
            try:
                await asyncio.wait({future, changed}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                changed.cancel()
        return future.result()

    def record_soon(self, command: dict[str, Any]) -> None:
        """Queue the instance-record write `command` (an op of SOFT_OPS) and return at once: it commits after
        every instance-record write queued before it, retried until it does (see the module doc)."""
        if Op(command["op"]) not in SOFT_OPS:
            raise ValueError(f"{command['op']!r} is not an instance-record op: propose it")
        self._queue_soft(command)

    async def _propose_soft(self, command: dict[str, Any]) -> Any:
        future = self._queue_soft(command)
        if self.cluster.leader_id is None:
            return None
        try:
            return await asyncio.wait_for(asyncio.shield(future), SOFT_WAIT_S)
        except TimeoutError:
            return None

    def _queue_soft(self, command: dict[str, Any]) -> asyncio.Future[Any]:
        """Append `command` to the soft queue; the future settles with its result once `_write_soft` is done
        with it (None if it was dropped or rejected)."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if len(self._soft_queue) >= MAX_SOFT_QUEUE:
            _, dropped = self._soft_queue.popleft()
            settle(dropped)
            log.warning("instance-record write dropped: too many waiting for a leader")
        self._soft_queue.append((command, future))
        self._soft_wake.set()
        return future

    async def _write_soft(self) -> None:
        """One at a time, in order; an op that did not commit is retried (they are idempotent)."""
        num_failures = 0
        while True:
            if not self._soft_queue:
                self._soft_wake.clear()
                await self._soft_wake.wait()
                continue
            command, future = self._soft_queue[0]
            result = None
            try:
                result = await self._propose_strict(command)
            except Overloaded as exc:
                num_failures += 1
                (log.warning if num_failures == 1 else log.debug)(
                    "instance-record write not committed; retrying", extra={"error": exc.message})
                await asyncio.sleep(SOFT_RETRY_S)
                continue
            except SllmdError as exc:
                log.warning("instance-record write rejected", extra={"error": exc.message})
            num_failures = 0
            if self._soft_queue and self._soft_queue[0][1] is future:
                self._soft_queue.popleft()
            settle(future, result=result)

    # ------------------------------------------------------------------------------------ handlers

    def _on_forward(self, message: Message) -> None:
        body = message.body
        if not isinstance(body, dict) or type(body.get("id")) is not int or not isinstance(body.get("command"), dict):
            return
        task = asyncio.get_running_loop().create_task(self._serve_forward(message.sender, body["id"], body["command"]))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve_forward(self, requester: str, request_id: int, command: dict[str, Any]) -> None:
        reply: dict[str, Any] = {"id": request_id}
        try:
            try:
                Op(command.get("op"))
            except ValueError:
                raise InvalidRequest(f"unknown op {command.get('op')!r}") from None
            result = await self._commit_as_leader(command, self.propose_timeout_s)
            reply |= {"result": result_to_wire(result), "index": self.cluster.applied_index}
        except (NotLeaderError, ProposalDropped):
            reply["retry"] = True
        except SllmdError as exc:
            reply["error"] = exc.to_wire()
        except Exception as exc:  # never leave the follower waiting for a reply that will not come
            log.exception("forwarded write failed")
            reply["error"] = SllmdError(f"forwarded write failed: {exc!r}").to_wire()
        self.cluster.send(requester, ForwardMessage.FORWARD_RESULT, reply)

    async def _commit_as_leader(self, command: dict[str, Any], timeout_s: float) -> Any:
        """Propose on this node as leader. REMOVE_NODE first takes the node out of the voters (thesis
        §4.1, one change at a time), then drops its record; either step may be retried safely."""
        if command.get("op") == Op.REMOVE_NODE and command.get("node_id") in self.cluster.voters:
            try:
                await self.cluster.remove_voter(command["node_id"], timeout_s)
            except ConfigChangeError as exc:
                raise Overloaded(f"membership change refused for now: {exc}",
                                 code="membership_change_pending") from None
        return await self.cluster.propose(command, timeout_s)

    def _on_forward_result(self, message: Message) -> None:
        body = message.body
        if not isinstance(body, dict) or type(body.get("id")) is not int:
            return
        leader, future = self._forwards.get(body["id"], (None, None))
        if future is not None and leader == message.sender and not future.done():
            future.set_result(body)

    def _on_applied(self, command: dict[str, Any] | None, result: Any) -> None:
        if self.on_applied is None or isinstance(result, BaseException):
            return
        outcome = self.on_applied(command, result)
        if inspect.isawaitable(outcome):
            task = asyncio.ensure_future(outcome)
            self._callbacks.add(task)
            task.add_done_callback(self._on_callback_done)

    def _on_callback_done(self, task: asyncio.Task[Any]) -> None:
        self._callbacks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("on_applied callback failed", exc_info=task.exception())


def host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"

