"""The destination half of live migration (protocol: `sllmd.worker.migration.source`).

One session per incoming migration, driven by one task that handles the source's messages in order:
BEGIN leases an instance of the model through the worker's normal path (a cold start if needed) and
holds it; each CATCH_UP extends one prefill handle per request (`Engine.prefill` / `Prefill.extend`);
CUT_OVER starts one task per request, each holding the instance (`Worker.hold`, so keep-alive and
scaling see it) and generating from its prefilled cache, pushing every token to the source as it
comes (TOKENS, numbered). Then the session's own lease ends; the requests' holds remain.

Failures: a source that goes silent (no message for ALIVE_WINDOW_S) before the cut-over, or a CANCEL,
ends the session and frees its caches; after the cut-over a push that cannot be queued (the source is
gone) or a CANCEL for the request stops that request's generation. Either way nothing stays held.

Not thread-safe: the event loop only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from contextlib import AsyncExitStack, aclosing
from dataclasses import dataclass, field
from typing import Any

from sllmd.cluster.transport import Message
from sllmd.engine.base import Engine, Prefill
from sllmd.errors import SllmdError
from sllmd.types import SamplingParams
from sllmd.worker.instance import Instance, ModelRuntime
from sllmd.worker.manager import Worker
from sllmd.worker.migration.messages import (
    ALL_REQUESTS,
    Begin,
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
    keyed_ids,
    token_ids,
)
from sllmd.worker.migration.movable import LIVENESS_CHECK_S

log = logging.getLogger(__name__)

Send = Callable[[str, MigrationMessage, Any], bool]


class _SourceGone(Exception):
    pass


@dataclass(eq=False)
class _Incoming:
    migration_id: str
    source: str
    model: str
    inbox: asyncio.Queue[tuple[str, Any]] = field(default_factory=asyncio.Queue)
    handles: dict[int, Prefill] = field(default_factory=dict)
    sequences: dict[int, list[int]] = field(default_factory=dict)  # the ids each handle covers
    requests: dict[int, asyncio.Task[None]] = field(default_factory=dict)
    driver: asyncio.Task[None] | None = None


class Destination:
    def __init__(self, worker: Worker, send: Send, is_alive: Callable[[str], bool]) -> None:
        self.worker = worker
        self.send = send
        self.is_alive = is_alive
        self._sessions: dict[tuple[str, str], _Incoming] = {}  # (source, migration id) -> session

    def handlers(self) -> dict[MigrationMessage, Callable[[Message], None]]:
        return {MigrationMessage.BEGIN: self._on_begin, MigrationMessage.CATCH_UP: self._on_step,
                MigrationMessage.CUT_OVER: self._on_step, MigrationMessage.CANCEL: self._on_cancel}

    @property
    def num_sessions(self) -> int:
        """Incoming migrations not yet cut over or given up."""
        return sum(1 for s in self._sessions.values() if s.driver is not None and not s.driver.done())

    def _on_begin(self, message: Message) -> None:
        try:
            begin = decode(Begin, message.body)
        except WireError as exc:
            log.warning("malformed migration message", extra={"from": message.sender, "error": str(exc)})
            return
        key = (message.sender, begin.migration_id)
        if key in self._sessions:
            return  # a duplicate
        session = self._sessions[key] = _Incoming(begin.migration_id, message.sender, begin.model)
        session.driver = asyncio.get_running_loop().create_task(self._drive(session))
        session.driver.add_done_callback(lambda _: self._forget(session))

    def _on_step(self, message: Message) -> None:
        migration_id = message.body.get("migration_id") if isinstance(message.body, dict) else None
        session = self._sessions.get((message.sender, migration_id)) if isinstance(migration_id, str) else None
        if session is not None:
            session.inbox.put_nowait((message.type, message.body))

    def _on_cancel(self, message: Message) -> None:
        try:
            cancel = decode(Cancel, message.body)
        except WireError:
            return
        session = self._sessions.get((message.sender, cancel.migration_id))
        if session is None:
            return
        if cancel.key == ALL_REQUESTS:
            for task in [session.driver, *session.requests.values()]:
                if task is not None:
                    task.cancel()
        elif (task := session.requests.get(cancel.key)) is not None:
            task.cancel()

    def _forget(self, session: _Incoming) -> None:
        if (session.driver is None or session.driver.done()) and not session.requests:
            self._sessions.pop((session.source, session.migration_id), None)

    async def _drive(self, session: _Incoming) -> None:
        try:
            async with AsyncExitStack() as stack:
                try:
                    instance = await stack.enter_async_context(self.worker.lease(session.model))
                except SllmdError as exc:
                    self.send(session.source, MigrationMessage.READY, Ready(session.migration_id, exc.message))
                    return
                runtime = self.worker.runtimes[session.model]
                self.send(session.source, MigrationMessage.READY, Ready(session.migration_id))
                while not await self._step(session, runtime, instance):
                    pass
        except _SourceGone:
            log.warning("migration source went silent; dropping its requests",
                        extra={"from": session.source, "migration": session.migration_id})
        except WireError as exc:
            log.warning("malformed migration message", extra={"from": session.source, "error": str(exc)})
        finally:
            for handle in session.handles.values():
                handle.close()  # no-op for those a request took over

    async def _step(self, session: _Incoming, runtime: ModelRuntime, instance: Instance) -> bool:
        """Handle the source's next message; True once the requests are cut over."""
        kind, raw = await self._next_message(session)
        engine = instance.engine
        assert engine is not None, "leased instances are ready"
        if kind == MigrationMessage.CATCH_UP:
            catch_up = decode(CatchUp, raw)
            error = ""
            try:
                for key, ids in keyed_ids(catch_up.appended, "appended").items():
                    await self._extend(session, engine, key, ids)
            except SllmdError as exc:
                error = exc.message
            counts = [[key, handle.num_tokens] for key, handle in session.handles.items()]
            self.send(session.source, MigrationMessage.CAUGHT_UP,
                      CaughtUp(session.migration_id, catch_up.round, counts, error))
            return False
        cut_over = decode(CutOver, raw)
        moved = [decode(MovedRequest, r) for r in cut_over.requests]
        error = ""
        try:
            for request in moved:
                await self._extend(session, engine, request.key, token_ids(request.tail, "tail"))
                handle = session.handles[request.key]
                if handle.num_tokens != request.position:
                    raise WireError(f"request {request.key}: {handle.num_tokens} ids held, position {request.position}")
        except (SllmdError, WireError, KeyError) as exc:
            error = getattr(exc, "message", None) or str(exc)
        if not error:
            loop = asyncio.get_running_loop()
            for request in moved:  # each task owns its handle from here (the session's finally skips it)
                handle, sequence = session.handles.pop(request.key), session.sequences.pop(request.key)
                task = loop.create_task(self._generate(session, runtime, instance, handle, sequence, request))
                session.requests[request.key] = task
                task.add_done_callback(lambda _, key=request.key: self._request_done(session, key))
        self.send(session.source, MigrationMessage.CUT_OVER_ACK, CutOverAck(session.migration_id, error))
        return True

    async def _extend(self, session: _Incoming, engine: Engine, key: int, ids: list[int]) -> None:
        if not ids:
            return
        handle = session.handles.get(key)
        if handle is None:
            session.handles[key] = await engine.prefill(ids)
        else:
            await handle.extend(ids)
        session.sequences.setdefault(key, []).extend(ids)

    async def _next_message(self, session: _Incoming) -> tuple[str, Any]:
        while True:
            try:
                return await asyncio.wait_for(session.inbox.get(), LIVENESS_CHECK_S)
            except TimeoutError:
                if not self.is_alive(session.source):
                    raise _SourceGone() from None

    async def _generate(self, session: _Incoming, runtime: ModelRuntime, instance: Instance, handle: Prefill,
                        sequence: list[int], moved: MovedRequest) -> None:
        engine = instance.engine
        assert engine is not None, "held instances are ready"
        params = SamplingParams(moved.max_tokens, moved.temperature, moved.top_p, moved.seed,
                                frozenset(moved.stop_token_ids))
        num_sent = 0
        async with self.worker.hold(runtime, instance):
            try:
                async with aclosing(engine.generate(sequence, params, prefilled=handle)) as tokens:
                    async for token in tokens:
                        body = Tokens(session.migration_id, moved.key, num_sent, [token])
                        if not self.send(session.source, MigrationMessage.TOKENS, body):
                            log.warning("migration source unreachable; stopping its request",
                                        extra={"from": session.source, "migration": session.migration_id})
                            return
                        num_sent += 1
            except SllmdError as exc:
                self.send(session.source, MigrationMessage.TOKENS,
                          Tokens(session.migration_id, moved.key, num_sent, [], exc.message))
            finally:
                handle.close()

    def _request_done(self, session: _Incoming, key: int) -> None:
        session.requests.pop(key, None)
        self._forget(session)

    async def close(self) -> None:
        """Cancel every incoming session and moved request (node shutdown) and wait for them."""
        tasks = [t for s in list(self._sessions.values()) for t in [s.driver, *s.requests.values()] if t]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
