"""How far an instance's start has come, and what a request waiting for an instance sees of it.

`StartProgress` hangs off each instance (`Instance.progress`): `Lifecycle._start` moves it through its
phases, and a repository fetch's worker threads count bytes into it. `GET /admin/models/{name}` shows it, and
so does a streaming client waiting on a cold start: its request carries a `StartWatch`, which admission (or,
for a relayed request, the peer channel) points at the start the request waits for; `StartWatch.reporting`
passes what it sees on (as SSE comments, or as PROGRESS frames back to the entry node) while the request
waits.

The engine loads the checkpoint and initialises in one call that reports nothing until it is done, so the
LOADING phase counts no bytes: only a fetch does (`bytes_done` is None where nothing is counted).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from sllmd.checkpoint.progress import human_bytes
from sllmd.types import Tier

REPORT_INTERVAL_S = 1.0  # a waiting request hears of its start at least this often
POLL_S = 0.2  # how soon a phase change is passed on


class StartPhase(enum.StrEnum):
    PENDING = "pending"  # not begun: waiting for the memory an evicted instance frees
    FETCHING = "fetching"  # copying the checkpoint into this node's store, from a peer or the repository
    CREATING = "creating"  # building the engine
    LOADING = "loading"  # the engine loads the checkpoint onto its device, then initialises


@dataclass(frozen=True, slots=True)
class StartView:
    """A start's progress at one moment, as the admin API and the peer channel carry it."""

    phase: StartPhase
    tier: Tier  # where the checkpoint's bytes come from
    bytes_done: int | None  # of the phase, when it counts bytes (a fetch); else None
    bytes_total: int
    elapsed_s: float  # since the start began
    estimated_s: float  # what the start was estimated to take, when it began

    def to_wire(self) -> dict[str, Any]:
        return {"phase": self.phase.value, "tier": self.tier.value, "bytes_done": self.bytes_done,
                "bytes_total": self.bytes_total, "elapsed_s": round(self.elapsed_s, 3),
                "estimated_s": round(self.estimated_s, 3)}

    @classmethod
    def from_wire(cls, raw: Any) -> StartView:
        """`to_wire()`'s dict as a view; ValueError when it is not one."""
        if not isinstance(raw, dict):
            raise ValueError("start progress must be an object")
        done, total, elapsed, estimated = (raw.get(k) for k in ("bytes_done", "bytes_total", "elapsed_s",
                                                                "estimated_s"))
        if not (done is None or _is_count(done)) or not _is_count(total) or not all(
                _is_seconds(s) for s in (elapsed, estimated)):
            raise ValueError(f"malformed start progress {raw!r}")
        return cls(StartPhase(raw.get("phase")), Tier(raw.get("tier")), done, total, float(elapsed),
                   float(estimated))

    def describe(self) -> str:
        """One line for people: "loading from ssd, 1.8 MiB, 0.4 s of an estimated 3.0 s"."""
        size = human_bytes(self.bytes_total)
        if self.bytes_done is not None:
            size = f"{human_bytes(self.bytes_done)} of {size}"
        return (f"{self.phase.value} from {self.tier.value}, {size}, {self.elapsed_s:.1f} s of an estimated "
                f"{self.estimated_s:.1f} s")


class StartProgress:
    """One instance's start. Phases change on the event loop; `count` may come from any thread. Each is a few
    attribute stores (a reader may see one update half made, never a value nobody wrote)."""

    def __init__(self) -> None:
        self.phase = StartPhase.PENDING
        self.tier = Tier.SSD
        self.bytes_done: int | None = None
        self.bytes_total = 0
        self.estimated_s = 0.0
        self.began = time.monotonic()

    def begin(self, tier: Tier, bytes_total: int, estimated_s: float) -> None:
        """The start began: its checkpoint comes from `tier`, `bytes_total` bytes, in about `estimated_s`."""
        self.tier, self.bytes_total, self.estimated_s = tier, bytes_total, estimated_s

    def enter(self, phase: StartPhase, *, tier: Tier | None = None) -> None:
        """`phase` began (the bytes now come from `tier`, when given)."""
        self.phase, self.bytes_done = phase, None
        if tier is not None:
            self.tier = tier

    def count(self, step: str, bytes_done: int, bytes_total: int) -> None:
        """A fetch's `fetch.Progress` callback: `bytes_done` of `bytes_total` of its `step` so far."""
        self.bytes_done, self.bytes_total = bytes_done, bytes_total

    def view(self) -> StartView:
        return StartView(self.phase, self.tier, self.bytes_done, self.bytes_total, time.monotonic() - self.began,
                         self.estimated_s)


class StartWatch:
    """What one request lets its client see of its wait for an instance. The serving path calls `waiting`
    when the request begins to wait, with a `look` that tells at any moment which start it waits for (None:
    none, e.g. no room to start one yet). Event loop only; `reporting` once per watch."""

    def __init__(self) -> None:
        self._look: Callable[[], StartView | None] | None = None
        self._woken = asyncio.Event()
        self._is_done = False

    def waiting(self, look: Callable[[], StartView | None]) -> None:
        self._look = look
        self._woken.set()

    @asynccontextmanager
    async def reporting(self, send: Callable[[StartView | None], Awaitable[None]]) -> AsyncIterator[None]:
        """While the block runs, once the request waits: `send(what it waits for)` at once, then on each phase
        change (within POLL_S) and at least every REPORT_INTERVAL_S. Leaving waits for a send under way, so the
        caller's own writes never interleave with one. A send failing with ConnectionError (the client went
        away) ends the reporting; the request's own writes find out the same way."""
        reporter = asyncio.create_task(self._report(send))
        try:
            yield
        finally:
            self._is_done = True
            self._woken.set()
            await reporter

    async def _report(self, send: Callable[[StartView | None], Awaitable[None]]) -> None:
        loop = asyncio.get_running_loop()
        sent_at, sent_phase = -math.inf, None
        while True:
            self._woken.clear()
            if self._is_done:
                return
            timeout_s = None  # until the request waits, only `waiting` or the block's end wake the reporter
            if self._look is not None:
                view = self._look()
                phase = None if view is None else view.phase
                if phase != sent_phase or loop.time() - sent_at >= REPORT_INTERVAL_S:
                    try:
                        await send(view)
                    except ConnectionError:
                        return
                    sent_at, sent_phase = loop.time(), phase
                timeout_s = POLL_S
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await self._woken.wait()


def describe_wait(model: str, view: StartView | None) -> str:
    """What a request for `model` waits for, in one line for people."""
    if view is None:
        return f"waiting for an instance of '{model}'"
    return f"waiting for '{model}' to start: {view.describe()}"


def _is_count(value: object) -> bool:
    return type(value) is int and value >= 0


def _is_seconds(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
