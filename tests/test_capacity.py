"""Memory as capacity, with real daemons: several models share a device while they fit, the accounting returns
to zero, a model that fits no device is refused at deploy, pins stay within their share, and a request that
cannot get memory is told why."""

from __future__ import annotations

import asyncio
import json
import shutil
import time

import pytest

from sllmd.engine.hf_model import resident_bytes
from sllmd.worker.lifecycle import default_engine_factory
from tests.nodes import ONE_DEMO_DEVICE, RunningNode, all_devices_free, running_node
from tests.small_disk import run_on_small_disk
from tests.test_lifecycle import long_stream, wait_until


def memory_need(running: RunningNode, model: str) -> int:
    return running.node.worker.estimates.memory_need(running.node.state.deployment(model)).total_bytes


async def test_two_models_share_one_device_and_their_memory_returns_to_zero(demo_model_dir, tmp_path):
    async with running_node(tmp_path, devices__cpu_slots=1) as running:
        for name in ("a", "b"):
            await running.deploy(name, demo_model_dir, keep_alive_s=600)
        for name in ("a", "b"):
            assert (await running.complete(name))[0] == 200
        worker = running.node.worker
        (a,), (b,) = worker.runtimes["a"].instances, worker.runtimes["b"].instances
        assert a.devices == b.devices  # resident together: neither evicted the other
        (device,) = worker.devices.devices
        assert worker.devices.free_bytes(device) == device.budget_bytes - a.memory_bytes - b.memory_bytes
        assert a.memory_bytes == memory_need(running, "a")
        # Scale to zero: keep-alive ends for both, and every byte comes back.
        for name in ("a", "b"):
            async with running.http.patch(f"{running.url}/admin/models/{name}",
                                          json={"autoscaling": {"keep_alive_s": 0.1}}) as response:
                assert response.status == 200
        await wait_until(lambda: all_devices_free(running) and not worker.runtimes["a"].instances)
        (line,) = [line for line in running.node.metrics.render().decode().splitlines()
                   if line.startswith('sllmd_device_free_bytes{device="0"}')]
        assert float(line.split()[-1]) == device.budget_bytes


async def test_a_cold_start_evicts_the_idle_instance_whose_loss_costs_least_not_the_longest_idle(
        demo_model_dir, tmp_path):
    # A 0.3 GiB device holds two demo instances (0.13 GiB each), not three.
    async with running_node(tmp_path, devices__cpu_slots=1, devices__cpu_slot_memory_gb=0.3) as running:
        for name in ("popular", "rare", "new"):
            await running.deploy(name, demo_model_dir, keep_alive_s=600)
        for _ in range(5):
            assert (await running.complete("popular"))[0] == 200
        assert (await running.complete("rare"))[0] == 200  # the most recently used, and asked for once
        assert (await running.complete("new"))[0] == 200
        runtimes = running.node.worker.runtimes
        # LRU would have stopped "popular" (idle longest); both reload from DRAM, "rare" is asked for 5x less.
        assert [len(runtimes[name].instances) for name in ("popular", "rare", "new")] == [1, 0, 1]


async def test_the_weights_an_engine_holds_replace_the_estimate(demo_model_dir, tmp_path):
    async with running_node(tmp_path) as running:
        view = await running.deploy("demo", demo_model_dir, keep_alive_s=600)
        estimated = view["memory"]
        assert estimated["weights_bytes"] > 0 and estimated["kv_bytes"] == 2 * 2 * 2 * 64 * 4 * 1024 * 32
        assert estimated["total_bytes"] == sum(estimated[k] for k in ("weights_bytes", "kv_bytes", "overhead_bytes"))
        assert (await running.complete("demo"))[0] == 200
        (instance,) = running.node.worker.runtimes["demo"].instances
        held = resident_bytes(instance.engine._model)
        measured = (await running.model_view("demo"))["memory"]
        assert measured["weights_bytes"] == held == instance.load_report.weights_bytes
        assert instance.memory_bytes == measured["total_bytes"]


async def test_a_failed_engine_stop_still_frees_its_memory(demo_model_dir, tmp_path):
    def factory(deployment, checkpoint_dir, device, resources):
        engine = default_engine_factory(deployment, checkpoint_dir, device, resources)
        stop = engine.stop

        async def crashing_stop() -> None:
            await stop()
            raise RuntimeError("the engine crashed on its way down")

        engine.stop = crashing_stop
        return engine

    async with running_node(tmp_path, factory) as running:
        await running.deploy("demo", demo_model_dir, keep_alive_s=0.1)
        assert (await running.complete("demo"))[0] == 200
        await wait_until(lambda: not running.node.worker.runtimes["demo"].instances and all_devices_free(running))


async def test_an_instance_whose_engine_dies_is_stopped_and_its_memory_freed(demo_model_dir, tmp_path):
    engines = []

    def factory(deployment, checkpoint_dir, device, resources):
        engine = default_engine_factory(deployment, checkpoint_dir, device, resources)
        if not engines:  # the first engine's worker thread dies at its first decode step

            def crash(batch):
                raise RuntimeError("simulated crash in the decode loop")

            engine._decode_step = crash
        engines.append(engine)
        return engine

    async with running_node(tmp_path, factory) as running:
        await running.deploy("demo", demo_model_dir, keep_alive_s=600)
        status, body = await running.complete("demo")
        assert status == 500 and "engine thread died" in body["error"]["message"], body
        await wait_until(lambda: not running.node.worker.runtimes["demo"].instances and all_devices_free(running))
        assert (await running.complete("demo"))[0] == 200  # a new instance, on a new engine
        assert len(engines) == 2


async def test_a_model_that_fits_no_device_is_refused_at_deploy(demo_model_dir, tmp_path):
    async with running_node(tmp_path, devices__cpu_slot_memory_gb=0.05) as running:
        body = {"name": "demo", "checkpoint": str(demo_model_dir)}
        async with running.http.post(f"{running.url}/admin/models", json=body) as response:
            assert response.status == 400
            error = (await response.json())["error"]
        assert error["code"] == "model_too_large" and "0.05 GiB" in error["message"], error
        assert running.node.state.deployment("demo") is None


async def test_pins_past_the_share_get_400_and_pins_at_the_share_leave_room_for_every_other_model(
        demo_model_dir, tmp_path):
    # One 0.6 GiB device: half of it holds two pinned demo instances (0.13 GiB each), not three.
    async with running_node(tmp_path, devices__cpu_slots=1, devices__cpu_slot_memory_gb=0.6) as running:
        await running.deploy("pinned", demo_model_dir, min_instances=2, max_instances=2)
        body = {"name": "more", "checkpoint": str(demo_model_dir), "autoscaling": {"min_instances": 1}}
        async with running.http.post(f"{running.url}/admin/models", json=body) as response:
            assert response.status == 400
            error = (await response.json())["error"]
        assert error["code"] == "pins_exceed_share" and error["param"] == "autoscaling.min_instances"
        assert "pinned 2 x" in error["message"] and "more 1 x" in error["message"], error
        async with running.http.patch(f"{running.url}/admin/models/pinned",
                                      json={"autoscaling": {"min_instances": 3, "max_instances": 3}}) as response:
            assert response.status == 400
        await wait_until(lambda: len(running.node.worker.runtimes["pinned"].ready()) == 2)
        for name in ("free1", "free2"):
            await running.deploy(name, demo_model_dir, keep_alive_s=600)
            assert (await running.complete(name))[0] == 200
        assert (await running.complete("pinned"))[0] == 200


async def test_memory_held_by_busy_instances_gets_503_naming_them_within_the_wait(demo_model_dir, tmp_path):
    async with running_node(tmp_path, **ONE_DEMO_DEVICE, serving__queue_timeout_s=0.5) as running:
        await running.deploy("a", demo_model_dir, keep_alive_s=600)
        await running.deploy("b", demo_model_dir, keep_alive_s=600)
        started, release = asyncio.Event(), asyncio.Event()
        holder = asyncio.create_task(long_stream(running, "a", started, release))
        await asyncio.wait_for(started.wait(), 10)
        began = time.monotonic()
        async with running.http.post(f"{running.url}/v1/completions", json={"model": "b", "prompt": "x"}) as response:
            assert response.status == 503
            assert int(response.headers["Retry-After"]) >= 1
            error = (await response.json())["error"]
        assert 0.5 <= time.monotonic() - began < 5
        assert error["code"] == "no_capacity", error
        assert "busy instances (a " in error["message"] and "needs" in error["message"], error
        release.set()
        await holder
        assert (await running.complete("b"))[0] == 200  # a idle now: evicted for b


async def test_memory_held_by_pinned_instances_gets_503_at_once(demo_model_dir, tmp_path):
    async with running_node(tmp_path, **ONE_DEMO_DEVICE, serving__pinned_memory_share=1.0,
                            serving__queue_timeout_s=30) as running:
        await running.deploy("kept", demo_model_dir, min_instances=1)
        await running.deploy("other", demo_model_dir)
        await wait_until(lambda: len(running.node.worker.runtimes["kept"].ready()) == 1)
        began = time.monotonic()
        status, body = await running.complete("other")
        assert status == 503 and time.monotonic() - began < 5  # not the 30 s queue timeout: nothing can free it
        assert body["error"]["code"] == "no_capacity"
        assert "kept for min_instances (kept " in body["error"]["message"], body
        assert "has free: cpu#0" in body["error"]["message"], body


SMALL_DISK_SCRIPT = """
import asyncio, json, sys
from pathlib import Path
from tests.nodes import running_node

async def main(data: Path, models: list[str]) -> None:
    statuses = {}
    async with running_node(data, store__probe_mb=0, devices__cpu_slots=1) as running:
        for i, model in enumerate(models):
            body = {"name": f"m{i}", "checkpoint": model, "autoscaling": {"keep_alive_s": 600}}
            async with running.http.post(f"{running.url}/admin/models", json=body) as response:
                statuses[f"deploy m{i}"] = response.status
        for i in (3, 4, 5):
            async with running.http.delete(f"{running.url}/admin/models/m{i}") as response:
                statuses[f"delete m{i}"] = response.status
        for i in (0, 1, 11, 2):
            statuses[f"complete m{i}"] = (await running.complete(f"m{i}"))[0]
        statuses["stored"] = len(running.node.worker.store.entries())
    print(json.dumps(statuses))

asyncio.run(main(Path(sys.argv[1]), sys.argv[2:]))
"""


def test_on_a_disk_smaller_than_the_store_budget_deploys_and_requests_make_room_and_never_get_500(
        demo_model_dir, tmp_path):
    """Twelve distinct 1.8 MB checkpoints on a 16 MiB data directory (a tmpfs in a private mount namespace)
    with the default 100 GB store budget: every deploy stores its checkpoint by evicting older ones no
    instance uses, and a request for a model whose copy was evicted fetches it again."""
    models = [str(shutil.copytree(demo_model_dir, tmp_path / "repo" / f"m{i}")) for i in range(12)]
    data = tmp_path / "data"
    data.mkdir()
    result = run_on_small_disk(SMALL_DISK_SCRIPT, data, *models, timeout_s=300)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    statuses = json.loads(result.stdout.strip().splitlines()[-1])
    stored = statuses.pop("stored")
    assert stored < 12  # the disk could not hold them all: eviction made the room
    assert statuses == {**{f"deploy m{i}": 201 for i in range(12)}, **{f"delete m{i}": 200 for i in (3, 4, 5)},
                        **{f"complete m{i}": 200 for i in (0, 1, 11, 2)}}, statuses


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device (scripts/gpu_check.sh)")
async def test_two_instances_share_one_gpu_each_within_its_budget(demo_model_dir, tmp_path):
    import torch

    async with running_node(tmp_path, devices__kind="cuda", devices__cuda_devices=[0], store__probe_mb=0) as running:
        for name in ("a", "b"):
            await running.deploy(name, demo_model_dir, keep_alive_s=600)
        before = torch.cuda.memory_allocated(0)
        torch.cuda.reset_peak_memory_stats(0)
        for name in ("a", "b"):
            status, body = await running.complete(name, max_tokens=64)
            assert status == 200, body
        worker = running.node.worker
        (a,), (b,) = worker.runtimes["a"].instances, worker.runtimes["b"].instances
        assert [d.name for d in a.devices] == [d.name for d in b.devices] == ["cuda:0"]
        # What the engines really hold on the GPU stays within what they asked for, and the weights they hold are
        # the estimate's weights.
        peak = torch.cuda.max_memory_allocated(0) - before
        assert peak <= a.memory_bytes + b.memory_bytes, (peak, a.memory_bytes, b.memory_bytes)
        for instance in (a, b):
            need = worker.estimates.memory_need(instance.deployment)
            assert need.weights_bytes == resident_bytes(instance.engine._model)
        print(f"gpu sharing: peak {peak} B for two instances asking {a.memory_bytes + b.memory_bytes} B")
