"""What each node reports of itself, and the cluster as one node sees it. Pure values, no I/O.

`NodeStatus` is a node's soft state: the facts that change too often for the Raft log (devices and their free
memory, cache contents, queues, calibration, starts under way, instances with their requests). Every node
sends its own to the others in NODE_STATUS (`to_wire`) every `membership.STATUS_INTERVAL_S`; a receiver
decodes it with `from_wire`, which accepts exactly the fields written here, each of its type, and raises
`StatusError` on anything else (a peer of another version or a hostile one is not half-read).

`ClusterView` is every known node as one node sees it (`Membership.view`): addresses, role, liveness and
the latest `NodeStatus`. Placement reads it through `scheduler.view.node_states`; `GET /admin/cluster` renders it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from sllmd.scheduler.estimate import Calibration
from sllmd.state.models import InstanceState

_T = TypeVar("_T")


class StatusError(ValueError):
    """A NODE_STATUS body that is not exactly what `NodeStatus.to_wire` writes."""


@dataclass(frozen=True, slots=True)
class DeviceStatus:
    index: int
    name: str  # "cuda:0", "cpu"
    budget_bytes: int  # what instances may hold on it
    free_bytes: int  # of the budget, not held by an instance


@dataclass(frozen=True, slots=True)
class QueueStatus:
    """One model's requests on the node."""

    num_waiting: int  # for an instance
    num_in_flight: int  # on an instance

    @property
    def num_requests(self) -> int:
        return self.num_waiting + self.num_in_flight


@dataclass(frozen=True, slots=True)
class InstanceStatus:
    id: str
    model: str
    state: InstanceState
    num_requests: int  # in flight on it
    num_tokens: int  # prompt + generated tokens of those requests (what a migration would move)
    devices: tuple[int, ...]  # indices into the node's devices: one, or several for a model spanning GPUs
    memory_bytes: int  # held on each of them
    is_kept: bool  # kept for its model's min_instances: never evicted
    request_rate: float  # its model's recent requests/s on the node


@dataclass(frozen=True, slots=True)
class NodeStatus:
    """One node's soft state. Checkpoints are named by their store ids (`dram_cached`: in its DRAM cache or
    wholly in its page cache; `ssd_cached`: in its SSD store); `parked_models` are the vLLM deployments with
    an engine of their shape parked there. `pending_load_s`: estimated seconds its SSD and network stay busy
    with the starts under way."""

    devices: tuple[DeviceStatus, ...]
    topology: tuple[tuple[int, ...], ...]  # distances between the devices (`scheduler.topology`); (): flat
    dram_cached: tuple[str, ...]
    ssd_cached: tuple[str, ...]
    queues: Mapping[str, QueueStatus]
    calibration: Calibration
    pending_load_s: float
    instances: tuple[InstanceStatus, ...]
    free_dram_bytes: int  # of the DRAM budget, for warming
    free_ssd_bytes: int  # of the SSD store's budget
    parked_models: tuple[str, ...]
    parked_host_bytes: int  # host memory the parked engines hold

    def to_wire(self) -> dict[str, Any]:
        """A plain dict (msgpack- and JSON-safe); also the node fields of GET /admin/cluster."""
        return {
            "devices": [{"index": d.index, "name": d.name, "budget_bytes": d.budget_bytes, "free_bytes": d.free_bytes}
                        for d in self.devices],
            "topology": [list(row) for row in self.topology],
            "dram_cached": list(self.dram_cached),
            "ssd_cached": list(self.ssd_cached),
            "queues": {model: {"waiting": q.num_waiting, "in_flight": q.num_in_flight}
                       for model, q in self.queues.items()},
            "calibration": self.calibration.to_wire(),
            "pending_load_s": self.pending_load_s,
            "instances": [{"id": i.id, "model": i.model, "state": i.state.value, "requests": i.num_requests,
                           "tokens": i.num_tokens, "devices": list(i.devices), "memory_bytes": i.memory_bytes,
                           "kept": i.is_kept, "request_rate": i.request_rate} for i in self.instances],
            "free_dram_bytes": self.free_dram_bytes,
            "free_ssd_bytes": self.free_ssd_bytes,
            "parked_models": list(self.parked_models),
            "parked_host_bytes": self.parked_host_bytes,
        }

    @classmethod
    def from_wire(cls, body: Any) -> NodeStatus:
        """Read what `to_wire` wrote; anything else (a missing or unknown field, a wrong type, a negative
        count) raises StatusError."""
        fields = _fields(body, "status", _STATUS_FIELDS)
        try:
            calibration = Calibration.from_wire(fields["calibration"])
        except ValueError as exc:
            raise StatusError(f"calibration: {exc}") from None
        return cls(
            devices=tuple(_list(fields["devices"], "devices", _device)),
            topology=tuple(_list(fields["topology"], "topology", _row)),
            dram_cached=tuple(_list(fields["dram_cached"], "dram_cached", _str)),
            ssd_cached=tuple(_list(fields["ssd_cached"], "ssd_cached", _str)),
            queues=_queues(fields["queues"]),
            calibration=calibration,
            pending_load_s=_seconds(fields["pending_load_s"], "pending_load_s"),
            instances=tuple(_list(fields["instances"], "instances", _instance)),
            free_dram_bytes=_count(fields["free_dram_bytes"], "free_dram_bytes"),
            free_ssd_bytes=_count(fields["free_ssd_bytes"], "free_ssd_bytes"),
            parked_models=tuple(_list(fields["parked_models"], "parked_models", _str)),
            parked_host_bytes=_count(fields["parked_host_bytes"], "parked_host_bytes"),
        )


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """One node as another sees it. `http`/`peer` are None until its node record is known; `status` is None
    until its first NODE_STATUS arrived. `last_seen_s`: seconds since any message from it (0 for the node
    itself; None if never); `is_alive`: within `membership.ALIVE_WINDOW_S`."""

    id: str
    http: str | None
    peer: str | None
    role: str  # its Raft role ("leader", "follower", ...) as last heard, or "unknown"
    is_alive: bool
    is_voter: bool
    last_seen_s: float | None
    status: NodeStatus | None


@dataclass(frozen=True, slots=True)
class ClusterView:
    leader_id: str | None
    term: int
    nodes: tuple[PeerInfo, ...]  # in id order


# ------------------------------------------------------------------------------------------ decoding

_STATUS_FIELDS = frozenset({"devices", "topology", "dram_cached", "ssd_cached", "queues", "calibration",
                            "pending_load_s", "instances", "free_dram_bytes", "free_ssd_bytes", "parked_models",
                            "parked_host_bytes"})


def _fields(value: Any, name: str, expected: frozenset[str]) -> dict[str, Any]:
    if not isinstance(value, dict) or set(value) != expected:
        raise StatusError(f"{name} needs exactly the fields {sorted(expected)}")
    return value


def _list(value: Any, name: str, parse: Callable[[Any, str], _T]) -> list[_T]:
    if not isinstance(value, list):
        raise StatusError(f"{name} must be a list")
    return [parse(item, f"{name}[{i}]") for i, item in enumerate(value)]


def _str(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise StatusError(f"{name} must be a string")
    return value


def _count(value: Any, name: str) -> int:
    # bool is an int subclass; True is no count.
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise StatusError(f"{name} must be an integer >= 0")
    return value


def _seconds(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not (math.isfinite(value) and value >= 0):
        raise StatusError(f"{name} must be a finite number >= 0")
    return float(value)


def _device(value: Any, name: str) -> DeviceStatus:
    f = _fields(value, name, frozenset({"index", "name", "budget_bytes", "free_bytes"}))
    return DeviceStatus(_count(f["index"], f"{name}.index"), _str(f["name"], f"{name}.name"),
                        _count(f["budget_bytes"], f"{name}.budget_bytes"),
                        _count(f["free_bytes"], f"{name}.free_bytes"))


def _row(value: Any, name: str) -> tuple[int, ...]:
    return tuple(_list(value, name, _count))


def _bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise StatusError(f"{name} must be a boolean")
    return value


def _queues(value: Any) -> dict[str, QueueStatus]:
    if not isinstance(value, dict):
        raise StatusError("queues must be a map")
    queues = {}
    for model, queue in value.items():
        name = f"queues[{_str(model, 'queues key')}]"
        f = _fields(queue, name, frozenset({"waiting", "in_flight"}))
        queues[model] = QueueStatus(_count(f["waiting"], f"{name}.waiting"),
                                    _count(f["in_flight"], f"{name}.in_flight"))
    return queues


def _instance(value: Any, name: str) -> InstanceStatus:
    f = _fields(value, name, frozenset({"id", "model", "state", "requests", "tokens", "devices", "memory_bytes",
                                        "kept", "request_rate"}))
    try:
        state = InstanceState(f["state"])
    except ValueError:
        raise StatusError(f"{name}.state must be one of {[s.value for s in InstanceState]}") from None
    return InstanceStatus(_str(f["id"], f"{name}.id"), _str(f["model"], f"{name}.model"), state,
                          _count(f["requests"], f"{name}.requests"), _count(f["tokens"], f"{name}.tokens"),
                          tuple(_list(f["devices"], f"{name}.devices", _count)),
                          _count(f["memory_bytes"], f"{name}.memory_bytes"),
                          _bool(f["kept"], f"{name}.kept"), _seconds(f["request_rate"], f"{name}.request_rate"))
