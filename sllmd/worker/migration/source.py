"""Live migration of a running instance to another node, token-based and two-phase (DESIGN.md).

Source S, destination D, over the peer transport (`sllmd.worker.migration.messages`):
1. BEGIN: D leases an instance of the model through its normal path (reusing a ready one, or starting
   one from its best tier) and answers READY.
2. Catch-up rounds: S sends each in-flight request's ids D does not hold yet (prompt, then the tokens
   generated so far); D prefills them into a per-request KV cache (`Engine.prefill`) while S keeps
   decoding; CAUGHT_UP. Requests that arrived meanwhile join the next round. The rounds end when every
   request is at most `migration_gap_tokens` behind, or after `migration_max_rounds`.
3. Cut-over: S stops giving the instance new requests, pauses every request at the token its client
   already has, and sends the rest of each sequence with the sampling state (seed, position, tokens
   still to generate, stop ids). D prefills the gap and continues from there; CUT_OVER_ACK.
4. S stops its instance, which frees the slot. If D refuses, times out or goes silent before the ack,
   the migration aborts: every request continues on S's engine from the tokens it has (even tokens D
   already pushed count), and D is told to drop its copies.

Where the stream switches: nowhere the client can see. The node whose router generates a request (S)
keeps its HTTP response, or its relay stream to the entry node, for the request's whole life; only the
request's token source changes, from S's engine to the token ids D pushes back (TOKENS, numbered, so
a lost message fails the request instead of corrupting it). Detokenising, stop strings, usage and the
SSE stream stay on S, so the text is byte for byte what it would have been, and an entry node that
relays to S needs nothing new. The price: S's process stays on the path until the request ends (the
slot, which is what the scheduler wants back, is free at once). If S dies, its streams die with it;
D notices its pushes failing and drops the requests. Outputs are identical because token choice is
keyed by (seed, position) and every request has an explicit seed from admission (`Router.prepare`).

Not thread-safe: the event loop only.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from sllmd.cluster.membership import ALIVE_WINDOW_S
from sllmd.cluster.shell import ClusterNode
from sllmd.cluster.transport import Message
from sllmd.config import ServingConfig
from sllmd.errors import Conflict, InvalidRequest, NotFound
from sllmd.state.models import InstanceState
from sllmd.worker.manager import Worker
from sllmd.worker.migration.messages import (
    ALL_REQUESTS,
    Cancel,
    CatchUp,
    CaughtUp,
    CutOver,
    CutOverAck,
    MigrationMessage,
    MovedRequest,
    Ready,
    Tokens,
    WireError,
    decode,
    to_wire,
)
from sllmd.worker.migration.movable import LIVENESS_CHECK_S, MovableRequest, RemoteTokens
from sllmd.worker.migration.target import Destination

log = logging.getLogger(__name__)


class MigrationOutcome(enum.StrEnum):
    MOVED = "moved"  # every in-flight request runs on the destination; the source's slot is free
    ABORTED = "aborted"  # the destination failed or refused before the cut-over; nothing moved


@dataclass(frozen=True, slots=True)
class MigrationResult:
    instance_id: str
    model: str
    to_node: str
    outcome: MigrationOutcome
    num_requests: int  # requests moved (aborted: in flight when it gave up)
    num_tokens: int  # prompt + generated tokens of the moved requests at the cut-over (aborted: 0)
    num_rounds: int  # catch-up rounds run
    start_s: float  # BEGIN to READY: the destination's model start (0 when it had a ready instance idle)
    duration_s: float  # catch-up, cut-over and the source's stop: the a·tokens + b part
    cut_over_s: float  # requests paused here to the destination's ack (aborted: 0)
    reason: str = ""  # why it aborted

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class _Aborted(Exception):
    """The destination refused, failed or went away; the message says which."""


@dataclass(eq=False)
class _Outgoing:
    migration_id: str
    to_node: str
    replies: asyncio.Queue[tuple[str, Any]]


class MigrationService:
    """Both halves of migration on this node: `migrate` (this node as source) and the handlers that
    make it a destination. `on_migrated(result)` is called for every migration that moved requests."""

    def __init__(self, cluster: ClusterNode, worker: Worker, serving: ServingConfig, *,
                 on_migrated: Callable[[MigrationResult], None] | None = None) -> None:
        self.cluster = cluster
        self.worker = worker
        self.serving = serving
        self.on_migrated = on_migrated
        self.destination = Destination(worker, self._send, self.is_alive)
        self._outgoing: dict[str, _Outgoing] = {}
        self._feeds: dict[tuple[str, int], RemoteTokens] = {}  # (migration id, key) -> moved request's feed
        handlers = {MigrationMessage.READY: self._on_reply, MigrationMessage.CAUGHT_UP: self._on_reply,
                    MigrationMessage.CUT_OVER_ACK: self._on_reply, MigrationMessage.TOKENS: self._on_tokens,
                    **self.destination.handlers()}
        for message_type, handler in handlers.items():
            cluster.add_handler(message_type, handler)

    def is_alive(self, node_id: str) -> bool:
        seen = self.cluster.last_seen.get(node_id)
        return seen is not None and time.monotonic() - seen < ALIVE_WINDOW_S

    def _send(self, node_id: str, message_type: MigrationMessage, body: Any) -> bool:
        return self.cluster.send(node_id, message_type, to_wire(body))

    async def migrate(self, instance_id: str, to_node: str) -> MigrationResult:
        """Move every in-flight request of this node's instance `instance_id` to `to_node`, then stop
        the instance. NotFound (no such instance here), InvalidRequest (bad target), Conflict (not ready,
        already migrating, target unreachable, too many migrations) before anything starts; afterwards
        the outcome says whether it moved or aborted (the requests then carried on here)."""
        found = self.worker.find(instance_id)
        if found is None:
            raise NotFound(f"no instance '{instance_id}' on node {self.worker.node_id}", param="id",
                           code="instance_not_found")
        runtime, instance = found
        if to_node == self.worker.node_id:
            raise InvalidRequest("the instance already runs on that node", param="to", code="same_node")
        if instance.state is not InstanceState.READY or instance.is_draining:
            raise Conflict(f"instance '{instance_id}' is {instance.state.value}, not ready", code="not_ready")
        if any(o.migration_id.startswith(f"{instance_id}/") for o in self._outgoing.values()):
            raise Conflict(f"instance '{instance_id}' is already migrating", code="already_migrating")
        if len(self._outgoing) >= self.serving.max_concurrent_migrations:
            raise Conflict(f"{len(self._outgoing)} migrations are running on this node (the limit)",
                           code="too_many_migrations")
        if not self.is_alive(to_node):
            raise Conflict(f"node '{to_node}' is not reachable", param="to", code="node_unreachable")
        session = _Outgoing(f"{instance_id}/{secrets.token_hex(4)}", to_node, asyncio.Queue())
        self._outgoing[session.migration_id] = session
        began = time.monotonic()
        moving: list[MovableRequest] = []
        start_s, num_rounds = 0.0, 0
        try:
            self._post(session, MigrationMessage.BEGIN, {"migration_id": session.migration_id,
                                                         "model": runtime.deployment.name})
            ready = await self._reply(session, MigrationMessage.READY, Ready, self.serving.queue_timeout_s)
            if ready.error:
                raise _Aborted(f"{to_node} could not start the model: {ready.error}")
            start_s = time.monotonic() - began
            keys: dict[MovableRequest, int] = {}
            held: dict[MovableRequest, int] = {}  # ids the destination has prefilled, per request
            numbering = itertools.count()
            while num_rounds < self.serving.migration_max_rounds:
                num_rounds += 1
                appended = []
                for request in [r for r in instance.requests if r.num_remaining > 0]:
                    key = keys.setdefault(request, next(numbering))
                    sequence = request.sequence
                    appended.append([key, sequence[held.get(request, 0):]])
                    held[request] = len(sequence)
                self._post(session, MigrationMessage.CATCH_UP, to_wire(CatchUp(session.migration_id, num_rounds,
                                                                               appended)))
                caught_up = await self._reply(session, MigrationMessage.CAUGHT_UP, CaughtUp,
                                              self.serving.migration_step_timeout_s)
                if caught_up.error:
                    raise _Aborted(f"{to_node} failed to catch up: {caught_up.error}")
                gap = max((r.num_tokens - held.get(r, 0) for r in instance.requests if r.num_remaining > 0),
                          default=0)
                if gap <= self.serving.migration_gap_tokens:
                    break
            cut_began = time.monotonic()
            await self.worker.set_draining(runtime, instance, True)
            moved = []
            for request in [r for r in instance.requests if r.num_remaining > 0]:
                request.pause()
                key = keys.setdefault(request, next(numbering))
                sequence, params = request.sequence, request.params
                # The router seeds every sampled request at admission. A greedy one has none and needs
                # none; 0 stands in (what the dummy engine reads a missing seed as).
                seed = params.seed if params.seed is not None else 0
                moved.append(to_wire(MovedRequest(
                    key, sequence[held.get(request, 0):], len(sequence), request.num_remaining, params.temperature,
                    params.top_p, seed, sorted(params.stop_token_ids))))
                request.use_remote(self._feed(session, key))
                moving.append(request)
            self._post(session, MigrationMessage.CUT_OVER, to_wire(CutOver(session.migration_id, moved)))
            ack = await self._reply(session, MigrationMessage.CUT_OVER_ACK, CutOverAck,
                                    self.serving.migration_step_timeout_s)
            if ack.error:
                raise _Aborted(f"{to_node} refused the cut-over: {ack.error}")
            num_tokens = sum(len(r.prompt_ids) + len(r.tokens) for r in moving)
            for request in moving:
                instance.requests.discard(request)  # generating on the destination now
            cut_over_s = time.monotonic() - cut_began
            await self.worker.stop_instance(runtime, instance)
            result = MigrationResult(instance_id, runtime.deployment.name, to_node, MigrationOutcome.MOVED,
                                     len(moving), num_tokens, num_rounds, start_s,
                                     time.monotonic() - began - start_s, cut_over_s)
            log.info("instance migrated", extra=result.to_json())
            if self.on_migrated is not None:
                self.on_migrated(result)
            return result
        except _Aborted as exc:
            for request in moving:
                self._feeds.pop((session.migration_id, keys[request]), None)
                request.resume_local()
            await self.worker.set_draining(runtime, instance, False)
            self._send(to_node, MigrationMessage.CANCEL, Cancel(session.migration_id, ALL_REQUESTS))
            log.warning("migration aborted; the requests carry on here",
                        extra={"instance": instance_id, "to": to_node, "reason": str(exc)})
            return MigrationResult(instance_id, runtime.deployment.name, to_node, MigrationOutcome.ABORTED,
                                   len(instance.requests), 0, num_rounds, start_s, time.monotonic() - began - start_s,
                                   0.0, str(exc))
        finally:
            del self._outgoing[session.migration_id]

    def _post(self, session: _Outgoing, message_type: MigrationMessage, body: dict[str, Any]) -> None:
        if not self.cluster.send(session.to_node, message_type, body):
            raise _Aborted(f"could not send to {session.to_node}")

    async def _reply(self, session: _Outgoing, message_type: MigrationMessage, cls: type, timeout_s: float) -> Any:
        """The destination's next answer, which must be of `message_type`; _Aborted on timeout, silence
        (no message from it for ALIVE_WINDOW_S) or anything else."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                kind, raw = await asyncio.wait_for(session.replies.get(), LIVENESS_CHECK_S)
            except TimeoutError:
                if not self.is_alive(session.to_node):
                    raise _Aborted(f"{session.to_node} went silent") from None
                if time.monotonic() > deadline:
                    raise _Aborted(f"{session.to_node} did not answer {message_type} within {timeout_s:g}s") from None
                continue
            if kind != message_type:
                raise _Aborted(f"{session.to_node} sent {kind} while {message_type} was expected")
            try:
                return decode(cls, raw)
            except WireError as exc:
                raise _Aborted(f"{session.to_node} sent a malformed {kind}: {exc}") from None

    def _feed(self, session: _Outgoing, key: int) -> RemoteTokens:
        feed = RemoteTokens(session.to_node, self.is_alive)
        self._feeds[(session.migration_id, key)] = feed

        def on_close(is_finished: bool) -> None:
            self._feeds.pop((session.migration_id, key), None)
            if not is_finished:  # its client went away: the destination stops generating it
                self._send(session.to_node, MigrationMessage.CANCEL, Cancel(session.migration_id, key))

        feed.on_close = on_close
        return feed

    # -- messages from destinations --------------------------------------------------------------

    def _on_reply(self, message: Message) -> None:
        migration_id = message.body.get("migration_id") if isinstance(message.body, dict) else None
        session = self._outgoing.get(migration_id) if isinstance(migration_id, str) else None
        if session is None or session.to_node != message.sender:
            return  # late, or not ours: the migration is over
        session.replies.put_nowait((message.type, message.body))

    def _on_tokens(self, message: Message) -> None:
        try:
            tokens = decode(Tokens, message.body)
        except WireError as exc:
            log.warning("malformed migration tokens", extra={"from": message.sender, "error": str(exc)})
            return
        feed = self._feeds.get((tokens.migration_id, tokens.key))
        if feed is None or feed.sender != message.sender:
            return  # the request ended here already
        feed.push(tokens.index, tokens.tokens, tokens.error)
        if tokens.error:
            del self._feeds[(tokens.migration_id, tokens.key)]
