"""Cluster membership: bootstrap, join, rejoin, the peer table, and who is alive.

- Bootstrap: on an empty data dir without a seed, ClusterNode bootstraps a one-node cluster; this module
  then commits the node's own record (id, peer and HTTP addresses) to the replicated node table.
- Join (`--join HOST:PEERPORT`): the new node, with empty Raft state, sends JOIN {id, peer, http,
  is_ready} to the seed every JOIN_RETRY_S until it is a voter. Any member that receives a JOIN answers
  JOIN_ACK with the peer table it knows (when the joiner is in its table, i.e. reachable), and, if it is
  not the leader, forwards the JOIN to the leader. The leader commits the joiner's node record
  (PUT_NODE); once the joiner reports `is_ready` (it got a JOIN_ACK, so it can answer the leader) the
  leader adds it as a voter (single-server change; one at a time: a refused change is retried on the
  next JOIN). The joiner catches up by AppendEntries, or by InstallSnapshot once the log is compacted.
- Rejoin: a node with Raft state on disk ignores any seed; its peers come from the replicated node table.
  (A joiner only receives Raft state once it is a voter, so state on disk means it was admitted.) A node
  removed from the voters stays out: to come back it starts on an empty data dir with --join. A node
  whose addresses changed re-commits its own record; until then the others cannot reach it.
- Leave: proposing REMOVE_NODE (from any node) removes the voter, then its record and instances.
- Transport peers = the node table, plus addresses from a JOIN_ACK for ids not in it yet, plus the seed
  while joining; recomputed whenever a node record applies or a snapshot replaces the table.
- Dead nodes: the leader deletes the instance records of a node it has not heard from for
  `dead_node_timeout_s` (counted from when it became leader, as last_seen starts then), or that has no
  node record, so placement stops routing to it. The node re-registers what it runs when it restarts.
  REMOVE_NODE deletes a member's records for good.
- Soft state: every STATUS_INTERVAL_S each node sends NODE_STATUS {role, status} to the others, `status`
  being its `soft_state()` (a `scheduler.status.NodeStatus`: devices and their free memory, cache contents,
  queues, calibration, instances) in wire form, or None on a node that has none (no worker). A status that
  does not decode is dropped whole. A node is "alive" if any message from it arrived within ALIVE_WINDOW_S.
  Approximate. `view()` is the cluster as this node sees it; `peers()` the others alone, which computes
  nothing of this node.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from sllmd.cluster.proposals import ConfigChangeError, NotLeaderError, ProposalDropped
from sllmd.cluster.shell import ClusterNode
from sllmd.config import is_host_port
from sllmd.errors import SllmdError
from sllmd.scheduler.status import ClusterView, NodeStatus, PeerInfo, StatusError
from sllmd.state.machine import LocalStateMachine, NodeRecord, Op

log = logging.getLogger(__name__)

JOIN_RETRY_S = 0.2
STATUS_INTERVAL_S = 0.5
ALIVE_WINDOW_S = 2.0
ANNOUNCE_RETRY_S = 0.5
SEED_PEER_ID = "join-seed"  # a local transport key only; never sent


class MembershipMessage(enum.StrEnum):
    JOIN = "join"
    JOIN_ACK = "join_ack"
    NODE_STATUS = "node_status"


class Membership:
    """Keeps this node in the cluster and the transport's peer table in step with the node table.
    `propose` routes a command to the leader (ReplicatedStateMachine's strict path)."""

    def __init__(self, cluster: ClusterNode, reads: LocalStateMachine, me: NodeRecord, *, seed: str | None,
                 propose: Callable[[dict[str, Any]], Awaitable[Any]], propose_timeout_s: float,
                 dead_node_timeout_s: float = 0.0, soft_state: Callable[[], NodeStatus] | None = None) -> None:
        self.cluster = cluster
        self._reads = reads  # the replicated state machine's reader: one decoded copy of the tables per node
        self.dead_node_timeout_s = dead_node_timeout_s
        self.server_key: bytes | None = None  # CurveZMQ: the cluster's shared server public key
        self.me = me
        self._seed = seed
        self._propose = propose
        self._propose_timeout_s = propose_timeout_s
        self._hints: dict[str, str] = {}  # peer addresses from JOIN_ACKs, for ids not yet in the table
        self._statuses: dict[str, tuple[str, NodeStatus | None]] = {}  # node id -> its last (role, status)
        self._bad_status_from: set[str] = set()  # nodes whose last status did not decode (warned once)
        self._admitting: set[str] = set()
        self._has_peer_table = False  # a joiner that got a JOIN_ACK can answer the leader
        self._peers: dict[str, str] = {}  # the transport's peer table, as last set
        self._tasks: list[asyncio.Task[None]] = []
        self.soft_state = soft_state  # this node's status; None: it has none
        for message_type, handler in ((MembershipMessage.JOIN, self._on_join),
                                      (MembershipMessage.JOIN_ACK, self._on_join_ack),
                                      (MembershipMessage.NODE_STATUS, self._on_status)):
            cluster.add_handler(message_type, handler)
        cluster.add_apply_listener(self._on_applied)

    async def start(self) -> None:
        if self._seed and not self.cluster.started_empty:
            log.info("the data dir holds Raft state: rejoining from it, not through the seed",
                     extra={"seed": self._seed})
            self._seed = None
        self.refresh_peers()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(coro)
                       for coro in (self._join(), self._announce(), self._send_status(), self._reap_dead())]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @property
    def is_member(self) -> bool:
        return self.me.id in self.cluster.voters

    def records(self) -> dict[str, NodeRecord]:
        return self._reads.nodes()

    def refresh_peers(self) -> None:
        records = self.records()
        peers = {pid: address for pid, address in self._hints.items() if pid not in records}
        peers |= {record.id: record.peer for record in records.values()}
        peers.pop(self.me.id, None)
        # One DEALER per address: two with our routing id would keep taking over each other's
        # connection at the peer's ROUTER (ROUTER_HANDOVER). The seed key only stands in for a node
        # whose id we do not know yet.
        if self._seed and self._seed not in peers.values():
            peers[SEED_PEER_ID] = self._seed
        self._peers = {pid: address for pid, address in peers.items() if is_host_port(address)}
        keys = None if self.server_key is None else dict.fromkeys(self._peers, self.server_key)
        self.cluster.transport.set_peers(self._peers, keys)

    def view(self) -> ClusterView:
        """Every known node (the node table, the voters and this one) with its addresses, role, liveness and
        status; this node's status is computed now."""
        me = (self.cluster.role.value, None if self.soft_state is None else self.soft_state())
        return ClusterView(self.cluster.leader_id, self.cluster.term, self._infos(me))

    def peers(self) -> tuple[PeerInfo, ...]:
        """The other known nodes, as in `view()`; computes nothing of this one."""
        return self._infos(None)

    def _infos(self, me: tuple[str, NodeStatus | None] | None) -> tuple[PeerInfo, ...]:
        """The nodes in id order; this one only when `me` (its role and status) is given."""
        records, cluster, now = self.records(), self.cluster, time.monotonic()
        infos = []
        for node_id in sorted(set(records) | set(cluster.voters) | {self.me.id}):
            record = records.get(node_id, self.me if node_id == self.me.id else None)
            if node_id == self.me.id:
                if me is None:
                    continue
                (role, status), seen_s = me, 0.0
            else:
                role, status = self._statuses.get(node_id, ("unknown", None))
                # Who leads is this node's knowledge, fresher than what a status said.
                role = "leader" if node_id == cluster.leader_id else "follower" if role == "leader" else role
                seen = cluster.last_seen.get(node_id)
                seen_s = None if seen is None else round(now - seen, 3)
            infos.append(PeerInfo(
                node_id, record.http if record else None, record.peer if record else None, role,
                is_alive=seen_s is not None and seen_s < ALIVE_WINDOW_S, is_voter=node_id in cluster.voters,
                last_seen_s=seen_s, status=status))
        return tuple(infos)

    # ---------------------------------------------------------------------------------------- loops

    async def _join(self) -> None:
        """A node that started on empty Raft state with a seed asks to be admitted until it is a voter.
        Any other node outside the voters (removed) stays out, and says so once."""
        is_warned = False
        while True:
            if self._seed is not None and self.cluster.has_been_voter:  # admitted: never needed again
                self._seed = None
                self.refresh_peers()
            if self.is_member:
                await self.cluster.wait_changed(5.0)
            elif self._seed is None:
                if not is_warned:
                    log.warning("this node is not a voter of the cluster recorded in its data dir (removed?); "
                                "to join again, start it on an empty data dir with --join HOST:PEERPORT")
                    is_warned = True
                await self.cluster.wait_changed(5.0)
            else:
                body = {**self.me.to_wire(), "is_ready": self._has_peer_table}
                for target in [pid for pid, address in self._peers.items() if address == self._seed][:1]:
                    self.cluster.send(target, MembershipMessage.JOIN, body)
                await self.cluster.wait_changed(JOIN_RETRY_S)

    async def _announce(self) -> None:
        """Keep this node's record in the table equal to its current addresses."""
        while True:
            if self.is_member and self.records().get(self.me.id) != self.me:
                try:
                    await self._propose({"op": Op.PUT_NODE, "node": self.me.to_wire()})
                    log.debug("node record committed", extra={"peer": self.me.peer, "http": self.me.http})
                except SllmdError as exc:
                    log.debug("node record not committed yet", extra={"error": exc.message})
                    await asyncio.sleep(ANNOUNCE_RETRY_S)
                continue
            await self.cluster.wait_changed(1.0)

    async def _send_status(self) -> None:
        while True:
            try:
                status = None if self.soft_state is None else self.soft_state().to_wire()
                body = {"role": self.cluster.role.value, "status": status}
                for node_id in self.records():
                    if node_id != self.me.id:
                        self.cluster.send(node_id, MembershipMessage.NODE_STATUS, body)
            except Exception:
                log.exception("status broadcast failed")
            await asyncio.sleep(STATUS_INTERVAL_S)

    async def _reap_dead(self) -> None:
        """Leader: delete the instance records of nodes silent for dead_node_timeout_s, or unrecorded."""
        timeout_s = self.dead_node_timeout_s
        if timeout_s <= 0:
            return
        leader_since: float | None = None
        while True:
            await asyncio.sleep(min(1.0, timeout_s / 4))
            if not self.cluster.is_leader:
                leader_since = None
                continue
            now = time.monotonic()
            leader_since = now if leader_since is None else leader_since
            owners = {record.node_id for record in self._reads.instances()}
            records = self.records()
            for node_id in sorted(owners - {self.me.id}):
                silent_s = now - max(self.cluster.last_seen.get(node_id, 0.0), leader_since)
                if node_id in records and silent_s <= timeout_s:
                    continue
                try:
                    count = await self.cluster.propose({"op": Op.DELETE_NODE_INSTANCES, "node_id": node_id},
                                                       self._propose_timeout_s)
                    log.warning("deleted the instance records of a dead node", extra={
                        "node": node_id, "count": count, "silent_s": round(silent_s, 1),
                        "recorded": node_id in records})
                except (NotLeaderError, ProposalDropped, SllmdError) as exc:
                    log.info("dead node's instance records not deleted yet", extra={"node": node_id,
                                                                                    "reason": str(exc)})

    # ------------------------------------------------------------------------------------- handlers

    def _on_join(self, message: Any) -> None:
        body = message.body
        try:
            joiner = NodeRecord.from_wire({k: body[k] for k in ("id", "peer", "http")})
            is_ready = body["is_ready"] is True
        except (TypeError, KeyError, ValueError):
            return
        if joiner.id == self.me.id or not (is_host_port(joiner.peer) and is_host_port(joiner.http)):
            return
        if joiner.id in self.records():
            self._send_ack(joiner.id)
        if self.cluster.is_leader:
            if joiner.id not in self._admitting:
                self._admitting.add(joiner.id)
                asyncio.get_running_loop().create_task(self._admit(joiner, is_ready))
        elif self.cluster.leader_id is not None and message.sender == joiner.id:
            self.cluster.send(self.cluster.leader_id, MembershipMessage.JOIN, body)  # one hop, no loops

    async def _admit(self, joiner: NodeRecord, is_ready: bool) -> None:
        """Leader: record the joiner, tell it the peer table, then make it a voter. Idempotent."""
        try:
            if self.records().get(joiner.id) != joiner:
                await self.cluster.propose({"op": Op.PUT_NODE, "node": joiner.to_wire()}, self._propose_timeout_s)
                self._send_ack(joiner.id)  # the first send may precede the connection: the next JOIN re-acks
            if is_ready and joiner.id not in self.cluster.voters:
                await self.cluster.add_voter(joiner.id, self._propose_timeout_s)
                log.info("node joined", extra={"node": joiner.id, "peer": joiner.peer, "http": joiner.http})
        except (NotLeaderError, ProposalDropped, ConfigChangeError, SllmdError) as exc:
            log.info("join not completed yet; the joiner retries", extra={"node": joiner.id, "reason": str(exc)})
        finally:
            self._admitting.discard(joiner.id)

    def _send_ack(self, joiner_id: str) -> None:
        peers = {record.id: record.peer for record in self.records().values()} | {self.me.id: self.me.peer}
        self.cluster.send(joiner_id, MembershipMessage.JOIN_ACK, {"peers": peers, "leader": self.cluster.leader_id})

    def _on_join_ack(self, message: Any) -> None:
        peers = message.body.get("peers") if isinstance(message.body, dict) else None
        if not isinstance(peers, dict):
            return
        hints = {pid: a for pid, a in peers.items() if isinstance(pid, str) and pid and isinstance(a, str)
                 and is_host_port(a) and pid != self.me.id}
        if hints != {pid: self._hints.get(pid) for pid in hints} or not self._has_peer_table:
            self._hints.update(hints)
            self._has_peer_table = True
            self.refresh_peers()

    def _on_status(self, message: Any) -> None:
        body, sender = message.body, message.sender
        if not isinstance(body, dict) or set(body) != {"role", "status"} or not isinstance(role := body["role"], str):
            return
        try:
            status = None if body["status"] is None else NodeStatus.from_wire(body["status"])
        except StatusError as exc:
            if sender not in self._bad_status_from:
                log.warning("dropped a node status that does not decode", extra={"node": sender, "error": str(exc)})
                self._bad_status_from.add(sender)
            return
        self._bad_status_from.discard(sender)
        self._statuses[sender] = role, status

    def _on_applied(self, command: dict[str, Any] | None, result: Any) -> None:
        if command is None or command.get("op") in (Op.PUT_NODE, Op.REMOVE_NODE):
            self.refresh_peers()

