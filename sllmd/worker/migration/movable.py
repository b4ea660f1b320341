"""The token source of one request on the node that holds its stream: its local engine, or — after a live
migration's cut-over — the tokens the destination pushes over the peer transport.

The router iterates `MovableRequest.tokens()` and never learns where the tokens come from, so the text
it detokenises, the SSE stream it writes (or relays to an entry node) and the usage it counts stay in
one place for the request's whole life. A migration drives the switch:

* `pause()` (synchronous) fixes the sequence at the tokens already handed out; a token the engine
  produces after that instant is dropped, never yielded (the destination computes it again, and
  identically: sampling is keyed by (seed, position)). The local generator is closed at once.
* `use_remote(tokens)` continues from a `RemoteTokens` feed; `resume_local()` continues on the local
  engine again from prompt + tokens so far (a migration that failed before the source let go).

Not thread-safe: the event loop only. One consumer per request.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable

from sllmd.errors import EngineFailed
from sllmd.types import SamplingParams
from sllmd.worker.instance import Instance

LIVENESS_CHECK_S = 0.25  # how often a silent feed asks whether its sender is still alive


class RemoteTokens:
    """Tokens of one request pushed by a peer, in order. `push` runs from the peer message handler."""

    def __init__(self, sender: str, is_alive: Callable[[str], bool]) -> None:
        self.sender = sender
        self.is_alive = is_alive
        self._queue: asyncio.Queue[tuple[int, list[int], str]] = asyncio.Queue()
        self._buffer: list[int] = []
        self._num_received = 0
        # Called once when the request ends, with whether it finished (else its consumer stopped early).
        self.on_close: Callable[[bool], None] | None = None

    def push(self, index: int, tokens: list[int], error: str) -> None:
        self._queue.put_nowait((index, tokens, error))

    async def next(self) -> int:
        """The next token; EngineFailed when the peer reported an error, lost a message or went away."""
        while not self._buffer:
            try:
                index, tokens, error = await asyncio.wait_for(self._queue.get(), LIVENESS_CHECK_S)
            except TimeoutError:
                if not self.is_alive(self.sender):
                    raise EngineFailed(f"node {self.sender} serving the migrated request is gone") from None
                continue
            if error:
                raise EngineFailed(f"migrated request failed on {self.sender}: {error}")
            if index != self._num_received:
                raise EngineFailed(f"tokens from {self.sender} were lost (got #{index}, expected "
                                   f"#{self._num_received})")
            self._num_received += len(tokens)
            self._buffer += tokens
        return self._buffer.pop(0)


class MovableRequest:
    """One in-flight request of an instance on this node; registered in `instance.requests` from its
    creation until its stream ends or `close()`, so a migration finds every request it must move
    (also one whose stream has not started yet). The owner must call `close()` when done with it."""

    def __init__(self, instance: Instance, prompt_ids: list[int], params: SamplingParams) -> None:
        self.instance = instance
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.tokens: list[int] = []  # handed to the consumer, in order
        self._local: AsyncIterator[int] | None = None
        self._remote: RemoteTokens | None = None
        self._is_paused = False
        self._num_pauses = 0  # a local token is valid only if no pause() happened while it was awaited
        self._switched = asyncio.Event()
        self._is_closed = False
        instance.requests.add(self)

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens: the sequence a destination must prefill."""
        return len(self.prompt_ids) + len(self.tokens)

    @property
    def sequence(self) -> list[int]:
        return self.prompt_ids + self.tokens

    @property
    def num_remaining(self) -> int:
        """Tokens still to generate; 0 once max_tokens or a stop token was reached."""
        if self.tokens and self.tokens[-1] in self.params.stop_token_ids:
            return 0
        return self.params.max_tokens - len(self.tokens)

    def pause(self) -> int:
        """Stop taking tokens from the local engine; returns the number of tokens generated so far,
        which no later token changes until `use_remote` or `resume_local`."""
        self._is_paused = True
        self._num_pauses += 1
        self._switched.clear()
        return len(self.tokens)

    def use_remote(self, remote: RemoteTokens) -> None:
        self._remote, self._is_paused = remote, False
        self._switched.set()

    def resume_local(self) -> None:
        self._remote, self._is_paused = None, False
        self._switched.set()

    async def stream(self) -> AsyncIterator[int]:
        """Every generated token once, in order, wherever it was computed."""
        try:
            while self.num_remaining > 0:
                token = await self._next()
                self.tokens.append(token)
                yield token
        finally:
            await self._close_local()
            self.close()

    def close(self) -> None:
        """Deregister (idempotent); a request that moved tells its feed whether it finished."""
        if self._is_closed:
            return
        self._is_closed = True
        self.instance.requests.discard(self)
        if self._remote is not None and self._remote.on_close is not None:
            self._remote.on_close(self.num_remaining == 0)

    async def _next(self) -> int:
        while True:
            if self._is_paused:
                await self._close_local()
                await self._switched.wait()
                continue
            if self._remote is not None:
                return await self._remote.next()
            if self._local is None:
                engine = self.instance.engine
                if engine is None:
                    raise EngineFailed("the instance is not running")
                rest = dataclasses.replace(self.params, max_tokens=self.num_remaining)
                self._local = engine.generate(self.sequence, rest)
            num_pauses = self._num_pauses
            try:
                token = await anext(self._local)
            except StopAsyncIteration:
                raise EngineFailed("the engine ended the request early") from None
            if num_pauses == self._num_pauses:
                return token
            # produced after pause() (the source may have switched meanwhile): dropped, its new
            # source computes it again, identically
            await self._close_local()

    async def _close_local(self) -> None:
        if self._local is not None:
            local, self._local = self._local, None
            await local.aclose()  # type: ignore[attr-defined]

