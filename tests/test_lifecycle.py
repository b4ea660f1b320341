"""The serverless lifecycle on real engines: scale from zero, keep-alive, scale-out, eviction,
bounded waiting, start failures, restart."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sllmd.cluster.replicated import SOFT_WAIT_S
from sllmd.scheduler.estimate import Calibration, DeviceKind, LinearFit
from sllmd.state.machine import SOFT_OPS
from sllmd.state.models import InstanceState
from sllmd.types import EngineKind
from sllmd.worker.lifecycle import EngineFactory, default_engine_factory
from tests.nodes import ONE_DEMO_DEVICE, ONE_DEMO_INSTANCE_GB, RunningNode, all_devices_free, running_node


async def wait_until(predicate, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def num_instances(running: RunningNode, model: str) -> int:
    runtime = running.node.worker.runtimes[model]
    return len(runtime.instances)


async def long_stream(running: RunningNode, model: str, started: asyncio.Event, release: asyncio.Event) -> None:
    """Holds a request in flight on `model` until `release` is set."""
    body = {"model": model, "prompt": "Hello", "max_tokens": 1000, "temperature": 0, "stream": True}
    async with running.http.post(f"{running.url}/v1/completions", json=body) as response:
        assert response.status == 200
        async for line in response.content:
            if line.startswith(b"data: "):
                break  # in flight on an instance (the comments before tell how its start goes)
        started.set()
        await release.wait()


async def test_scale_from_zero_then_keep_alive_scale_down(demo_model_dir, tmp_path):
    async with running_node(tmp_path) as running:
        await running.deploy("demo", demo_model_dir, keep_alive_s=0.3)
        assert num_instances(running, "demo") == 0  # nothing runs before the first request
        assert all_devices_free(running)
        status, body = await running.complete("demo")
        assert status == 200 and body["choices"][0]["text"]
        assert num_instances(running, "demo") == 1
        # Recorded in LMDB, queued behind the serving path rather than awaited by it:
        await wait_until(lambda: [(i.model, i.state) for i in running.node.state.instances()]
                         == [("demo", InstanceState.READY)])
        await wait_until(lambda: num_instances(running, "demo") == 0, timeout_s=3)
        await wait_until(lambda: all_devices_free(running))
        await wait_until(lambda: running.node.state.instances() == [])
        status, _ = await running.complete("demo")  # and back up from zero
        assert status == 200
        metrics = running.node.metrics.render().decode()
        assert 'sllmd_cold_starts_total{model="demo",tier="ssd"} 1.0' in metrics
        assert 'sllmd_cold_starts_total{model="demo",tier="dram"} 1.0' in metrics  # the scale-down kept it in DRAM


async def test_scale_out_across_two_devices_and_no_further(demo_model_dir, tmp_path):
    async with running_node(tmp_path, devices__cpu_slots=2,
                            devices__cpu_slot_memory_gb=ONE_DEMO_INSTANCE_GB) as running:
        await running.deploy("demo", demo_model_dir, max_instances=4, target_concurrency=1, keep_alive_s=60)
        release = asyncio.Event()
        started = [asyncio.Event() for _ in range(4)]
        streams = [asyncio.create_task(long_stream(running, "demo", s, release)) for s in started]
        for event in started:
            await asyncio.wait_for(event.wait(), 10)
        runtime = running.node.worker.runtimes["demo"]
        await wait_until(lambda: len(runtime.ready()) == 2)  # demand 4 wanted 4; two devices' memory caps it
        assert len(runtime.instances) == 2
        assert sorted(i.devices[0].index for i in runtime.instances) == [0, 1]
        # Waiters took the first instance that became ready; the next request goes to the idle one.
        assert sum(i.in_flight for i in runtime.ready()) == 4
        fifth = asyncio.Event()
        streams.append(asyncio.create_task(long_stream(running, "demo", fifth, release)))
        await asyncio.wait_for(fifth.wait(), 10)
        assert min(i.in_flight for i in runtime.ready()) >= 1
        release.set()
        await asyncio.gather(*streams)


async def test_min_instances_start_at_deploy_and_patch_scales_down(demo_model_dir, tmp_path):
    async with running_node(tmp_path) as running:
        await running.deploy("demo", demo_model_dir, min_instances=1, keep_alive_s=0.1)
        await wait_until(lambda: len(running.node.worker.runtimes["demo"].ready()) == 1)
        await asyncio.sleep(0.3)
        assert num_instances(running, "demo") == 1  # min_instances outlives keep-alive
        async with running.http.patch(f"{running.url}/admin/models/demo",
                                      json={"autoscaling": {"min_instances": 0}}) as response:
            assert response.status == 200
            assert (await response.json())["revision"] == 2
        status, _ = await running.complete("demo")  # an idle transition re-arms keep-alive
        assert status == 200
        await wait_until(lambda: num_instances(running, "demo") == 0)


async def test_idle_instance_of_another_model_is_evicted_for_a_cold_start(demo_model_dir, tmp_path):
    async with running_node(tmp_path, **ONE_DEMO_DEVICE) as running:
        await running.deploy("a", demo_model_dir, keep_alive_s=600)
        await running.deploy("b", demo_model_dir, keep_alive_s=600)
        assert (await running.complete("a"))[0] == 200
        assert (await running.complete("b"))[0] == 200  # a sat idle: evicted rather than waiting 600 s
        assert num_instances(running, "a") == 0 and num_instances(running, "b") == 1


async def test_waiting_for_a_busy_node_times_out_with_503_and_retry_after(demo_model_dir, tmp_path):
    async with running_node(tmp_path, **ONE_DEMO_DEVICE, serving__queue_timeout_s=0.3,
                            serving__max_queue_per_model=1) as running:
        await running.deploy("a", demo_model_dir, keep_alive_s=600)
        await running.deploy("b", demo_model_dir, keep_alive_s=600)
        started, release = asyncio.Event(), asyncio.Event()
        holder = asyncio.create_task(long_stream(running, "a", started, release))
        await asyncio.wait_for(started.wait(), 10)
        # "a" is busy, so "b" cannot evict it: the first waiter queues, the second finds the queue full.
        waiting = asyncio.create_task(running.complete("b"))
        await wait_until(lambda: running.node.worker.runtimes["b"].num_waiting == 1)
        async with running.http.post(f"{running.url}/v1/completions",
                                     json={"model": "b", "prompt": "x"}) as response:
            assert response.status == 429
            assert response.headers["Retry-After"] == "1"
            assert (await response.json())["error"]["code"] == "queue_full"
        status, body = await waiting
        assert status == 503 and body["error"]["code"] == "no_capacity"  # nothing starting: memory is the cause
        release.set()
        await holder
        assert (await running.complete("a"))[0] == 200  # still serving


def slow_engine_factory(delays_s: dict[str, float | None], released: threading.Event) -> EngineFactory:
    """The real engine factory, but an engine of model m is created only `delays_s[m]` seconds later (a slow
    start: the worker creates engines in a thread as part of every start), or never before `released` is set
    when that delay is None (a start that hangs)."""
    def create(deployment, checkpoint_dir, device, dram_cache=None):
        released.wait(delays_s.get(deployment.name, 0.0))
        return default_engine_factory(deployment, checkpoint_dir, device, dram_cache)
    return create


@asynccontextmanager
async def node_with_slow_starts(tmp_path, delays_s: dict[str, float | None], *, init_s: float,
                                **settings) -> AsyncIterator[RunningNode]:
    """A node whose starts of the models in `delays_s` are slow, and whose estimator has learned that transformers
    engines take `init_s` to build, so the worker expects them to be that slow."""
    released = threading.Event()
    async with running_node(tmp_path, slow_engine_factory(delays_s, released), **settings) as running:
        estimates = running.node.worker.estimates
        learned = {**estimates.calibration.init, EngineKind.TRANSFORMERS: LinearFit(slope=0.0, intercept=init_s)}
        estimates.set_calibration(dataclasses.replace(estimates.calibration, init=learned))
        try:
            yield running
        finally:
            released.set()  # a hung start's thread ends, so the node can close


async def timed_complete(running: RunningNode, model: str) -> tuple[int, dict, float]:
    began = time.monotonic()
    status, body = await running.complete(model)
    return status, body, time.monotonic() - began


async def test_a_start_slower_than_the_queue_timeout_but_within_its_estimate_is_waited_for(demo_model_dir,
                                                                                          tmp_path):
    async with node_with_slow_starts(tmp_path, {"demo": 1.5}, init_s=3.0, serving__queue_timeout_s=0.3) as running:
        await running.deploy("demo", demo_model_dir)
        status, body, took_s = await timed_complete(running, "demo")
        assert status == 200 and body["choices"][0]["text"], body
        assert took_s > 1.5  # five queue timeouts
        (instance,) = running.node.worker.runtimes["demo"].instances
        assert instance.estimated_start_s >= 3.0


async def test_a_start_that_begins_while_a_request_waits_for_memory_extends_its_wait(demo_model_dir, tmp_path):
    async with node_with_slow_starts(tmp_path, {"b": 1.5}, init_s=3.0, **ONE_DEMO_DEVICE,
                                     serving__queue_timeout_s=0.5) as running:
        await running.deploy("a", demo_model_dir, keep_alive_s=0.2)
        await running.deploy("b", demo_model_dir)
        started, release = asyncio.Event(), asyncio.Event()
        holder = asyncio.create_task(long_stream(running, "a", started, release))
        await asyncio.wait_for(started.wait(), 10)
        waiting = asyncio.create_task(timed_complete(running, "b"))  # no room: waits with nothing starting
        await wait_until(lambda: running.node.worker.runtimes["b"].num_waiting == 1)
        release.set()  # a idles out 0.2 s later, and b's slow start takes its memory
        await holder
        status, body, took_s = await waiting
        assert status == 200 and took_s > 1.5, body


async def test_a_start_that_never_ends_fails_its_waiters_after_the_bound_naming_the_estimate(demo_model_dir,
                                                                                            tmp_path):
    async with node_with_slow_starts(tmp_path, {"hung": None}, init_s=3.0, serving__queue_timeout_s=0.3,
                                     serving__max_start_wait_s=1.0) as running:
        await running.deploy("hung", demo_model_dir)
        status, body, took_s = await timed_complete(running, "hung")
        assert status == 503 and body["error"]["code"] == "cold_start_timeout"
        assert 1.0 <= took_s < 5.0
        message = body["error"]["message"]
        assert "did not become ready within 1.0s" in message and "estimated at 3." in message, message
        assert "has run 1." in message, message
        # The start carries on (a slow one would still serve); it holds its memory meanwhile.
        assert [i.state for i in running.node.worker.runtimes["hung"].instances] == [InstanceState.STARTING]


async def test_a_model_that_fails_to_start_gets_500_and_frees_its_memory(demo_model_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(demo_model_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    config["num_hidden_layers"] += 1  # converts fine; the engine finds a layer without weights
    (broken / "config.json").write_text(json.dumps(config))
    async with running_node(tmp_path / "data", **ONE_DEMO_DEVICE) as running:
        await running.deploy("broken", broken)
        await running.deploy("demo", demo_model_dir)
        status, body = await running.complete("broken")
        assert status == 500 and "failed to start" in body["error"]["message"]
        assert all_devices_free(running)
        assert (await running.complete("demo"))[0] == 200


async def test_deleting_a_model_fails_its_waiters_with_404(demo_model_dir, tmp_path):
    async with running_node(tmp_path, **ONE_DEMO_DEVICE) as running:
        await running.deploy("a", demo_model_dir)
        await running.deploy("b", demo_model_dir)
        started, release = asyncio.Event(), asyncio.Event()
        holder = asyncio.create_task(long_stream(running, "a", started, release))
        await asyncio.wait_for(started.wait(), 10)
        waiting = asyncio.create_task(running.complete("b"))
        await wait_until(lambda: running.node.worker.runtimes["b"].num_waiting == 1)
        async with running.http.delete(f"{running.url}/admin/models/b") as response:
            assert response.status == 200
        status, body = await waiting
        assert status == 404 and body["error"]["code"] == "model_not_found"
        release.set()
        await holder


async def test_deployments_survive_a_restart_and_stale_instances_are_cleared(demo_model_dir, tmp_path):
    async with running_node(tmp_path) as running:
        await running.deploy("demo", demo_model_dir, max_instances=2, keep_alive_s=600)
        assert (await running.complete("demo"))[0] == 200
        node_id = running.node.node_id
    async with running_node(tmp_path) as restarted:
        assert restarted.node.node_id == node_id
        view = await restarted.model_view("demo")
        assert view["autoscaling"]["max_instances"] == 2 and view["instances"] == []
        assert restarted.node.state.instances() == []
        status, _ = await restarted.complete("demo")
        assert status == 200
        assert restarted.node.worker.runtimes["demo"].instances[0].state is InstanceState.READY


async def test_a_warm_model_at_capacity_answers_429(demo_model_dir, tmp_path):
    async with running_node(tmp_path, **ONE_DEMO_DEVICE, serving__max_queue_per_model=1) as running:
        await running.deploy("demo", demo_model_dir, max_instances=1, target_concurrency=1)
        release = asyncio.Event()
        started = [asyncio.Event(), asyncio.Event()]
        # Capacity = 1 ready instance x target 1 + max_queue 1 = 2 requests.
        holders = []
        for event in started:  # one at a time: while cold, capacity is only max_queue
            holders.append(asyncio.create_task(long_stream(running, "demo", event, release)))
            await asyncio.wait_for(event.wait(), 10)
        status, body = await running.complete("demo")
        assert status == 429 and body["error"]["code"] == "queue_full"
        release.set()
        await asyncio.gather(*holders)
        assert (await running.complete("demo"))[0] == 200


async def test_cluster_view_reports_soft_state_after_loads(demo_model_dir, tmp_path):
    async with running_node(tmp_path) as running:
        await running.deploy("demo", demo_model_dir, keep_alive_s=600)
        assert (await running.complete("demo"))[0] == 200
        async with running.http.get(f"{running.url}/admin/cluster") as response:
            (node,) = (await response.json())["nodes"]
        assert node["queues"] == {"demo": {"waiting": 0, "in_flight": 0}}
        # The load (too small to say anything of bandwidth) taught the estimator this engine kind's init time.
        reported, fresh = Calibration.from_wire(node["calibration"]), Calibration.defaults(DeviceKind.CPU)
        assert reported.init[EngineKind.TRANSFORMERS] != fresh.init[EngineKind.TRANSFORMERS]
        assert reported.init[EngineKind.VLLM] == fresh.init[EngineKind.VLLM]
        assert node["pending_load_s"] == 0 and len(node["ssd_cached"]) == 1
        assert [(i["model"], i["requests"], i["state"]) for i in node["instances"]] == [("demo", 0, "ready")]
        assert len(node["dram_cached"]) == 1  # ... and its buffer stays in the DRAM cache
        (instance,) = node["instances"]
        need = running.node.worker.estimates.memory_need(running.node.state.deployment("demo")).total_bytes
        assert instance["memory_bytes"] == need and instance["kept"] is False
        held = {d["index"]: d["budget_bytes"] - d["free_bytes"] for d in node["devices"]}
        (device,) = instance["devices"]
        assert held == {device: need, 1 - device: 0}


async def test_a_node_whose_instance_records_were_dropped_records_them_again(demo_model_dir, tmp_path):
    async with running_node(tmp_path) as running:
        await running.deploy("demo", demo_model_dir, keep_alive_s=600)
        assert (await running.complete("demo"))[0] == 200
        await wait_until(lambda: [i.state for i in running.node.state.instances()] == [InstanceState.READY])
        (record,) = running.node.state.instances()
        # What the leader's dead-node reaper proposes for a node silent past the timeout:
        await running.node.state.propose({"op": "delete_node_instances", "node_id": running.node.node_id})
        await wait_until(lambda: running.node.state.instances() == [record])


async def test_a_cold_start_serves_without_waiting_for_its_instance_records_to_commit(demo_model_dir, tmp_path,
                                                                                      monkeypatch):
    async with running_node(tmp_path) as running:
        await running.deploy("warm", demo_model_dir, backend="dummy", keep_alive_s=600)
        await running.deploy("cold", demo_model_dir, backend="dummy", keep_alive_s=600)
        assert (await running.complete("warm"))[0] == 200  # the checkpoint's tokenizer is loaded now
        state, committed = running.node.state, asyncio.Event()
        await wait_until(lambda: [(i.model, i.state) for i in state.instances()] == [("warm", InstanceState.READY)])
        propose = state._propose_strict

        async def held(command: dict) -> object:  # instance records do not commit until `committed` is set
            if command["op"] in SOFT_OPS:
                await committed.wait()
            return await propose(command)

        monkeypatch.setattr(state, "_propose_strict", held)
        # The old path waited up to SOFT_WAIT_S for each of the STARTING and READY records.
        status, _ = await asyncio.wait_for(running.complete("cold"), SOFT_WAIT_S)
        assert status == 200
        assert [i.model for i in state.instances()] == ["warm"]
        committed.set()  # then the queued records land, in order
        await wait_until(lambda: sorted((i.model, i.state) for i in state.instances())
                         == [("cold", InstanceState.READY), ("warm", InstanceState.READY)])


async def test_a_requested_model_on_ssd_is_warmed_into_dram_and_its_cold_start_hits_dram(demo_model_dir, tmp_path):
    async with running_node(tmp_path) as running:
        await running.deploy("demo", demo_model_dir, keep_alive_s=600)  # converted into the SSD store, not loaded
        worker = running.node.worker
        assert worker.warmer is not None and not worker.dram_cache.lru_keys()
        assert worker.warmer.plan() == []  # not requested yet: nothing deserves DRAM
        worker.warmer.note_request("demo")
        worker.warmer.consider()
        await wait_until(lambda: len(worker.dram_cache.lru_keys()) == 1)
        assert worker.warmer.plan() == []  # cached now
        assert (await running.complete("demo"))[0] == 200
        (instance,) = worker.runtimes["demo"].instances
        assert instance.load_report.source_tier == "dram"
