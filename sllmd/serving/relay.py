"""The internal generate hop: a node relays a request to the node that serves it and streams back the
token ids generated there.

The entry node has already validated and tokenised the request and fixed its sampling, so what crosses
is a `TokenRequest` (`POST GENERATE_PATH`, its `to_wire()` as JSON): ids and sampling parameters, no
OpenAI fields. The serving node never parses, tokenises or renders text; it answers in this module's
internal SSE shape, token ids and no text:

    data: {"token_ids": [5, 17]}                                  generated ids, in order (one or more)
    data: {"usage": {"prompt_tokens": P, "completion_tokens": N}}  the end: N ids were sent in all
    data: [DONE]

or, after a failure, `data: {"error": ERROR}` then `data: [DONE]`, ERROR being `SllmdError.to_wire()`.
The entry node detokenises and applies stop strings itself (`sllmd.serving.pipeline`), with the same
code as for a local request, so the chat template is applied once and the entry node always knows
exactly which tokens the client has seen: it can resume the request elsewhere from them (prompt +
tokens so far) when the serving node dies.

Errors keep their identity: a serving node's error, answered before the stream (with its status, the body
`{"error": ERROR}`) or as an error event within it, is raised here again as the same error class with the
same fields (`errors.error_from_wire`); a serving node that cannot be reached or stops mid-stream
(connection reset, EOF without the end event and [DONE], no byte within the read timeout) is `RelayFailed`
(502).

Not thread-safe: one `Relay` per node, used from its event loop.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing, asynccontextmanager
from typing import Any

import aiohttp

from sllmd.errors import EngineFailed, SllmdError, error_from_wire
from sllmd.serving.request import TokenRequest

GENERATE_PATH = "/internal/generate"
CONNECT_TIMEOUT_S = 2.0
READ_SLACK_S = 30.0  # beyond the longest a serving node waits for a cold start, before a silent peer counts as dead


class RelayFailed(SllmdError):
    """The serving node could not be reached, or its answer broke off; a retry goes elsewhere."""

    status = 502
    error_type = "server_error"

    def __init__(self, message: str, *, is_connect: bool = False) -> None:
        super().__init__(message, code="relay_failed")
        self.is_connect = is_connect  # nothing reached the serving node: safe to try another


class Relay:
    """Owns the node's one HTTP client session (made on first use, closed by `close`)."""

    def __init__(self, node_id: str, *, api_key: str | None = None, read_timeout_s: float = 90.0) -> None:
        self.node_id = node_id
        self.api_key = api_key
        self.timeout = aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT_S, sock_read=read_timeout_s)
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # Nodes set no cookies; a real jar would be consulted on every request and answer.
            self._session = aiohttp.ClientSession(timeout=self.timeout, auto_decompress=False,
                                                  cookie_jar=aiohttp.DummyCookieJar())
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @asynccontextmanager
    async def open(self, address: str, request: TokenRequest) -> AsyncIterator[AsyncIterator[int]]:
        """The token ids the serving node at `address` generates for `request`. Entering raises the serving
        node's error (nothing streamed yet); iterating may raise SllmdError mid-stream."""
        headers = {"Accept": "text/event-stream", "Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        try:
            response = await self._client().post(f"http://{address}{GENERATE_PATH}", headers=headers,
                                                  data=json.dumps(request.to_wire(), separators=(",", ":")).encode())
        except (aiohttp.ClientError, TimeoutError) as exc:
            is_connect = isinstance(exc, aiohttp.ClientConnectorError)  # refused or unroutable: never sent
            raise RelayFailed(f"node at {address} did not answer: {exc!r}", is_connect=is_connect) from None
        async with response:
            if response.status != 200:
                raise await _http_error(response)
            async with aclosing(_token_ids(response, address)) as tokens:
                yield tokens

    async def call(self, address: str, path: str, body: dict[str, Any], headers: dict[str, str] | None = None
                   ) -> tuple[int, Any]:
        """POST `body` as JSON to another node's `path` (with this cluster's API key); (status, JSON answer).
        `RelayFailed` if the node cannot be reached or its answer is not JSON."""
        headers = dict(headers or {})
        if self.api_key and "Authorization" not in headers:
            headers["Authorization"] = f"Bearer {self.api_key}"
        try:
            async with self._client().post(f"http://{address}{path}", json=body, headers=headers) as answer:
                return answer.status, await answer.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise RelayFailed(f"node at {address} did not answer {path}: {exc!r}",
                              is_connect=isinstance(exc, aiohttp.ClientConnectorError)) from None


def token_ids_event(token_ids: Sequence[int]) -> bytes:
    """The serving node's SSE event carrying generated ids (see the module docstring)."""
    return b'data: {"token_ids":[' + ",".join(map(str, token_ids)).encode() + b"]}\n\n"


def end_event(num_prompt_tokens: int, num_generated: int) -> bytes:
    """The serving node's last event before [DONE]: every generated id has been sent."""
    usage = {"prompt_tokens": num_prompt_tokens, "completion_tokens": num_generated}
    return f"data: {json.dumps({'usage': usage}, separators=(',', ':'))}\n\n".encode()


def error_event(error: SllmdError) -> bytes:
    """The serving node's event for a failure after its stream began (see the module docstring)."""
    return f"data: {json.dumps({'error': error.to_wire()}, separators=(',', ':'))}\n\n".encode()


async def _token_ids(response: aiohttp.ClientResponse, address: str) -> AsyncIterator[int]:
    num_received = 0
    is_finished = False
    try:
        async for raw in response.content:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue  # blank separators, comments
            data = line[5:].strip()
            if data == b"[DONE]":
                if not is_finished:
                    raise RelayFailed(f"node at {address} ended the stream without a result")
                return
            chunk = json.loads(data)
            if "error" in chunk:
                raise error_from_wire(chunk["error"])
            if "usage" in chunk:
                if chunk["usage"]["completion_tokens"] != num_received:
                    raise ValueError(f"{chunk['usage']['completion_tokens']} tokens counted, {num_received} sent")
                is_finished = True
                continue
            for token in chunk["token_ids"]:
                if type(token) is not int:
                    raise TypeError(f"token id {token!r}")
                num_received += 1
                yield token
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise RelayFailed(f"node at {address} broke off the stream: {exc!r}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise RelayFailed(f"node at {address} sent a malformed event: {exc!r}") from None
    raise RelayFailed(f"node at {address} closed the stream before [DONE]")


async def _http_error(response: aiohttp.ClientResponse) -> SllmdError:
    """The serving node's error answer as the error it raised; one that is not in the internal shape (a
    middleware's refusal: a wrong API key, a body too large) as EngineFailed naming the status."""
    try:
        error = (await response.json(content_type=None))["error"]
    except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError):
        error = None
    if isinstance(error, dict) and "kind" in error:
        return error_from_wire(error)
    message = error.get("message") if isinstance(error, dict) else None
    return EngineFailed(f"serving node answered HTTP {response.status}: {message or 'no error body'}",
                        code="relay_refused")
