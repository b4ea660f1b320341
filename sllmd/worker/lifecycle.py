"""Starting and stopping this node's instances, and prestarting vLLM engines to park.

A start pins the checkpoint's store copy (fetched again if it was evicted since deploy), builds the engine
off the event loop and loads it; a stop ends the engine, then frees the memory it held on its device (unless
a new instance took it over) and the pin. When to start or stop, and on which device, is the caller's
decision (`Worker`'s scaling); `Lifecycle` carries it out and reports back through `on_ready` and
`on_capacity_freed`.

Every state change of an instance is written to the replicated state with `record_soon`: queued in order
and never awaited, so no consensus round lies between "engine loaded" and "first token" (the leader's
placement reservation covers the time until the record lands).

Not thread-safe: the event loop only.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from sllmd.checkpoint.store import CheckpointLease, CheckpointStore, checkpoint_id, reads_store
from sllmd.engine import NO_RESOURCES, Engine, EngineResources, create_engine
from sllmd.engine.vllm_pool import engine_key_of
from sllmd.metrics import Metrics
from sllmd.state.machine import Op
from sllmd.state.models import Deployment, InstanceState
from sllmd.tasks import TaskSet
from sllmd.types import Backend, LoadReport, Tier
from sllmd.worker.devices import DevicePool, engine_device
from sllmd.worker.estimates import NodeEstimates
from sllmd.worker.instance import Instance, ModelRuntime
from sllmd.worker.start_progress import StartPhase
from sllmd.worker.warming import DramWarmer

log = logging.getLogger(__name__)

# (deployment, local checkpoint directory, device, what the node lends its engines) -> a new engine.
EngineFactory = Callable[[Deployment, Path, str, EngineResources], Engine]


def default_engine_factory(deployment: Deployment, checkpoint_dir: Path, device: str,
                           resources: EngineResources = NO_RESOURCES) -> Engine:
    return create_engine(deployment.backend, checkpoint_dir, device, dtype=deployment.dtype,
                         max_model_len=deployment.context_length, start_mode=deployment.start_mode,
                         resources=resources, tensor_parallel_size=deployment.num_gpus)


class InstanceRecords(Protocol):
    """Where instance records go: the node's `ReplicatedStateMachine`."""

    def record_soon(self, command: dict[str, Any]) -> None:
        """Queue an instance-record write (PUT_INSTANCE, DELETE_INSTANCE) to commit after every one queued
        before it, and return at once."""
        ...


class Lifecycle:
    def __init__(
        self,
        node_id: str,
        devices: DevicePool,
        records: InstanceRecords,
        metrics: Metrics,
        store: CheckpointStore,
        estimates: NodeEstimates,
        warmer: DramWarmer | None,
        engine_factory: EngineFactory,
        resources: EngineResources,
        *,
        on_ready: Callable[[ModelRuntime, Instance], None],
        on_capacity_freed: Callable[[], None],
    ) -> None:
        """`on_ready(runtime, instance)` runs once an instance is ready, before its waiters wake;
        `on_capacity_freed()` once a stop or a prestart gave its memory back."""
        self.node_id = node_id
        self.devices = devices
        self.records = records
        self.metrics = metrics
        self.store = store
        self.estimates = estimates
        self.warmer = warmer
        self.engine_factory = engine_factory
        self.resources = resources
        self.on_ready = on_ready
        self.on_capacity_freed = on_capacity_freed
        self._engine_keys: dict[Deployment, str] = {}  # vLLM deployments' engine keys (`vllm_pool.engine_key`)
        self._leases: dict[str, CheckpointLease] = {}  # instance id -> its pinned store entry
        self._tasks = TaskSet()

    # -- instances -----------------------------------------------------------------------------

    def start(self, runtime: ModelRuntime, instance: Instance, evicting: asyncio.Future | None) -> None:
        """Begin starting `instance`, already in `runtime.instances` and holding its memory (freed for it by
        the evictions `evicting`, when not None). It becomes READY and its waiters wake; or, if it fails,
        `runtime.start_error` is set, the waiters wake to it and the instance is stopped."""
        # Estimated and shown before the task runs, so a waiter looking at once sees the start as it will go.
        instance.estimated_start_s, instance.estimated_transfer_s = self.estimates.estimate(
            runtime.deployment, parked=self.has_parked_engine(runtime.deployment))
        instance.progress.begin(self.estimates.checkpoint_tier(runtime.deployment),
                                runtime.deployment.checkpoint_bytes, instance.estimated_start_s)
        instance.starting = self._tasks.spawn(self._start(runtime, instance, evicting))

    async def _start(self, runtime: ModelRuntime, instance: Instance, evicting: asyncio.Future | None) -> None:
        began = time.monotonic()
        try:
            if evicting is not None:
                await evicting
            self.record(instance)
            deployment = runtime.deployment
            checkpoint_dir, fetched_from = Path(deployment.checkpoint), None
            if reads_store(deployment.backend, deployment.checkpoint):
                instance.progress.enter(StartPhase.FETCHING)  # passed at once when the store has it
                # Pinned until the instance stops; fetched again if it was evicted since deploy.
                lease = self._leases[instance.id] = await self.store.acquire(deployment.checkpoint,
                                                                             progress=instance.progress.count)
                checkpoint_dir = lease.path
                fetched_from = None if lease.tier == Tier.SSD else lease.tier
            instance.progress.enter(StartPhase.CREATING, tier=fetched_from)
            instance.engine = await asyncio.to_thread(
                self.engine_factory, deployment, checkpoint_dir, engine_device(instance.devices),
                self._resources_for(deployment))
            if instance.state is not InstanceState.STARTING:
                return  # stopped meanwhile; nothing started yet
            instance.progress.enter(StartPhase.LOADING)
            report = await instance.engine.start()
            self.estimates.observe_load(deployment, report)
            self.estimates.observe_memory(deployment, report)
            # What it really holds from now on (the measured weights replace the estimate).
            instance.memory_bytes = self.estimates.memory_need(deployment).total_bytes
            self.devices.resize(instance.id, instance.memory_bytes)
            if fetched_from is not None:  # the bytes came from a peer or the repository on this start
                report = dataclasses.replace(report, source_tier=fetched_from)
            instance.load_report = report
        except Exception as exc:  # any engine failure must reach the waiters
            log.error("instance failed to start", extra={"instance": instance.id, "error": repr(exc)})
            runtime.start_error = exc
            self.stop(runtime, instance)  # not awaited: the stop waits for this task to end
            return
        if instance.state is not InstanceState.STARTING:
            return  # stopped while starting (model removed); the stop cleans up
        instance.state = InstanceState.READY
        self._observe_start(instance, report, time.monotonic() - began)
        self.record(instance)
        self.on_ready(runtime, instance)
        self.update_gauges(runtime)
        await runtime.notify()

    def _observe_start(self, instance: Instance, report: LoadReport, start_s: float) -> None:
        name, tier = instance.deployment.name, report.source_tier
        self.metrics.cold_starts.labels(name, tier).inc()
        self.metrics.cold_start_seconds.labels(name, tier).observe(start_s)
        self.metrics.load_bytes.labels(name, tier).inc(report.num_bytes)
        for phase, seconds in report.phases.items():
            self.metrics.start_phase_seconds.labels(instance.deployment.engine_kind, phase).observe(seconds)
        if report.load_s > 0 and report.num_bytes:
            self.metrics.load_gbps.labels(name, tier).observe(report.num_bytes / report.load_s / 1e9)
        self.metrics.start_estimate_error.labels(tier).observe(abs(start_s - instance.estimated_start_s))
        log.info(
            "instance ready",
            extra={"instance": instance.id, "device": engine_device(instance.devices),
                   "memory_bytes": instance.memory_bytes,
                   "tier": tier,
                   "bytes": report.num_bytes, "load_s": round(report.load_s, 4), "init_s": round(report.init_s, 4),
                   "start_s": round(start_s, 4), "estimated_s": round(instance.estimated_start_s, 4)},
        )

    def stop(self, runtime: ModelRuntime, instance: Instance, *, is_evicted: bool = False) -> asyncio.Task:
        """Begin stopping `instance` (idempotent); the returned task finishes when its memory is free.

        `is_evicted`: a new instance took its memory over already (`DevicePool.take_over`), so its end frees
        nothing for anyone else.
        """
        if instance.stopped is not None:
            return instance.stopped
        instance.state = InstanceState.STOPPING
        instance.disarm_idle_timer()
        if instance in runtime.instances:
            runtime.instances.remove(instance)

        async def stop() -> None:
            if instance.starting is not None:
                await asyncio.wait([instance.starting])  # stop what the start made, not half of it
            try:
                if instance.engine is not None:
                    await instance.engine.stop()
            except Exception as exc:  # a failed stop must still free the memory
                log.error("engine stop failed", extra={"instance": instance.id, "error": repr(exc)})
            self.devices.release(instance.id)
            if (lease := self._leases.pop(instance.id, None)) is not None:
                self.store.release(lease)
            self.records.record_soon({"op": Op.DELETE_INSTANCE, "id": instance.id})
            if self.warmer is not None:
                self.warmer.consider()  # the model left the device: keep it (or a more popular one) one copy away
            self.update_gauges(runtime)
            await runtime.notify()
            if not is_evicted:
                self.on_capacity_freed()

        instance.stopped = self._tasks.spawn(stop())
        self.update_gauges(runtime)
        return instance.stopped

    def record(self, instance: Instance) -> None:
        """Queue a write of `instance`'s record as it is now."""
        self.records.record_soon({"op": Op.PUT_INSTANCE, "instance": instance.to_record(self.node_id).to_wire()})

    def update_gauges(self, runtime: ModelRuntime) -> None:
        name = runtime.deployment.name
        for state in (InstanceState.STARTING, InstanceState.READY):
            self.metrics.instances.labels(name, state.value).set(sum(1 for i in runtime.instances if i.state is state))
        self.show_free_memory()

    def show_free_memory(self) -> None:
        for device in self.devices.devices:
            self.metrics.device_free_bytes.labels(str(device.index)).set(self.devices.free_bytes(device))

    # -- parked engines ------------------------------------------------------------------------

    def prestart(self, runtime: ModelRuntime) -> None:
        """In the background, start an engine for `runtime`'s deployment and park it, unless an instance of it
        starts anyway. It holds an instance's memory while it starts (no room: no prestart) and its store copy
        pinned; the model's first instance waits for it (`runtime.prestarting`)."""
        self._tasks.spawn(self._prestart(runtime))

    async def _prestart(self, runtime: ModelRuntime) -> None:
        deployment = runtime.deployment
        if runtime.is_removed or runtime.instances:
            return
        holder = f"{deployment.name}-prestart-{uuid.uuid4().hex[:8]}"
        devices = self.devices.acquire(holder, self.estimates.memory_need(deployment).total_bytes,
                                       deployment.num_gpus)
        if devices is None:
            return
        estimated_s, _ = self.estimates.estimate(deployment, parked=self.has_parked_engine(deployment))
        runtime.prestarting = (estimated_s, time.time())
        await runtime.notify()  # waiters bound their wait by this start now
        try:
            lease = await self.store.acquire(deployment.checkpoint)
            try:
                engine = await asyncio.to_thread(self.engine_factory, deployment, lease.path, engine_device(devices),
                                                 self._resources_for(deployment))
                report = await engine.start()
                self.estimates.observe_load(deployment, report)  # a new engine's start, timed like any other
                await engine.stop()  # parks it
            finally:
                self.store.release(lease)
            log.info("prestarted an engine", extra={"model": deployment.name, "start_s": round(report.init_s, 3)})
        except Exception as exc:  # its first request starts one the usual way, and reports a failure itself
            log.warning("could not prestart an engine", extra={"model": deployment.name, "error": repr(exc)})
        finally:
            runtime.prestarting = None
            self.devices.release(holder)
            self.show_free_memory()
            self.on_capacity_freed()

    def has_parked_engine(self, deployment: Deployment) -> bool:
        """Whether a parked engine of `deployment`'s shape waits here, which a start of it would take."""
        pool = self.resources.vllm_pool
        if pool is None or not len(pool) or deployment.backend is not Backend.VLLM:
            return False
        key = self._engine_keys.get(deployment)
        if key is None:
            cid = checkpoint_id(deployment.checkpoint)
            if not self.store.contains(cid):
                return False
            # An engine's key depends on the model's config.json: read it once per deployment (revision).
            key = self._engine_keys[deployment] = engine_key_of(
                self.store.path_of(cid), dtype=deployment.dtype, max_model_len=deployment.context_length,
                device=engine_device(self.devices.devices[:deployment.num_gpus]), start_mode=deployment.start_mode,
                kv_cache_bytes=self._resources_for(deployment).max_batch_kv_bytes,
                tensor_parallel_size=deployment.num_gpus)
        return pool.has(key)

    def _resources_for(self, deployment: Deployment) -> EngineResources:
        """The node's resources, with the KV budget of an instance of `deployment` as its engine's KV cap."""
        return dataclasses.replace(self.resources,
                                   max_batch_kv_bytes=self.estimates.memory_need(deployment).kv_bytes)

    async def close(self) -> None:
        """Wait for every start, stop and prestart under way."""
        await self._tasks.close(cancel=False)
