"""The serverless lifecycle of this node's instances: scale from zero, scale out, keep-alive, eviction.

`Worker` decides how many instances of each deployment run here and which idle ones stop; its parts do the
rest: `admission` hands requests ready instances and bounds their wait, `lifecycle` starts and stops
instances. Capacity is memory: each device is a budget (`devices.DevicePool`) that instances share while
they fit; an instance asks what `NodeEstimates.memory_need` says. When none fits, idle instances of other
models are evicted by the cost rule (`scheduler.eviction`); instances kept for min_instances hold at most
`serving.pinned_memory_share` of the node's memory. Event-driven throughout: a request that finds no ready
instance triggers a start at once and waits; an instance that goes idle arms a keep-alive timer; freed
memory re-runs scaling for every model with waiting requests. Nothing polls.

Not thread-safe: every method runs on the event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from sllmd.checkpoint.fetch import FetchReport
from sllmd.checkpoint.progress import human_bytes
from sllmd.checkpoint.store import CheckpointStore, checkpoint_id, reads_store
from sllmd.config import ServingConfig
from sllmd.engine import NO_RESOURCES, EngineResources
from sllmd.metrics import Metrics
from sllmd.scheduler.autoscale import num_instances_to_start, num_instances_wanted
from sllmd.scheduler.estimate import Calibration, transfer_time_s
from sllmd.scheduler.eviction import EvictionCandidate, plan_evictions
from sllmd.scheduler.topology import device_groups
from sllmd.state.models import Deployment, InstanceState
from sllmd.types import MAX_INSTANCES, Backend, Tier
from sllmd.worker.admission import Admission
from sllmd.worker.devices import Device, DevicePool
from sllmd.worker.estimates import NodeEstimates
from sllmd.worker.instance import Instance, ModelRuntime, NoRoom
from sllmd.worker.lifecycle import EngineFactory, InstanceRecords, Lifecycle, default_engine_factory
from sllmd.worker.start_progress import StartWatch
from sllmd.worker.warming import DramWarmer

log = logging.getLogger(__name__)


class Worker:
    def __init__(
        self,
        node_id: str,
        devices: DevicePool,
        records: InstanceRecords,
        serving: ServingConfig,
        metrics: Metrics,
        store: CheckpointStore,
        engine_factory: EngineFactory = default_engine_factory,
        *,
        resources: EngineResources = NO_RESOURCES,
        calibration: Calibration | None = None,
        instances_elsewhere: Callable[[str], int] = lambda model: 0,
        min_instances_here: Callable[[Deployment], int] = lambda deployment: deployment.autoscaling.min_instances,
    ) -> None:
        """`records`: where instance records are written. `calibration`: the estimates' starting point before
        the probe and real loads correct it (default: `Calibration.defaults()`). From the cluster:
        `instances_elsewhere(model)`, the model's live instances on other nodes, and `min_instances_here(d)`,
        this node's share of `d`'s min_instances (the defaults are a node alone's: none, and all of them)."""
        self.node_id = node_id
        self.devices = devices
        self.serving = serving
        self.metrics = metrics
        self.store = store
        self.resources = resources
        self.dram_cache = dram_cache = resources.dram_cache
        self.estimates = NodeEstimates(
            store, dram_cache, metrics, calibration or Calibration.defaults(), max_batch_size=serving.max_batch_size,
            max_kv_bytes=int(serving.max_batch_kv_gb * (1 << 30)),
            on_gpu=any(d.name.startswith("cuda") for d in devices.devices))
        self.runtimes: dict[str, ModelRuntime] = {}
        self.instances_elsewhere = instances_elsewhere
        self.min_instances_here = min_instances_here
        self.warmer = None if dram_cache is None else DramWarmer(
            # Models with an instance here are left out: a start caches its checkpoint on the way anyway.
            store, dram_cache, lambda: {name: r.deployment for name, r in self.runtimes.items() if not r.instances})
        self.lifecycle = Lifecycle(node_id, devices, records, metrics, store, self.estimates, self.warmer,
                                   engine_factory, resources, on_ready=self._on_ready,
                                   on_capacity_freed=self._on_capacity_freed)
        self.admission = Admission(self.runtimes, serving, metrics, scale=self._scale, keep_alive=self._arm_idle_timer,
                                   engine_died=self._on_engine_died)
        self.lifecycle.show_free_memory()

    # -- deployments ---------------------------------------------------------------------------

    def sync_deployment(self, deployment: Deployment) -> None:
        """Adopt a new or updated deployment; starts instances up to its min_instances."""
        runtime = self.runtimes.get(deployment.name)
        if runtime is None:
            runtime = self.runtimes[deployment.name] = ModelRuntime(deployment)
        runtime.deployment = deployment
        for instance in runtime.instances:
            instance.deployment = deployment
            if instance.in_flight == 0 and instance.state is InstanceState.READY:
                self._arm_idle_timer(runtime, instance)
        self._scale(runtime)

    async def remove_deployment(self, name: str) -> None:
        """Stop every instance of `name`; waiting requests fail with ModelNotFound."""
        runtime = self.runtimes.pop(name, None)
        if runtime is None:
            return
        runtime.is_removed = True
        self.metrics.forget_model(name)
        await runtime.notify()
        stopping = [self.lifecycle.stop(runtime, instance) for instance in list(runtime.instances)]
        await asyncio.gather(*stopping, return_exceptions=True)

    def prestart(self, deployment: Deployment) -> None:
        """Start an engine for `deployment` in the background and park it, so that its first request (or a model
        of its shape) finds one ready: for vLLM deployments, with `serving.vllm_prestart` on and room among the
        parked engines (see `Lifecycle.prestart`)."""
        pool, runtime = self.resources.vllm_pool, self.runtimes.get(deployment.name)
        if (deployment.backend is Backend.VLLM and self.serving.vllm_prestart and pool is not None
                and pool.capacity > 0 and runtime is not None):
            self.lifecycle.prestart(runtime)

    def parked_models(self) -> list[str]:
        """This node's vLLM deployments with an engine of their shape parked here, which a start of one takes."""
        return [name for name, runtime in self.runtimes.items()
                if self.lifecycle.has_parked_engine(runtime.deployment)]

    # -- requests and instances ----------------------------------------------------------------

    def lease(self, model: str, watch: StartWatch | None = None) -> AbstractAsyncContextManager[Instance]:
        """A ready instance of `model` for one request, held until the block exits (`Admission.lease`)."""
        return self.admission.lease(model, watch)

    def hold(self, runtime: ModelRuntime, instance: Instance) -> AbstractAsyncContextManager[Instance]:
        """Count one request on `instance` until the block exits (`Admission.hold`)."""
        return self.admission.hold(runtime, instance)

    def find(self, instance_id: str) -> tuple[ModelRuntime, Instance] | None:
        """The live (starting or ready) instance `instance_id` of this node and its model's runtime."""
        for runtime in self.runtimes.values():
            for instance in runtime.instances:
                if instance.id == instance_id:
                    return runtime, instance
        return None

    async def set_draining(self, runtime: ModelRuntime, instance: Instance, is_draining: bool) -> None:
        instance.is_draining = is_draining
        if not is_draining:
            await runtime.notify()  # requests waiting for a ready instance may take it again

    async def stop_instance(self, runtime: ModelRuntime, instance: Instance) -> None:
        """Stop `instance` and wait until its memory is free again (a migrated-away instance)."""
        await self.lifecycle.stop(runtime, instance)

    # -- scaling -------------------------------------------------------------------------------

    def _scale(self, runtime: ModelRuntime) -> None:
        """Start as many instances as the policy wants and memory allows, evicting idle instances of other
        models (by the cost rule) when no device has room. What stops it is left in `runtime.no_room`.

        `max_instances` bounds the model's instances cluster-wide, so a scale-out here counts those on
        other nodes. A node's first instance does not: it is a migration's destination (which replaces
        one elsewhere) or a start the leader placed here, or else the leader could not be asked. Starts for
        min_instances stop at the node's pinned share of memory."""
        if runtime.is_removed or runtime.start_error is not None:
            return  # after a failed start, only a new request retries (no restart loop)
        if runtime.prestarting is not None and not runtime.instances:
            return  # its engine is on its way: the first instance takes it once it is parked
        policy, num_live = runtime.deployment.autoscaling, len(runtime.instances)
        num_kept = self.min_instances_here(runtime.deployment) if policy.min_instances else 0
        if policy.min_instances:
            policy = dataclasses.replace(policy, min_instances=num_kept)
        num_missing = num_instances_wanted(policy, runtime.demand()) - num_live
        if num_missing <= 0:
            runtime.no_room = None
            return  # the common case, on every request: nothing to start, so no eviction scan
        num_new = num_instances_to_start(
            policy, demand=runtime.demand(), num_live=num_live, num_startable=MAX_INSTANCES,
            num_elsewhere=self.instances_elsewhere(runtime.deployment.name) if num_live else 0,
        )
        need = self.estimates.memory_need(runtime.deployment).total_bytes
        runtime.no_room = None
        for _ in range(num_new):
            is_pin = len(runtime.instances) < num_kept and runtime.demand() <= len(runtime.instances)
            if is_pin and self.pinned_bytes() + need * runtime.deployment.num_gpus > self.pinned_limit_bytes():
                log.warning("min_instances past the node's pinned share: not started",
                            extra={"model": runtime.deployment.name, "pinned_bytes": self.pinned_bytes(),
                                   "limit_bytes": self.pinned_limit_bytes()})
                break
            instance_id = f"{runtime.deployment.name}-{uuid.uuid4().hex[:8]}"
            placed = self._make_room(runtime, instance_id, need)
            if placed is None:
                runtime.no_room = self._no_room(runtime, need)
                break
            devices, evicting = placed
            instance = Instance(instance_id, runtime.deployment, devices, need)
            runtime.instances.append(instance)
            self.lifecycle.start(runtime, instance, evicting)
        self.lifecycle.update_gauges(runtime)

    def _make_room(self, runtime: ModelRuntime, instance_id: str, need: int
                   ) -> tuple[tuple[Device, ...], asyncio.Future | None] | None:
        """Hold `need` bytes for `instance_id` on each of the devices its model spans: ones with room, or ones
        where evicting idle instances of other models makes it (their stops are the returned future). None: no
        set of devices can."""
        num_devices = runtime.deployment.num_gpus
        devices = self.devices.acquire(instance_id, need, num_devices)
        if devices is not None:
            return devices, None
        candidates = self.eviction_candidates(exclude=runtime)
        groups = device_groups(len(self.devices.devices), num_devices, self.devices.topology)
        plan = plan_evictions([candidate for candidate, _, _ in candidates],
                              dict(enumerate(self.devices.free_by_device())), need, groups=groups)
        if plan is None:
            return None
        devices = tuple(self.devices.devices[i] for i in plan.devices)
        self.devices.take_over(devices, instance_id, need, list(plan.evictions))
        by_id = {candidate.id: (victim_runtime, victim) for candidate, victim_runtime, victim in candidates}
        stops = []
        for victim_id in plan.evictions:
            victim_runtime, victim = by_id[victim_id]
            log.info("evicting idle instance", extra={"instance": victim.id, "for_model": runtime.deployment.name})
            stops.append(self.lifecycle.stop(victim_runtime, victim, is_evicted=True))
        return devices, asyncio.gather(*stops)

    def _no_room(self, runtime: ModelRuntime, need: int) -> NoRoom:
        """Why no device here can hold `need` more bytes for `runtime`'s model, and whether that can change
        without an operator (busy or starting instances free their memory once their requests end)."""
        busy: dict[str, int] = {}
        pinned: dict[str, int] = {}
        evictable = {victim.id for _, _, victim in self.eviction_candidates(exclude=runtime)}
        for other in self.runtimes.values():
            for instance in other.instances:
                held = instance.memory_bytes * len(instance.devices)
                if instance.in_flight or instance.state is InstanceState.STARTING:
                    busy[other.deployment.name] = busy.get(other.deployment.name, 0) + held
                elif instance.id not in evictable:
                    pinned[other.deployment.name] = pinned.get(other.deployment.name, 0) + held
        free = ", ".join(f"{d.name}#{d.index} {human_bytes(self.devices.free_bytes(d))} of "
                         f"{human_bytes(d.budget_bytes)}" for d in self.devices.devices)
        held = [f"busy instances ({_by_model(busy)})"] if busy else []
        held += [f"instances kept for min_instances ({_by_model(pinned)})"] if pinned else []
        devices = runtime.deployment.num_gpus
        needs = human_bytes(need) + (f" on each of {devices} devices" if devices > 1 else "")
        reason = (f"an instance of '{runtime.deployment.name}' needs {needs} of device memory; node "
                  f"{self.node_id} has free: {free or 'no devices'}"
                  + (f"; the rest is held by {' and '.join(held)}" if held else ""))
        return NoRoom(reason, will_free=bool(busy))

    def kept_instances(self) -> list[Instance]:
        """The instances kept for their model's min_instances here: the first ones of each such model."""
        return [instance for runtime in self.runtimes.values() if runtime.deployment.autoscaling.min_instances
                for instance in runtime.instances[:self.min_instances_here(runtime.deployment)]]

    def pinned_bytes(self) -> int:
        """Memory held by the instances kept for min_instances here."""
        return sum(instance.memory_bytes * len(instance.devices) for instance in self.kept_instances())

    def pinned_limit_bytes(self) -> int:
        """What instances kept for min_instances may hold here: the pinned share of every device's budget."""
        return int(self.serving.pinned_memory_share * sum(d.budget_bytes for d in self.devices.devices))

    def keep_min_instances(self) -> None:
        """Bring every model with min_instances to this node's current share of them: start missing ones,
        and let ones no longer needed here run out their keep-alive (the share moves as nodes come and go)."""
        for runtime in self.runtimes.values():
            if not runtime.deployment.autoscaling.min_instances:
                continue
            self._scale(runtime)
            for instance in runtime.ready():
                if instance.in_flight == 0 and instance.idle_timer is None:
                    self._arm_idle_timer(runtime, instance)

    def eviction_candidates(self, exclude: ModelRuntime | None
                            ) -> list[tuple[EvictionCandidate, ModelRuntime, Instance]]:
        """Idle ready instances of models other than `exclude`'s beyond their min_instances (the longest idle
        of each model go first), as the eviction rule sees them: the memory each frees, the seconds to start
        it again from where its checkpoint is, its model's request rate."""
        found = []
        now = time.monotonic()
        for runtime in self.runtimes.values():
            if runtime is exclude:
                continue
            spare = len(runtime.instances) - self.min_instances_here(runtime.deployment)
            idle = [i for i in runtime.ready() if i.in_flight == 0]
            if spare <= 0 or not idle:
                continue
            idle.sort(key=lambda i: i.idle_since)
            reload_s, _ = self.estimates.estimate(runtime.deployment)
            rate = runtime.request_rate.per_s(now)
            keep_alive_s = runtime.deployment.autoscaling.keep_alive_s
            for instance in idle[:spare]:
                idle_s = now - instance.idle_since
                candidate = EvictionCandidate(instance.id, tuple(d.index for d in instance.devices),
                                              instance.memory_bytes, reload_s, rate, idle_s,
                                              max(0.0, keep_alive_s - idle_s))
                found.append((candidate, runtime, instance))
        return found

    def _on_capacity_freed(self) -> None:
        for runtime in list(self.runtimes.values()):
            if runtime.num_waiting:
                self._scale(runtime)

    def _on_engine_died(self, runtime: ModelRuntime, instance: Instance) -> None:
        log.error("instance's engine died, stopping it", extra={"instance": instance.id})
        self.lifecycle.stop(runtime, instance)

    # -- keep-alive ----------------------------------------------------------------------------

    def _on_ready(self, runtime: ModelRuntime, instance: Instance) -> None:
        if instance.in_flight == 0:
            self._arm_idle_timer(runtime, instance)

    def _arm_idle_timer(self, runtime: ModelRuntime, instance: Instance) -> None:
        instance.disarm_idle_timer()
        keep_alive_s = runtime.deployment.autoscaling.keep_alive_s
        instance.idle_timer = asyncio.get_running_loop().call_later(keep_alive_s, self._on_idle_timeout, runtime,
                                                                    instance)

    def _on_idle_timeout(self, runtime: ModelRuntime, instance: Instance) -> None:
        instance.idle_timer = None
        is_spare = len(runtime.instances) > self.min_instances_here(runtime.deployment)
        if instance.in_flight == 0 and instance.state is InstanceState.READY and is_spare:
            log.info("instance idle past keep-alive, stopping", extra={"instance": instance.id})
            self.lifecycle.stop(runtime, instance)

    # -- estimates and records -----------------------------------------------------------------

    def pending_load_s(self) -> float:
        """Estimated seconds the SSD and network are still busy with starts under way here (what a new
        start from the SSD or a peer queues behind; DRAM loads do not)."""
        now = time.time()
        return sum(max(0.0, i.estimated_transfer_s - (now - i.started_at)) for r in self.runtimes.values()
                   for i in r.instances if i.state is InstanceState.STARTING)

    def checkpoint_eviction_cost(self, cid: str, num_bytes: int) -> float:
        """What dropping this node's store copy of checkpoint `cid` (`num_bytes`) costs, by the eviction cost
        rule: the seconds to fetch it again (from a peer that holds it, else the repository) times the recent
        request rate of the models served from it here (so 0 for one no model here asked for lately)."""
        now = time.monotonic()
        rate = sum(runtime.request_rate.per_s(now) for runtime in self.runtimes.values()
                   if reads_store(runtime.deployment.backend, runtime.deployment.checkpoint)
                   and checkpoint_id(runtime.deployment.checkpoint) == cid)
        if rate == 0.0:
            return 0.0
        tier = Tier.PEER if self.store.peer_sources(cid) else Tier.REPOSITORY
        return rate * transfer_time_s(num_bytes, tier, self.estimates.calibration)

    def on_fetched(self, tier: Tier, report: FetchReport) -> None:
        """The store copied a checkpoint in: learn from it, and see whether it deserves DRAM."""
        self.estimates.observe_fetch(tier, report)
        if self.warmer is not None:
            self.warmer.consider()

    def record_all(self) -> None:
        """Queue the records of every live instance again (after the cluster dropped this node's records,
        e.g. while it was cut off longer than the dead-node timeout)."""
        for runtime in self.runtimes.values():
            for instance in runtime.instances:
                self.lifecycle.record(instance)

    async def close(self) -> None:
        """Stop every instance and wait for background work."""
        if self.warmer is not None:
            await self.warmer.close()
        for name in list(self.runtimes):
            await self.remove_deployment(name)
        await self.lifecycle.close()
        if self.resources.vllm_pool is not None:
            await self.resources.vllm_pool.close()


def _by_model(held: dict[str, int]) -> str:
    return ", ".join(f"{model} {human_bytes(num_bytes)}" for model, num_bytes in sorted(held.items()))
