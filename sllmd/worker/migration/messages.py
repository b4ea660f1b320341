"""Peer messages of live migration (`sllmd.worker.migration.source`), as typed bodies with strict decoding.

Every body is a msgpack map naming its migration (`migration_id`, chosen by the source); the transport
has already authenticated the sender. `decode` checks every field's type (bools are not ints, ints are
not floats unless a float is expected) and rejects unknown or missing fields with `WireError`, so a
handler never sees a malformed body. Token ids travel as lists of ints; per-request data is keyed by
the small integer `key` the source gives each request of one migration.

Direction and order (S: source, D: destination):
  S→D BEGIN      D starts (or reuses) an instance of the model          → D→S READY
  S→D CATCH_UP   ids to append to each request's sequence (a round)     → D→S CAUGHT_UP
  S→D CUT_OVER   the last ids and the sampling state; D generates       → D→S CUT_OVER_ACK
  D→S TOKENS     each request's new tokens, numbered (S knows when a request is complete), or an error
  S→D CANCEL     one request (its client went away) or, key -1, the whole migration
"""

from __future__ import annotations

import dataclasses
import enum
import typing
from dataclasses import dataclass
from typing import Any, TypeVar


class MigrationMessage(enum.StrEnum):
    BEGIN = "migrate_begin"
    READY = "migrate_ready"
    CATCH_UP = "migrate_catch_up"
    CAUGHT_UP = "migrate_caught_up"
    CUT_OVER = "migrate_cut_over"
    CUT_OVER_ACK = "migrate_cut_over_ack"
    TOKENS = "migrate_tokens"
    CANCEL = "migrate_cancel"


class WireError(ValueError):
    """A migration body that does not decode; the message says which field."""


ALL_REQUESTS = -1  # CANCEL's key for "the whole migration"


@dataclass(frozen=True, slots=True)
class Begin:
    migration_id: str
    model: str


@dataclass(frozen=True, slots=True)
class Ready:
    migration_id: str
    error: str = ""  # non-empty: D could not start the model; the migration is over


@dataclass(frozen=True, slots=True)
class CatchUp:
    migration_id: str
    round: int  # from 1
    appended: list[list[Any]]  # [key, [ids...]] per request; a new key starts a new sequence


@dataclass(frozen=True, slots=True)
class CaughtUp:
    migration_id: str
    round: int
    num_tokens: list[list[int]]  # [key, tokens now prefilled] per request
    error: str = ""


@dataclass(frozen=True, slots=True)
class MovedRequest:
    """The rest of one request's sequence and what D needs to continue it exactly."""

    key: int
    tail: list[int]  # ids after those D prefilled (may be empty)
    position: int  # sequence length after `tail`: the index of the first token D generates
    max_tokens: int  # tokens still to generate
    temperature: float
    top_p: float
    seed: int
    stop_token_ids: list[int]


@dataclass(frozen=True, slots=True)
class CutOver:
    migration_id: str
    requests: list[dict[str, Any]]  # MovedRequest.to_wire() each


@dataclass(frozen=True, slots=True)
class CutOverAck:
    migration_id: str
    error: str = ""


@dataclass(frozen=True, slots=True)
class Tokens:
    migration_id: str
    key: int
    index: int  # how many tokens D generated for this request before these
    tokens: list[int]
    error: str = ""  # non-empty: generation failed on D; the request ends with this error


@dataclass(frozen=True, slots=True)
class Cancel:
    migration_id: str
    key: int = ALL_REQUESTS


Body = TypeVar("Body")


def to_wire(body: Any) -> dict[str, Any]:
    return {f.name: getattr(body, f.name) for f in dataclasses.fields(body)}


def decode(cls: type[Body], raw: Any) -> Body:
    """`raw` (a decoded msgpack value) as a `cls`, every field checked; WireError otherwise."""
    if not isinstance(raw, dict):
        raise WireError(f"{cls.__name__}: body must be a map")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(raw) - set(fields)
    if unknown:
        raise WireError(f"{cls.__name__}: unknown field {sorted(unknown)[0]!r}")
    values = {}
    for name, field in fields.items():
        if name not in raw:
            if field.default is dataclasses.MISSING:
                raise WireError(f"{cls.__name__}: missing field {name!r}")
            continue
        values[name] = _checked(raw[name], hints[name], f"{cls.__name__}.{name}")
    return cls(**values)


def _checked(value: Any, hint: Any, name: str) -> Any:
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    origin = typing.get_origin(hint)
    if origin is list:
        if not isinstance(value, list):
            raise WireError(f"{name} must be a list")
        (item,) = typing.get_args(hint)
        return [_checked(v, item, f"{name}[]") for v in value]
    if hint is Any:
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise WireError(f"{name} must be a map")
        return value
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise WireError(f"{name} must be {hint.__name__}")
    return value


def token_ids(value: Any, name: str) -> list[int]:
    """A list of non-negative ints (vocabulary bounds are the engine's to check)."""
    ids = _checked(value, list[int], name)
    if any(i < 0 for i in ids):
        raise WireError(f"{name} holds a negative token id")
    return ids


def keyed_ids(pairs: list[list[Any]], name: str) -> dict[int, list[int]]:
    """CatchUp.appended as {key: ids}; duplicate keys are an error."""
    out: dict[int, list[int]] = {}
    for pair in pairs:
        if len(pair) != 2 or not isinstance(pair[0], int) or isinstance(pair[0], bool) or pair[0] in out:
            raise WireError(f"{name} entries must be [key, ids] with distinct int keys")
        out[pair[0]] = token_ids(pair[1], f"{name}[{pair[0]}]")
    return out
