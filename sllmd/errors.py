"""Domain errors. Each carries the HTTP status and OpenAI error fields it maps to.

The HTTP layer's one error middleware turns any `SllmdError` into
`{"error": {"message", "type", "param", "code"}}` with `status`; nothing else builds error bodies.
"""

from __future__ import annotations


class SllmdError(Exception):
    """Base of every error that reaches a client. Subclasses fix status and type."""

    status: int = 500
    error_type: str = "server_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def to_body(self) -> dict:
        return {
            "error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}
        }

    def to_wire(self) -> dict:
        """The error as it crosses between nodes (a forwarded write's answer, a relayed request): its
        class by name and fields, so the other node raises it again as it was (`error_from_wire`)."""
        return {"kind": type(self).__name__, "message": self.message, "param": self.param, "code": self.code,
                "retry_after_s": getattr(self, "retry_after_s", None)}


class InvalidRequest(SllmdError):
    """Malformed, missing, wrongly typed or out-of-range input."""

    status = 400
    error_type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    def __init__(self, message: str, *, param: str | None = "messages") -> None:
        super().__init__(message, param=param, code="context_length_exceeded")


class UnsupportedArchitecture(InvalidRequest):
    """A model a backend cannot serve correctly: refused at deploy time, never served wrong."""

    def __init__(self, message: str, *, backend: str) -> None:
        super().__init__(f"backend {backend} cannot serve this model: {message}", param="checkpoint",
                         code="unsupported_architecture")


class Unauthorized(SllmdError):
    status = 401
    error_type = "authentication_error"


class NotFound(SllmdError):
    status = 404
    error_type = "not_found_error"


class ModelNotFound(NotFound):
    def __init__(self, model: str) -> None:
        super().__init__(f"The model '{model}' does not exist.", param="model", code="model_not_found")


class Conflict(SllmdError):
    status = 409
    error_type = "conflict_error"


class Overloaded(SllmdError):
    """The node cannot take the request now; the client should retry after `retry_after_s`."""

    status = 503
    error_type = "overloaded_error"

    def __init__(self, message: str, *, retry_after_s: int = 1, code: str | None = "overloaded") -> None:
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s


class QueueFull(Overloaded):
    """A model's requests in flight and waiting are at their bound: the client sends too many at once, so 429,
    with OpenAI's rate-limit shape (the SDKs raise `RateLimitError` and back off by `Retry-After`)."""

    status = 429
    error_type = "rate_limit_error"

    def __init__(self, model: str, capacity: int, *, retry_after_s: int = 1) -> None:
        super().__init__(f"model '{model}' is at its bound of {capacity} requests in flight or waiting (ready "
                         "instances x target_concurrency + serving.max_queue_per_model); retry later",
                         retry_after_s=retry_after_s, code="queue_full")


class EngineFailed(SllmdError):
    """An engine could not start or died while generating."""

    status = 500
    error_type = "server_error"



def error_from_wire(wire: object) -> SllmdError:
    """`SllmdError.to_wire()`'s dict as the same error class (by name, among SllmdError's subclasses) with the
    same message, param, code and retry hint; a plain SllmdError (500) when the kind is unknown or the dict
    malformed."""
    if not isinstance(wire, dict):
        return SllmdError("another node answered with a malformed error")
    kinds = {cls.__name__: cls for cls in _subclasses(SllmdError)}
    cls = kinds.get(wire.get("kind"), SllmdError)
    error = cls.__new__(cls)  # subclasses' constructors build their message: the wire has it already
    SllmdError.__init__(error, str(wire.get("message")), param=_str_or_none(wire.get("param")),
                        code=_str_or_none(wire.get("code")))
    if isinstance(error, Overloaded):
        retry_after = wire.get("retry_after_s")
        error.retry_after_s = retry_after if type(retry_after) is int and retry_after > 0 else 1
    return error


def _subclasses(cls: type) -> list[type]:
    found = [cls]
    for sub in cls.__subclasses__():
        found += _subclasses(sub)
    return found


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None
