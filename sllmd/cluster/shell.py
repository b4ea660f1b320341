"""The asyncio shell around the Raft core: one driver task feeds it and drains its Ready bundles.

Inputs are peer messages (Raft types are decoded and validated here; the sender is the peer the transport
authenticated), a tick every `tick_s`, and proposals. They wait in queues and only the driver task hands
them to the core, between one advance() and the next ready(): input that arrives while a Ready is being
processed (an fsync in a thread) is buffered, never given to the core mid-Ready.

Each Ready is processed in this order (the core's contract, `sllmd.raft.core`):
  1. persist the hard state, log changes and snapshot (`Storage.save`: atomic and durable), then, if the
     Ready says so, replace the state machine with the snapshot (`StateMachine.restore`, which also
     records the snapshot's index as applied: a crash in between restores again on restart);
  2. send the messages;
  3. apply the committed commands (`StateMachine.apply`), in one durable write that also records the
     index of the last entry. An entry's effects and the applied index commit together, so after a crash
     nothing is applied twice or lost (exactly-once). A command that fails (a domain error) changes
     nothing and still counts as applied: every node fails it alike;
  4. advance; then settle the proposals whose entries applied and call the apply listeners.
Steps 1 and 3 run in the default executor so the event loop never waits on fsync; only the driver
writes to the storage and the state machine. Every `compact_every_entries` applied entries the state
machine's snapshot at the applied index replaces the log up to it (§7).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq

from sllmd.cluster.proposals import Proposal, Proposals
from sllmd.cluster.state_machine import Command, StateMachine, apply_committed, encode_command
from sllmd.cluster.transport import Message, PeerTransport
from sllmd.config import ClusterConfig
from sllmd.errors import Overloaded
from sllmd.raft.core import Raft, RaftConfig, Ready, Role
from sllmd.raft.messages import Message as RaftMessage
from sllmd.raft.messages import MessageType, WireError
from sllmd.raft.storage import Storage

log = logging.getLogger(__name__)

RAFT_MESSAGE_TYPES = frozenset(t.value for t in MessageType)
MAX_INBOX = 10_000  # Raft messages buffered while a Ready is processed; beyond it they drop (Raft retries)

ApplyListener = Callable[[Command | None, Any], None]
MessageHandler = Callable[[Message], None]


class ClusterStartupError(RuntimeError):
    """The cluster node cannot start (peer port taken, unreadable Raft state); a one-line reason."""


@dataclass(frozen=True, slots=True)
class Timing:
    """The shell's clock (seconds per tick) and the core's timeouts in ticks."""

    tick_s: float = 0.05
    compact_every_entries: int = 1000
    raft: RaftConfig = field(default_factory=RaftConfig)

    @classmethod
    def from_config(cls, config: ClusterConfig) -> Timing:
        def ticks(seconds: float) -> int:
            return max(1, round(seconds / config.tick_s))

        heartbeat = ticks(config.heartbeat_interval_s)
        low = max(heartbeat + 1, ticks(config.election_timeout_min_s))
        raft = RaftConfig(election_ticks_min=low, election_ticks_max=max(low, ticks(config.election_timeout_max_s)),
                          heartbeat_ticks=heartbeat)
        return cls(config.tick_s, config.compact_every_entries, raft)


class ClusterNode:
    """One member's Raft shell. `await start()`, then `propose` (leader only), `await close()`.

    The Raft state goes through `storage`; committed commands go to the application's `machine`.
    Not thread-safe: call everything from the event loop that started it. Apply listeners are called
    on that loop with (command, result) for every applied command — `result` is the exception for one
    that failed — and with (None, None) after a snapshot replaced the whole replicated state.
    """

    def __init__(self, node_id: str, storage: Storage, machine: StateMachine, transport: PeerTransport, *,
                 timing: Timing | None = None, is_joining: bool = False, rng: random.Random | None = None) -> None:
        self.node_id = node_id
        self.transport = transport
        self.timing = timing or Timing()
        self._is_joining = is_joining
        self._rng = rng or random.Random()
        self._storage = storage
        self._machine = machine
        self._raft: Raft | None = None
        self._inbox: list[RaftMessage] = []
        self._num_ticks = 0
        self._proposals = Proposals()
        self._handlers: dict[str, MessageHandler] = {}
        self._apply_listeners: list[ApplyListener] = []
        self._wake = asyncio.Event()
        self._changed = asyncio.Event()
        self._last_status: tuple[Any, ...] = ()
        self._tasks: list[asyncio.Task[None]] = []
        self._driver: asyncio.Task[None] | None = None
        self._is_closing = False
        self.last_seen: dict[str, float] = {}  # peer id -> time.monotonic() of its last valid message
        self.started_empty = False  # set by start(): no Raft state was on disk (a new node)
        self.has_been_voter = False  # this process has seen itself among the voters

    # ------------------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Load (or create) the Raft state, bind the peer port and start the driver."""
        try:
            persisted = await asyncio.to_thread(self._storage.load)
        except WireError as exc:
            raise ClusterStartupError(f"this node's stored Raft state does not decode: {exc}") from None
        applied = await asyncio.to_thread(self._machine.applied_index)
        config = self.timing.raft
        self.started_empty = persisted.is_empty
        if persisted.is_empty and self._is_joining:
            await asyncio.to_thread(self._machine.restore, b"", 0)  # a joiner's state comes from the cluster
            raft = Raft(self.node_id, self._rng, config)
        elif persisted.is_empty:
            raft = Raft.bootstrap(self.node_id, [self.node_id], self._rng, config)
        else:
            try:
                raft = Raft.restore(self.node_id, persisted.hard_state, persisted.entries, persisted.snapshot,
                                    self._rng, config, applied=applied)
            except ValueError as exc:
                raise ClusterStartupError(f"this node's stored Raft state is inconsistent: {exc}") from None
        if raft.voters == (self.node_id,):
            for _ in range(config.election_ticks_max):  # a lone voter need not wait out an election timeout
                raft.tick()
        self._raft = raft
        # The starting state is reported by the daemon's "serving" line; changes from here on are logged.
        self._last_status = (raft.role, raft.term, raft.leader_id, raft.voters)
        try:
            await self.transport.start()
        except zmq.ZMQError as exc:
            raise ClusterStartupError(f"cannot listen on peer port {self.transport.port}: {exc.strerror}") from None
        loop = asyncio.get_running_loop()
        self._driver = loop.create_task(self._drive(), name=f"raft-driver-{self.node_id}")
        self._driver.add_done_callback(self._on_driver_done)
        self._tasks = [loop.create_task(self._receive()), loop.create_task(self._tick())]
        self._wake.set()

    async def close(self) -> None:
        """Finish the Ready in progress, stop, and fail what still waits. Idempotent."""
        if self._is_closing:
            return
        self._is_closing = True
        self._wake.set()
        if self._driver is not None:
            with contextlib.suppress(Exception):
                await self._driver  # exits before its next ready(): no write outlives close()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.transport.close()
        self._proposals.fail_all(Overloaded("this node is shutting down", code="shutting_down"))

    # ----------------------------------------------------------------------------------------- reads

    @property
    def raft(self) -> Raft:
        assert self._raft is not None, "ClusterNode.start() first"
        return self._raft

    @property
    def role(self) -> Role:
        return self.raft.role

    @property
    def term(self) -> int:
        return self.raft.term

    @property
    def leader_id(self) -> str | None:
        return self.raft.leader_id

    @property
    def is_leader(self) -> bool:
        return self.raft.is_leader

    @property
    def voters(self) -> tuple[str, ...]:
        return self.raft.voters

    @property
    def applied_index(self) -> int:
        return self.raft.applied_index

    @property
    def is_running(self) -> bool:
        return self._driver is not None and not self._driver.done()

    # ------------------------------------------------------------------------------------- requests

    def add_handler(self, message_type: str, handler: MessageHandler) -> None:
        """Route peer messages of a non-Raft `message_type` to `handler` (called on the loop)."""
        assert message_type not in RAFT_MESSAGE_TYPES
        self._handlers[message_type] = handler

    def add_apply_listener(self, listener: ApplyListener) -> None:
        self._apply_listeners.append(listener)

    def send(self, peer_id: str, message_type: str, body: Any) -> bool:
        """Send a shell (non-Raft) message; False if it was dropped (see PeerTransport.send)."""
        if self._is_closing:
            return False
        return self.transport.send(peer_id, Message(message_type, self.node_id, self.raft.term, body))

    async def propose(self, command: Command, timeout_s: float) -> Any:
        """Commit `command` through this node as leader; returns apply's result once it applied here.
        Raises NotLeaderError or ProposalDropped (not applied: retry), the command's domain error, or
        Overloaded when it did not commit within `timeout_s` (it may still commit later)."""
        return await self._submit(Proposal(command=encode_command(command)), timeout_s)

    async def add_voter(self, node_id: str, timeout_s: float) -> None:
        """Single-server membership change (thesis §4.1); returns once the config entry applied here."""
        await self._submit(Proposal(add_voter=node_id), timeout_s)

    async def remove_voter(self, node_id: str, timeout_s: float) -> None:
        await self._submit(Proposal(remove_voter=node_id), timeout_s)

    async def wait_applied(self, index: int, timeout_s: float) -> bool:
        """True once entry `index` (or a snapshot past it) has been applied here, False on timeout."""
        if self.raft.applied_index >= index:
            return True
        try:
            await asyncio.wait_for(self._proposals.wait_applied(index), timeout_s)
            return True
        except TimeoutError:
            return False

    async def wait_changed(self, timeout_s: float) -> None:
        """Return when role, term, leader or voters change next, or after `timeout_s`."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout_s)

    async def _submit(self, proposal: Proposal, timeout_s: float) -> Any:
        if self._is_closing or not self.is_running:
            raise Overloaded("the cluster node is not running", code="no_leader")
        self._proposals.queue(proposal)
        self._wake.set()
        try:
            return await asyncio.wait_for(proposal.future, timeout_s)
        except TimeoutError:
            raise Overloaded(f"the write was not committed within {timeout_s:g}s (no leader with a majority); "
                             "it may still commit", code="no_leader") from None

    # -------------------------------------------------------------------------------------- driver

    async def _drive(self) -> None:
        raft = self.raft
        while not self._is_closing:
            await self._wake.wait()
            self._wake.clear()
            while not self._is_closing:
                self._feed()
                if raft.has_ready():
                    await self._process(raft.ready())
                elif not await self._maybe_compact():
                    break
                self._check_status()
            self._check_status()

    def _feed(self) -> None:
        """Give the core everything queued since the last Ready: messages, then ticks, then proposals."""
        raft = self.raft
        inbox, self._inbox = self._inbox, []
        for message in inbox:
            raft.step(message)
        num_ticks, self._num_ticks = self._num_ticks, 0
        for _ in range(num_ticks):
            raft.tick()
        self._proposals.propose_queued(raft)

    async def _process(self, ready: Ready) -> None:
        if ready.has_state_to_persist:
            await asyncio.to_thread(self._persist, ready)
        for message in ready.messages:
            self._send_raft(message)
        outcomes = (await asyncio.to_thread(apply_committed, self._machine, ready.committed)
                    if ready.committed else [])
        self.raft.advance(ready)
        if ready.restore_snapshot:
            assert ready.snapshot is not None
            self._proposals.replaced_by_snapshot(ready.snapshot.index,
                                                 Overloaded("outcome unknown: replaced by a snapshot"))
            self._notify_listeners(None, None)
        for entry, command, result in outcomes:
            if command is not None:
                self._notify_listeners(command, result)
            self._proposals.applied(entry, result)
        self._proposals.reached(self.raft.applied_index)

    def _persist(self, ready: Ready) -> None:
        """Thread: step 1 (persist, then restore the snapshot if asked)."""
        self._storage.save(ready)
        if ready.restore_snapshot:
            assert ready.snapshot is not None
            self._machine.restore(ready.snapshot.data, ready.snapshot.index)

    async def _maybe_compact(self) -> bool:
        raft = self.raft
        if raft.applied_index - raft.snapshot.index < self.timing.compact_every_entries:
            return False
        # The driver is the only writer, so this is the state at the core's applied index.
        index, data = await asyncio.to_thread(self._machine.snapshot)
        raft.compact(index, data)
        log.debug("log compacted", extra={"index": index, "snapshot_bytes": len(data)})
        return True

    def _check_status(self) -> None:
        raft = self.raft
        self.has_been_voter = self.has_been_voter or self.node_id in raft.voters
        status = (raft.role, raft.term, raft.leader_id, raft.voters)
        if status != self._last_status:
            if status[1:] != self._last_status[1:]:
                log.info("raft status", extra={"role": raft.role.value, "term": raft.term,
                                               "leader": raft.leader_id, "voters": list(raft.voters)})
            self._last_status = status
            self._changed.set()
            self._changed = asyncio.Event()

    def _notify_listeners(self, command: Command | None, result: Any) -> None:
        for listener in self._apply_listeners:
            try:
                listener(command, result)
            except Exception:
                log.exception("apply listener failed")

    def _on_driver_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.critical("raft driver failed; this node no longer takes part in the cluster",
                         exc_info=task.exception())
            self._proposals.fail_all(Overloaded("the cluster node failed", code="no_leader"))

    # ------------------------------------------------------------------------------------ transport

    def _send_raft(self, message: RaftMessage) -> None:
        body = message.to_wire()
        for key in ("type", "sender", "term"):  # carried by the transport header
            del body[key]
        try:
            self.transport.send(message.to, Message(message.type.value, self.node_id, message.term, body))
        except ValueError as exc:  # e.g. a snapshot over the frame limit: say so, Raft cannot fix it
            log.error("raft message not sent", extra={"to": message.to, "type": message.type.value,
                                                       "error": str(exc)})

    async def _receive(self) -> None:
        async for message in self.transport:
            self.last_seen[message.sender] = time.monotonic()
            if message.type not in RAFT_MESSAGE_TYPES:
                handler = self._handlers.get(message.type)
                if handler is None:
                    log.debug("unknown peer message type", extra={"type": message.type, "from": message.sender})
                    continue
                try:
                    handler(message)
                except Exception:
                    log.exception("peer message handler failed", extra={"type": message.type})
                continue
            decoded = self._decode_raft(message)
            if decoded is not None and len(self._inbox) < MAX_INBOX:
                self._inbox.append(decoded)
                self._wake.set()

    def _decode_raft(self, message: Message) -> RaftMessage | None:
        body = message.body
        if not isinstance(body, dict) or {"type", "sender", "term"} & body.keys():
            return None
        try:
            decoded = RaftMessage.from_wire({**body, "type": message.type, "sender": message.sender,
                                             "term": message.term})
        except WireError as exc:
            log.debug("malformed raft message", extra={"from": message.sender, "error": str(exc)})
            return None
        return decoded if decoded.to == self.node_id else None

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        tick_s = self.timing.tick_s
        next_at = loop.time()
        while True:
            next_at += tick_s
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            behind = loop.time() - next_at
            if behind > tick_s * self.timing.raft.election_ticks_min:
                next_at = loop.time()  # the loop was stalled: don't replay a burst of ticks
            self._num_ticks += 1
            self._wake.set()
