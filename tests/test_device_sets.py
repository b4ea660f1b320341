"""Instances that span several devices (a deployment's `num_gpus`): which set of devices (`scheduler.topology`),
eviction and placement over sets, estimates over k streams, and a real node allocating and freeing a set."""

from __future__ import annotations

import pytest

from sllmd.scheduler.estimate import Calibration, load_time_s, transfer_time_s
from sllmd.scheduler.eviction import EvictionCandidate, plan_evictions
from sllmd.scheduler.memory import instance_memory
from sllmd.scheduler.placement import NodeState, RunningInstance, plan_start
from sllmd.scheduler.routing import AskLeader, route
from sllmd.scheduler.topology import device_groups
from sllmd.types import AutoscalingPolicy, Backend, EngineKind, Tier
from sllmd.worker.devices import Device, DevicePool, engine_device
from sllmd.worker.lifecycle import default_engine_factory
from tests.nodes import all_devices_free, running_node
from tests.test_lifecycle import wait_until

GIB = 1 << 30
HF = EngineKind.VLLM
# Two NVLink pairs (0-1, 2-3) on one PCIe switch each, the switches under one host bridge; 4-5 across sockets.
DGX_LIKE = (
    (0, 0, 20, 20, 50, 50),
    (0, 0, 20, 20, 50, 50),
    (20, 20, 0, 0, 50, 50),
    (20, 20, 0, 0, 50, 50),
    (50, 50, 50, 50, 0, 10),
    (50, 50, 50, 50, 10, 0),
)


@pytest.mark.parametrize(("num_devices", "k", "distance", "first"), [
    (4, 1, (), [(0,), (1,), (2,), (3,)]),  # one device: each alone, in order
    (4, 2, (), [(0, 1), (0, 2), (0, 3)]),  # flat: the lowest indices first
    (6, 2, DGX_LIKE, [(0, 1), (2, 3), (4, 5)]),  # NVLink pairs, then the PCIe pair across the switch
    (6, 4, DGX_LIKE, [(0, 1, 2, 3)]),  # one host bridge beats crossing sockets
    (2, 3, (), []),  # too few devices
])
def test_device_groups_prefer_the_closest_sets(num_devices, k, distance, first):
    groups = device_groups(num_devices, k, distance)
    assert groups[:len(first)] == first
    assert all(len(group) == k == len(set(group)) for group in groups)


def test_many_devices_weigh_each_devices_nearest_set_only():
    distance = tuple(tuple(0 if i // 8 == j // 8 else 50 for j in range(16)) for i in range(16))  # two 8-GPU boards
    groups = device_groups(16, 8, distance)
    assert groups[:2] == [tuple(range(8)), tuple(range(8, 16))]


def candidate(instance_id: str, devices: tuple[int, ...], gib: float, rate: float) -> EvictionCandidate:
    return EvictionCandidate(instance_id, devices, int(gib * GIB), 1.0, rate, 0.0, 0.0)


def test_evicting_for_a_set_frees_every_device_of_it_and_counts_a_spanning_instance_once():
    free = {0: 0, 1: 0, 2: 0, 3: 40 * GIB}
    groups = device_groups(4, 2)
    candidates = [candidate("wide", (0, 1), 40, 0.01),  # frees 40 GiB on both 0 and 1
                  candidate("a", (2,), 40, 0.001), candidate("b", (1,), 40, 0.005)]
    plan = plan_evictions(candidates, free, 40 * GIB, groups=groups)
    # (2, 3): "a" alone (3 has room) is the cheapest set.
    assert (plan.devices, plan.evictions) == ((2, 3), ("a",))
    plan = plan_evictions(candidates[:1], free, 40 * GIB, groups=groups)
    assert (plan.devices, plan.evictions) == ((0, 1), ("wide",))
    assert plan_evictions(candidates[:1], free, 41 * GIB, groups=groups) is None


def test_a_two_gpu_model_is_placed_on_two_devices_of_one_node_and_reserved_on_both():
    cal = Calibration.defaults()
    one_free = NodeState("a", True, free_memory=(80 * GIB, 0), calibration=cal, ssd_models=frozenset({"m"}))
    two_free = NodeState("b", True, free_memory=(80 * GIB, 80 * GIB, 10 * GIB), calibration=cal)
    plan = plan_start("m", HF, 132 * 10**9, 70 * GIB, [one_free, two_free], num_devices=2)
    assert plan is not None and (plan.node_id, plan.devices) == ("b", (0, 1))
    # Busy on one device of "a": migrating that instance away frees the set there, if a node can take it.
    busy = RunningInstance("x-1", "x", HF, 2, 100, num_bytes=GIB, devices=(1,), memory_bytes=80 * GIB)
    with_busy = NodeState("a", True, free_memory=(80 * GIB, 0), calibration=cal, dram_models=frozenset({"m"}),
                          instances=(busy,))
    plan = plan_start("m", HF, 132 * 10**9, 70 * GIB, [with_busy, two_free], num_devices=2)
    assert plan is not None and plan.node_id in ("a", "b")
    if plan.node_id == "a":
        assert plan.devices == (0, 1) and plan.migrations[0].to_node == "b"
    assert plan_start("m", HF, 132 * 10**9, 70 * GIB, [one_free], num_devices=2, allow_migration=False) is None


def test_routing_counts_a_node_only_with_enough_devices_free():
    policy = AutoscalingPolicy()
    narrow = NodeState("a", True, free_memory=(80 * GIB, 0))
    wide = NodeState("b", True, free_memory=(70 * GIB, 70 * GIB))
    decision = route("m", policy, [narrow, wide], local_id="a", memory_bytes=60 * GIB, num_devices=2)
    assert isinstance(decision, AskLeader) and decision.fallback.node_id == "b"


def test_a_load_from_dram_onto_k_devices_runs_k_streams_but_the_ssd_stays_one():
    cal = Calibration.defaults()
    one, four = (transfer_time_s(40 * 10**9, Tier.DRAM, cal, num_devices=n) for n in (1, 4))
    assert four == pytest.approx(one / 4)
    assert transfer_time_s(40 * 10**9, Tier.SSD, cal, num_devices=4) == transfer_time_s(40 * 10**9, Tier.SSD, cal)
    assert load_time_s(HF, 40 * 10**9, Tier.DRAM, cal, num_devices=4) < load_time_s(HF, 40 * 10**9, Tier.DRAM, cal)


def test_memory_per_device_splits_weights_and_kv_and_keeps_each_ranks_overhead():
    kwargs = {"weights_bytes": 138 * 10**9, "kv_bytes_per_token": 327680, "context_length": 4096,
              "max_batch_size": 32, "max_kv_bytes": 16 * GIB, "on_gpu": True}
    one, two = (instance_memory(Backend.VLLM, **kwargs, num_devices=n) for n in (1, 2))
    assert two.weights_bytes == one.weights_bytes // 2 and two.kv_bytes == one.kv_bytes // 2
    assert two.overhead_bytes == one.overhead_bytes


def test_the_pool_takes_a_close_set_and_an_engine_is_built_on_all_of_it():
    gpus = [Device(i, f"cuda:{i}", 80 * GIB) for i in range(6)]
    pool = DevicePool(gpus, DGX_LIKE)
    pair = pool.acquire("a", 70 * GIB, 2)
    assert [d.index for d in pair] == [0, 1] and engine_device(pair) == "cuda:0,1"
    assert [d.index for d in pool.acquire("b", 70 * GIB, 2)] == [2, 3]  # the other NVLink pair
    assert pool.acquire("c", 70 * GIB, 3) is None  # 4 and 5 are all that is left
    pool.release("a")
    assert pool.free_by_device()[:2] == (80 * GIB, 80 * GIB)
    assert engine_device((Device(0, "cpu", GIB), Device(1, "cpu", GIB))) == "cpu"


async def test_a_deployment_spanning_two_devices_needs_a_node_that_has_them(demo_model_dir, tmp_path):
    async with running_node(tmp_path, devices__cpu_slots=1) as running:
        body = {"name": "wide", "checkpoint": str(demo_model_dir), "backend": "dummy", "num_gpus": 2}
        async with running.http.post(f"{running.url}/admin/models", json=body) as response:
            assert response.status == 400
            error = (await response.json())["error"]
        assert error["code"] == "not_enough_devices" and error["param"] == "num_gpus", error
        for bad in (0, 65, 1.5, True):
            async with running.http.post(f"{running.url}/admin/models", json=body | {"num_gpus": bad}) as response:
                assert response.status == 400 and (await response.json())["error"]["param"] == "num_gpus"
        body = {"name": "wide", "checkpoint": str(demo_model_dir), "num_gpus": 2}  # transformers
        async with running.http.post(f"{running.url}/admin/models", json=body) as response:
            assert response.status == 400
            assert (await response.json())["error"]["code"] == "unsupported_num_gpus"


async def test_an_instance_holds_its_device_set_and_frees_it_on_scale_to_zero_and_on_failure(demo_model_dir,
                                                                                          tmp_path):
    failing = {"broken"}

    def factory(deployment, checkpoint_dir, device, resources):
        if deployment.name in failing:
            raise RuntimeError("the engine cannot start")
        return default_engine_factory(deployment, checkpoint_dir, device, resources)

    async with running_node(tmp_path, factory, devices__cpu_slots=3) as running:
        body = {"name": "wide2", "checkpoint": str(demo_model_dir), "backend": "dummy", "num_gpus": 2,
                "autoscaling": {"keep_alive_s": 0.3}}
        async with running.http.post(f"{running.url}/admin/models", json=body) as response:
            assert response.status == 201, await response.text()
        assert (await running.complete("wide2"))[0] == 200
        (instance,) = running.node.worker.runtimes["wide2"].instances
        assert len(instance.devices) == 2 and len({d.index for d in instance.devices}) == 2
        pool = running.node.worker.devices
        assert [pool.free_bytes(d) for d in instance.devices] == [d.budget_bytes - instance.memory_bytes
                                                                  for d in instance.devices]
        view = await running.model_view("wide2")
        assert view["num_gpus"] == 2 and view["instances"][0]["device"] == "cpu"
        await wait_until(lambda: not running.node.worker.runtimes["wide2"].instances and all_devices_free(running))
        body |= {"name": "broken"}
        async with running.http.post(f"{running.url}/admin/models", json=body) as response:
            assert response.status == 201
        status, _ = await running.complete("broken")
        assert status == 500
        await wait_until(lambda: all_devices_free(running))
