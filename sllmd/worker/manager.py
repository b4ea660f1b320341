"""The serverless lifecycle of this node's instances: scale from zero, scale out, keep-alive, eviction.

`Worker` decides how many instances of each deployment run here and which idle ones stop; its parts do the
rest: `admission` hands requests ready instances and bounds their wait, `lifecycle` starts and stops
instances. Event-driven throughout: a request that finds no ready instance triggers a start at once and
waits; an instance that goes idle arms a keep-alive timer; a freed slot re-runs scaling for every model
with waiting requests. Nothing polls.

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
from sllmd.checkpoint.store import CheckpointStore
from sllmd.config import ServingConfig
from sllmd.engine import NO_RESOURCES, EngineResources
from sllmd.metrics import Metrics
from sllmd.scheduler.autoscale import num_instances_to_start, num_instances_wanted
from sllmd.scheduler.estimate import Calibration
from sllmd.state.models import Deployment, InstanceState
from sllmd.types import Backend, Tier
from sllmd.worker.admission import Admission
from sllmd.worker.estimates import NodeEstimates
from sllmd.worker.instance import Instance, ModelRuntime
from sllmd.worker.lifecycle import EngineFactory, InstanceRecords, Lifecycle, default_engine_factory
from sllmd.worker.slots import SlotPool
from sllmd.worker.warming import DramWarmer

log = logging.getLogger(__name__)


class Worker:
    def __init__(
        self,
        node_id: str,
        slots: SlotPool,
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
        self.slots = slots
        self.serving = serving
        self.metrics = metrics
        self.store = store
        self.resources = resources
        self.dram_cache = dram_cache = resources.dram_cache
        self.estimates = NodeEstimates(store, dram_cache, metrics, calibration or Calibration.defaults())
        self.runtimes: dict[str, ModelRuntime] = {}
        self.instances_elsewhere = instances_elsewhere
        self.min_instances_here = min_instances_here
        self.warmer = None if dram_cache is None else DramWarmer(
            # Models with an instance here are left out: a start caches its checkpoint on the way anyway.
            store, dram_cache, lambda: {name: r.deployment for name, r in self.runtimes.items() if not r.instances})
        self.lifecycle = Lifecycle(node_id, slots, records, metrics, store, self.estimates, self.warmer,
                                   engine_factory, resources, on_ready=self._on_ready,
                                   on_capacity_freed=self._on_capacity_freed)
        self.admission = Admission(self.runtimes, serving, metrics, scale=self._scale, keep_alive=self._arm_idle_timer)
        metrics.free_slots.set(slots.num_free)

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

    def lease(self, model: str) -> AbstractAsyncContextManager[Instance]:
        """A ready instance of `model` for one request, held until the block exits (`Admission.lease`)."""
        return self.admission.lease(model)

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
        """Stop `instance` and wait until its slot is free again (a migrated-away instance)."""
        await self.lifecycle.stop(runtime, instance)

    # -- scaling -------------------------------------------------------------------------------

    def _scale(self, runtime: ModelRuntime) -> None:
        """Start as many instances as the policy wants and capacity allows, evicting idle
        instances of other models when no slot is free.

        `max_instances` bounds the model's instances cluster-wide, so a scale-out here counts those on
        other nodes. A node's first instance does not: it is a migration's destination (which replaces
        one elsewhere) or a start the leader placed here, or else the leader could not be asked."""
        if runtime.is_removed or runtime.start_error is not None:
            return  # after a failed start, only a new request retries (no restart loop)
        if runtime.prestarting is not None and not runtime.instances:
            return  # its engine is on its way: the first instance takes it once it is parked
        policy, num_live = runtime.deployment.autoscaling, len(runtime.instances)
        if policy.min_instances:
            policy = dataclasses.replace(policy, min_instances=self.min_instances_here(runtime.deployment))
        num_missing = num_instances_wanted(policy, runtime.demand()) - num_live
        if num_missing <= 0:
            return  # the common case, on every request: nothing to start, so no eviction scan
        victims = self.eviction_candidates(exclude=runtime) if self.slots.num_free < num_missing else []
        num_new = num_instances_to_start(
            policy, demand=runtime.demand(), num_live=num_live, num_startable=self.slots.num_free + len(victims),
            num_elsewhere=self.instances_elsewhere(runtime.deployment.name) if num_live else 0,
        )
        for _ in range(num_new):
            instance_id = f"{runtime.deployment.name}-{uuid.uuid4().hex[:8]}"
            slot = self.slots.acquire(instance_id, runtime.deployment.checkpoint_bytes)
            evicting = None
            if slot is None:
                if not victims:
                    return
                victim_runtime, victim = victims.pop(0)
                slot = victim.slot
                log.info("evicting idle instance", extra={"instance": victim.id, "for_model": runtime.deployment.name})
                evicting = self.lifecycle.stop(victim_runtime, victim, hand_slot_to=instance_id)
            instance = Instance(instance_id, runtime.deployment, slot)
            runtime.instances.append(instance)
            self.lifecycle.start(runtime, instance, evicting)
        self.lifecycle.update_gauges(runtime)

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

    def eviction_candidates(self, exclude: ModelRuntime | None) -> list[tuple[ModelRuntime, Instance]]:
        """Idle ready instances of other models above their min_instances, longest idle first."""
        found = []
        for runtime in self.runtimes.values():
            if runtime is exclude:
                continue
            spare = len(runtime.instances) - self.min_instances_here(runtime.deployment)
            idle = [i for i in runtime.ready() if i.in_flight == 0]
            idle.sort(key=lambda i: i.idle_since)
            found += [(runtime, i) for i in idle[: max(0, spare)]]
        found.sort(key=lambda pair: pair[1].idle_since)
        return found

    def _on_capacity_freed(self) -> None:
        for runtime in list(self.runtimes.values()):
            if runtime.num_waiting:
                self._scale(runtime)

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
