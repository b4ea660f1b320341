"""The aiohttp application: one route table, typed app state, one error middleware."""

from __future__ import annotations

import functools
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from sllmd.errors import InvalidRequest, NotFound, SllmdError, Unauthorized
from sllmd.http import admin_api, keys, openai_api, peer_api
from sllmd.node import Node

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
OPEN_PATHS = frozenset({"/health", "/metrics"})


def error_response(error: SllmdError) -> web.Response:
    headers = {}
    if getattr(error, "retry_after_s", None) is not None:
        headers["Retry-After"] = str(error.retry_after_s)
    return web.json_response(error.to_body(), status=error.status, headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure leaves as an OpenAI-style JSON error body with a real status."""
    began = time.monotonic()
    try:
        response = await handler(request)
    except SllmdError as error:
        response = error_response(error)
    except web.RequestPayloadError as exc:  # e.g. Content-Encoding: gzip over a body that is not gzip
        cause = exc.__cause__
        reason = cause.message if isinstance(cause, HttpProcessingError) and cause.message else str(cause or exc)
        response = error_response(InvalidRequest(f"the request body cannot be decoded: {reason}",
                                                 code="undecodable_body"))
    except web.HTTPRequestEntityTooLarge as exc:
        response = error_response(InvalidRequest(f"request body too large ({exc.text})", code="body_too_large"))
        response.set_status(413)
    except web.HTTPNotFound:
        response = error_response(NotFound(f"no route {request.method} {request.path}", code="unknown_route"))
    except web.HTTPMethodNotAllowed as exc:
        error = InvalidRequest(f"method {request.method} not allowed on {request.path}", code="method_not_allowed")
        response = error_response(error)
        response.set_status(405)
        response.headers["Allow"] = ",".join(sorted(exc.allowed_methods))
    except web.HTTPException:
        raise
    except Exception:
        log.exception("unhandled error", extra={"path": request.path})
        response = error_response(SllmdError("internal server error"))
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    request.app[keys.METRICS].requests.labels(route, str(response.status)).inc()
    if request.path not in OPEN_PATHS:
        log.debug("request", extra={"method": request.method, "path": request.path, "status": response.status,
                                    "ms": round((time.monotonic() - began) * 1000, 2)})
    return response


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    api_keys = request.app[keys.CONFIG].server.api_keys
    if api_keys and request.path not in OPEN_PATHS:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(token.strip(), key) for key in api_keys):
            raise Unauthorized("missing or invalid API key (send Authorization: Bearer KEY)", code="invalid_api_key")
    return await handler(request)


async def health(request: web.Request) -> web.Response:
    uptime_s = round(time.time() - request.app[keys.STARTED_AT], 3)
    return web.json_response({"status": "ok", "node_id": request.app[keys.STATE].node_id, "uptime_s": uptime_s})


async def metrics(request: web.Request) -> web.Response:
    body = request.app[keys.METRICS].render()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


def build_app(node: Node) -> web.Application:
    """The node's HTTP application. The node runs while the app does: the app's startup starts it (before any
    request can arrive) and its cleanup closes it (after the last handler ended)."""
    app = web.Application(
        middlewares=[error_middleware, auth_middleware], client_max_size=node.config.server.max_body_bytes
    )
    app[keys.CONFIG] = node.config
    app[keys.STATE] = node.state
    app[keys.WORKER] = node.worker
    app[keys.ROUTER] = node.router
    app[keys.DEPLOYMENTS] = node.deployments
    app[keys.MIGRATIONS] = node.migrations
    app[keys.RELAY] = node.relay
    app[keys.METRICS] = node.metrics
    app[keys.STARTED_AT] = node.started_at
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    openai_api.add_routes(app.router)
    admin_api.add_routes(app.router)
    peer_api.add_routes(app)
    app.cleanup_ctx.append(functools.partial(_running, node))
    return app


async def _running(node: Node, app: web.Application) -> AsyncIterator[None]:
    try:
        await node.start()
    except BaseException:
        await node.close()  # what the failed start opened
        raise
    yield
    await node.close()
