"""NODE_STATUS on the wire: `NodeStatus.to_wire` reads back equal, and anything else is refused whole."""

from __future__ import annotations

import copy
from typing import Any

import msgpack
import pytest

from sllmd.scheduler.estimate import Calibration, DeviceKind
from sllmd.scheduler.status import DeviceStatus, InstanceStatus, NodeStatus, QueueStatus, StatusError
from sllmd.state.models import InstanceState

STATUS = NodeStatus(
    devices=(DeviceStatus(0, "cuda:0", 80 * 10**9, 60 * 10**9), DeviceStatus(1, "cuda:1", 80 * 10**9, 60 * 10**9)),
    topology=((0, 10), (10, 0)),
    dram_cached=("ck-1",), ssd_cached=("ck-1", "ck-2"),
    queues={"demo": QueueStatus(2, 1)}, calibration=Calibration.defaults(DeviceKind.CPU), pending_load_s=1.25,
    instances=(InstanceStatus("demo-1", "demo", InstanceState.READY, 1, 420, (0, 1), 20 * 10**9, True, 0.5),),
    free_dram_bytes=10**9,
    free_ssd_bytes=5 * 10**9, parked_models=("vl",), parked_host_bytes=2 * 10**9)


def test_the_wire_form_survives_msgpack_and_reads_back_equal():
    wire = msgpack.unpackb(msgpack.packb(STATUS.to_wire()))
    assert NodeStatus.from_wire(wire) == STATUS


def test_the_wire_form_is_what_admin_cluster_shows():
    wire = STATUS.to_wire()
    assert wire["queues"] == {"demo": {"waiting": 2, "in_flight": 1}}
    assert wire["instances"] == [{"id": "demo-1", "model": "demo", "state": "ready", "requests": 1, "tokens": 420,
                                  "devices": [0, 1], "memory_bytes": 20 * 10**9, "kept": True, "request_rate": 0.5}]
    assert wire["devices"][0] == {"index": 0, "name": "cuda:0", "budget_bytes": 80 * 10**9, "free_bytes": 60 * 10**9}


def mutated(change) -> dict[str, Any]:
    wire = copy.deepcopy(STATUS.to_wire())
    change(wire)
    return wire


@pytest.mark.parametrize("body", [
    None, [], "status",
    mutated(lambda w: w.pop("queues")),
    mutated(lambda w: w.update(extra=1)),
    mutated(lambda w: w["devices"][0].update(free_bytes=True)),
    mutated(lambda w: w["devices"][0].update(free_bytes=-1)),
    mutated(lambda w: w["devices"][0].update(budget_bytes=None)),
    mutated(lambda w: w.update(pending_load_s=float("nan"))),
    mutated(lambda w: w.update(dram_cached=["ck", 7])),
    mutated(lambda w: w.update(ssd_cached="ck-1")),
    mutated(lambda w: w.update(queues={"demo": {"waiting": 1}})),
    mutated(lambda w: w.update(queues={7: {"waiting": 1, "in_flight": 0}})),
    mutated(lambda w: w.update(calibration={"load_gbps": {"ssd": -1}})),
    mutated(lambda w: w["instances"][0].update(state="gone")),
    mutated(lambda w: w["instances"][0].update(requests="many")),
    mutated(lambda w: w["instances"][0].update(kept=1)),
    mutated(lambda w: w["instances"][0].update(request_rate=-0.5)),
    mutated(lambda w: w["instances"][0].pop("memory_bytes")),
    mutated(lambda w: w["instances"][0].update(devices=[0, -1])),
    mutated(lambda w: w.update(topology=[[0, "near"]])),
    mutated(lambda w: w.update(topology=7)),
    mutated(lambda w: w["devices"][0].update(name=3)),
    mutated(lambda w: w["devices"][0].pop("index")),
    mutated(lambda w: w.update(parked_models=[{"vl": 1}])),
])
def test_anything_else_is_refused_whole(body):
    with pytest.raises(StatusError):
        NodeStatus.from_wire(body)
