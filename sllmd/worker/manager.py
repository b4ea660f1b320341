"""The serverless lifecycle of this node's instances: scale from zero, scale out, keep-alive, eviction.

Event-driven throughout: a request that finds no ready instance triggers a start at once and waits
(bounded queue; bounded time, longer while a start is within its estimate); an instance that goes idle
arms a keep-alive timer; a freed slot re-runs scaling for every model with waiting requests. Nothing polls.

Not thread-safe: every method runs on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sllmd.checkpoint.fetch import FetchReport
from sllmd.checkpoint.store import CheckpointLease, CheckpointStore, checkpoint_id, reads_store
from sllmd.config import ServingConfig
from sllmd.engine import NO_RESOURCES, Engine, EngineResources, create_engine
from sllmd.engine.base import Backend, LoadReport
from sllmd.engine.vllm_pool import engine_key_of
from sllmd.errors import EngineFailed, ModelNotFound, Overloaded
from sllmd.metrics import Metrics
from sllmd.scheduler.autoscale import cold_start_wait_s, num_instances_to_start, num_instances_wanted, pick_instance
from sllmd.scheduler.estimate import Calibration, Tier
from sllmd.state.machine import LocalStateMachine, Op
from sllmd.state.models import Deployment, InstanceRecord, InstanceState
from sllmd.worker.estimates import NodeEstimates
from sllmd.worker.slots import Slot, SlotPool
from sllmd.worker.warming import DramWarmer

if TYPE_CHECKING:
    from sllmd.worker.migration.movable import MovableRequest

log = logging.getLogger(__name__)

# (deployment, local checkpoint directory, device, what the node lends its engines) -> a new engine.
EngineFactory = Callable[[Deployment, Path, str, EngineResources], Engine]


def default_engine_factory(deployment: Deployment, checkpoint_dir: Path, device: str,
                           resources: EngineResources = NO_RESOURCES) -> Engine:
    return create_engine(deployment.backend, checkpoint_dir, device, dtype=deployment.dtype,
                         max_model_len=deployment.context_length, start_mode=deployment.start_mode,
                         resources=resources)


@dataclass(eq=False)
class Instance:
    id: str
    deployment: Deployment
    slot: Slot
    engine: Engine | None = None  # created off the event loop when the start begins
    state: InstanceState = InstanceState.STARTING
    in_flight: int = 0
    started_at: float = field(default_factory=time.time)
    idle_since: float = field(default_factory=time.monotonic)
    load_report: LoadReport | None = None
    estimated_start_s: float = 0.0  # what the estimators predicted for this start, when it began
    estimated_transfer_s: float = 0.0  # ... of which moving bytes over the SSD or the network
    idle_timer: asyncio.TimerHandle | None = None
    starting: asyncio.Task | None = None
    stopped: asyncio.Task | None = None  # set once stopping begins; done when the slot can be reused
    requests: set[MovableRequest] = field(default_factory=set)  # generating on this instance's engine now
    is_draining: bool = False  # a migration is cutting its requests over: take no new ones

    @property
    def num_tokens(self) -> int:
        """Prompt + generated tokens of every request generating here: what a migration would move
        (its cost is about a·num_tokens + b)."""
        return sum(request.num_tokens for request in self.requests)


@dataclass(eq=False)
class ModelRuntime:
    """This node's instances of one deployment and the requests waiting for one."""

    deployment: Deployment
    instances: list[Instance] = field(default_factory=list)  # starting or ready; never stopping
    num_waiting: int = 0
    start_error: BaseException | None = None
    is_removed: bool = False
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    # An engine prestarting for it (`Worker.prestart`): (estimated seconds, time.time() it began). Its first
    # instance waits for it and takes the engine it parks.
    prestarting: tuple[float, float] | None = None

    def ready(self) -> list[Instance]:
        return [i for i in self.instances if i.state is InstanceState.READY and not i.is_draining]

    def num_starting(self) -> int:
        return sum(1 for i in self.instances if i.state is InstanceState.STARTING)

    def num_in_flight(self) -> int:
        return sum(i.in_flight for i in self.instances)

    def demand(self) -> int:
        return self.num_waiting + self.num_in_flight()


def _describe_starts(starts: list[tuple[float, float]]) -> str:
    """Why a request gave up waiting, for its 503: each start it waited for, its estimate and how long it ran."""
    if not starts:
        return "no instance of it is starting here"
    return "; ".join(f"its start, estimated at {estimated_s:.1f}s, has run {running_s:.1f}s"
                     for estimated_s, running_s in starts)


class Worker:
    def __init__(
        self,
        node_id: str,
        slots: SlotPool,
        state: LocalStateMachine,
        serving: ServingConfig,
        metrics: Metrics,
        store: CheckpointStore,
        engine_factory: EngineFactory = default_engine_factory,
        *,
        resources: EngineResources = NO_RESOURCES,
        calibration: Calibration | None = None,
    ) -> None:
        """`calibration`: the estimates' starting point before the probe and real loads correct it
        (default: `Calibration.defaults()`)."""
        self.node_id = node_id
        self.slots = slots
        self.state = state
        self.serving = serving
        self.metrics = metrics
        self.engine_factory = engine_factory
        self.store = store
        self.resources = resources
        self._engine_keys: dict[Deployment, str] = {}  # vLLM deployments' engine keys (`vllm_pool.engine_key`)
        self.dram_cache = dram_cache = resources.dram_cache
        self.estimates = NodeEstimates(store, dram_cache, metrics, calibration or Calibration.defaults())
        self._leases: dict[str, CheckpointLease] = {}  # instance id -> its pinned store entry
        self.runtimes: dict[str, ModelRuntime] = {}
        # Set by the cluster node: live instances of a model on other nodes, and this node's share of a
        # deployment's min_instances (alone: none, and all of them).
        self.instances_elsewhere: Callable[[str], int] = lambda model: 0
        self.min_instances_here: Callable[[Deployment], int] = lambda deployment: deployment.autoscaling.min_instances
        self.warmer = None if dram_cache is None else DramWarmer(
            # Models with an instance here are left out: a start caches its checkpoint on the way anyway.
            store, dram_cache, lambda: {name: r.deployment for name, r in self.runtimes.items() if not r.instances})
        self._tasks: set[asyncio.Task] = set()
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
        await self._notify(runtime)
        stopping = [self._stop_instance(runtime, instance) for instance in list(runtime.instances)]
        await asyncio.gather(*stopping, return_exceptions=True)

    def prestart(self, deployment: Deployment) -> None:
        """Start an engine for `deployment` in the background and park it, so that its first request (or a model
        of its shape) finds one ready: for vLLM deployments, with `serving.vllm_prestart` on and room among the
        parked engines. It holds a free slot while it starts (none free: no prestart) and its store copy pinned."""
        pool = self.resources.vllm_pool
        if (deployment.backend is Backend.VLLM and self.serving.vllm_prestart and pool is not None
                and pool.capacity > 0):
            self._spawn(self._prestart(deployment))

    def parked_models(self) -> list[str]:
        """This node's vLLM deployments with an engine of their shape parked here, which a start of one takes."""
        return [name for name, runtime in self.runtimes.items() if self._has_parked_engine(runtime.deployment)]

    def _has_parked_engine(self, deployment: Deployment) -> bool:
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
                device=self.slots.slots[0].device, start_mode=deployment.start_mode)
        return pool.has(key)

    async def _prestart(self, deployment: Deployment) -> None:
        runtime = self.runtimes.get(deployment.name)
        prestart_id = f"{deployment.name}-prestart-{uuid.uuid4().hex[:8]}"
        if runtime is None or runtime.instances:
            return  # gone, or an instance starts it anyway
        slot = self.slots.acquire(prestart_id, deployment.checkpoint_bytes)
        if slot is None:
            return
        estimated_s, _ = self.estimates.estimate(deployment, parked=self._has_parked_engine(deployment))
        runtime.prestarting = (estimated_s, time.time())
        await self._notify(runtime)  # waiters bound their wait by this start now
        try:
            lease = await self.store.acquire(deployment.checkpoint)
            try:
                engine = await asyncio.to_thread(self.engine_factory, deployment, lease.path, slot.device,
                                                 self.resources)
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
            self.slots.release(slot)
            self.metrics.free_slots.set(self.slots.num_free)
            self._on_capacity_freed()

    # -- requests ------------------------------------------------------------------------------

    @asynccontextmanager
    async def lease(self, model: str) -> AsyncIterator[Instance]:
        """A ready instance of `model` for one request, held until the block exits.

        Starts one if needed and waits for it (`serving.queue_timeout_s`, or while a start of the model is
        within its estimate up to `serving.max_start_wait_s`: `cold_start_wait_s`), with at most
        `serving.max_queue_per_model` requests waiting per model.
        """
        runtime = self.runtimes.get(model)
        if runtime is None:
            raise ModelNotFound(model)
        if runtime.start_error is not None and not runtime.num_starting():
            runtime.start_error = None  # a new request earns a new attempt; waiters of the failed one got the error
        self._admit(runtime)
        instance = self._pick(runtime)
        if instance is None:
            instance = await self._wait_for_instance(runtime)
        async with self.hold(runtime, instance):
            yield instance

    @asynccontextmanager
    async def hold(self, runtime: ModelRuntime, instance: Instance) -> AsyncIterator[Instance]:
        """Count one request on `instance` (no keep-alive stop meanwhile) until the block exits. A
        migration's destination holds the instance its prefilled caches live on this way."""
        instance.in_flight += 1
        if instance.idle_timer is not None:
            instance.idle_timer.cancel()
            instance.idle_timer = None
        self._scale(runtime)
        try:
            yield instance
        finally:
            instance.in_flight -= 1
            if instance.in_flight == 0 and instance.state is InstanceState.READY:
                instance.idle_since = time.monotonic()
                self._arm_idle_timer(runtime, instance)

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
            await self._notify(runtime)  # requests waiting for a ready instance may take it again

    async def stop_instance(self, runtime: ModelRuntime, instance: Instance) -> None:
        """Stop `instance` and wait until its slot is free again (a migrated-away instance)."""
        await self._stop_instance(runtime, instance)

    def _pick(self, runtime: ModelRuntime) -> Instance | None:
        ready = runtime.ready()
        if not ready:
            return None
        return ready[pick_instance([i.in_flight for i in ready], runtime.deployment.autoscaling.target_concurrency)]

    def _admit(self, runtime: ModelRuntime) -> None:
        """Bound a model's load: its ready instances at target concurrency, plus `max_queue_per_model`
        more (waiting through a cold start, or over target on a ready instance). Beyond that: 503."""
        policy = runtime.deployment.autoscaling
        capacity = len(runtime.ready()) * policy.target_concurrency + self.serving.max_queue_per_model
        if runtime.demand() >= capacity:
            raise Overloaded(f"model '{runtime.deployment.name}' is at capacity ({capacity} requests)",
                             retry_after_s=1, code="queue_full")

    async def _wait_for_instance(self, runtime: ModelRuntime) -> Instance:
        name = runtime.deployment.name
        loop = asyncio.get_running_loop()
        began = loop.time()
        runtime.num_waiting += 1
        self.metrics.queued.labels(name).set(runtime.num_waiting)
        try:
            self._scale(runtime)

            def outcome() -> Instance | BaseException | None:
                if runtime.is_removed:
                    return ModelNotFound(name)
                picked = self._pick(runtime)
                if picked is not None:
                    return picked
                if runtime.start_error is not None and not runtime.num_starting():
                    return EngineFailed(f"model '{name}' failed to start: {runtime.start_error}")
                return None

            async with runtime.changed:
                # The bound is asked again on every change and once it passes: a start that began meanwhile
                # moves it later, one that went away earlier.
                while (result := outcome()) is None:
                    waited_s, starts = loop.time() - began, self._starts(runtime)
                    bound_s = cold_start_wait_s(self.serving.queue_timeout_s, self.serving.max_start_wait_s,
                                                waited_s=waited_s, starts=starts)
                    if waited_s >= bound_s:
                        # The start itself carries on: a slow one that ends serves the next requests and
                        # corrects its engine kind's estimate; stopping it would not (the next start would be
                        # as slow and stopped again), nor could it end a start hung inside its engine (a stop
                        # waits for the start).
                        raise Overloaded(f"model '{name}' did not become ready within {bound_s:.1f}s: "
                                         + _describe_starts(starts),
                                         retry_after_s=max(1, round(self.serving.queue_timeout_s / 4)),
                                         code="cold_start_timeout")
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(bound_s - waited_s):
                            await runtime.changed.wait()
        finally:
            runtime.num_waiting -= 1
            self.metrics.queued.labels(name).set(runtime.num_waiting)
        if isinstance(result, BaseException):
            raise result
        return result

    def _starts(self, runtime: ModelRuntime) -> list[tuple[float, float]]:
        """(estimated seconds, seconds since it began) of each instance of the model starting here, and of an
        engine prestarting for it."""
        now = time.time()
        starts = [(i.estimated_start_s, now - i.started_at) for i in runtime.instances
                  if i.state is InstanceState.STARTING]
        if runtime.prestarting is not None:
            estimated_s, began = runtime.prestarting
            starts.append((estimated_s, now - began))
        return starts

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
                evicting = self._stop_instance(victim_runtime, victim, hand_slot_to=instance_id)
            instance = Instance(instance_id, runtime.deployment, slot)
            runtime.instances.append(instance)
            instance.starting = self._spawn(self._start_instance(runtime, instance, evicting))
        self._update_gauges(runtime)

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

    async def _start_instance(self, runtime: ModelRuntime, instance: Instance, evicting: asyncio.Task | None) -> None:
        name = runtime.deployment.name
        began = time.monotonic()
        instance.estimated_start_s, instance.estimated_transfer_s = self.estimates.estimate(
            runtime.deployment, parked=self._has_parked_engine(runtime.deployment))
        try:
            if evicting is not None:
                await evicting
            await self._record(instance)
            deployment = runtime.deployment
            checkpoint_dir, fetched_from = Path(deployment.checkpoint), None
            if reads_store(deployment.backend, deployment.checkpoint):
                # Pinned until the instance stops; fetched again if it was evicted since deploy.
                lease = self._leases[instance.id] = await self.store.acquire(deployment.checkpoint)
                checkpoint_dir = lease.path
                fetched_from = None if lease.tier == Tier.SSD else lease.tier
            instance.engine = await asyncio.to_thread(
                self.engine_factory, deployment, checkpoint_dir, instance.slot.device, self.resources)
            if instance.state is not InstanceState.STARTING:
                return  # stopped meanwhile; nothing started yet
            instance.load_report = await instance.engine.start()
            self.estimates.observe_load(runtime.deployment, instance.load_report)
            if fetched_from is not None:  # the bytes came from a peer or the repository on this start
                instance.load_report = dataclasses.replace(instance.load_report, source_tier=fetched_from)
        except Exception as exc:  # any engine failure must reach the waiters
            log.error("instance failed to start", extra={"instance": instance.id, "error": repr(exc)})
            runtime.start_error = exc
            self._stop_instance(runtime, instance)  # not awaited: the stop waits for this task to end
            return
        if instance.state is not InstanceState.STARTING:
            return  # stopped while starting (model removed); _stop_instance cleans up
        instance.state = InstanceState.READY
        report = instance.load_report
        self.metrics.cold_starts.labels(name, report.source_tier).inc()
        self.metrics.cold_start_seconds.labels(name, report.source_tier).observe(time.monotonic() - began)
        self.metrics.load_bytes.labels(name, report.source_tier).inc(report.num_bytes)
        for phase, seconds in report.phases.items():
            self.metrics.start_phase_seconds.labels(runtime.deployment.engine_kind, phase).observe(seconds)
        if report.load_s > 0 and report.num_bytes:
            self.metrics.load_gbps.labels(name, report.source_tier).observe(report.num_bytes / report.load_s / 1e9)
        start_s = time.monotonic() - began
        self.metrics.start_estimate_error.labels(report.source_tier).observe(abs(start_s - instance.estimated_start_s))
        log.info(
            "instance ready",
            extra={"instance": instance.id, "device": instance.slot.device, "tier": report.source_tier,
                   "bytes": report.num_bytes, "load_s": round(report.load_s, 4), "init_s": round(report.init_s, 4),
                   "start_s": round(start_s, 4), "estimated_s": round(instance.estimated_start_s, 4)},
        )
        await self._record(instance)
        if instance.in_flight == 0:
            self._arm_idle_timer(runtime, instance)
        self._update_gauges(runtime)
        await self._notify(runtime)

    def _arm_idle_timer(self, runtime: ModelRuntime, instance: Instance) -> None:
        if instance.idle_timer is not None:
            instance.idle_timer.cancel()
        loop = asyncio.get_running_loop()
        keep_alive_s = runtime.deployment.autoscaling.keep_alive_s
        instance.idle_timer = loop.call_later(keep_alive_s, self._on_idle_timeout, runtime, instance)

    def _on_idle_timeout(self, runtime: ModelRuntime, instance: Instance) -> None:
        instance.idle_timer = None
        is_spare = len(runtime.instances) > self.min_instances_here(runtime.deployment)
        if instance.in_flight == 0 and instance.state is InstanceState.READY and is_spare:
            log.info("instance idle past keep-alive, stopping", extra={"instance": instance.id})
            self._stop_instance(runtime, instance)

    def _stop_instance(
        self, runtime: ModelRuntime, instance: Instance, hand_slot_to: str | None = None
    ) -> asyncio.Task:
        """Begin stopping `instance` (idempotent); the returned task finishes when its slot is reusable.

        With `hand_slot_to`, the slot passes to that instance id at once instead of becoming free.
        """
        if instance.stopped is not None:
            return instance.stopped
        instance.state = InstanceState.STOPPING
        if instance.idle_timer is not None:
            instance.idle_timer.cancel()
            instance.idle_timer = None
        if instance in runtime.instances:
            runtime.instances.remove(instance)
        if hand_slot_to is not None:
            self.slots.transfer(instance.slot, hand_slot_to)

        async def stop() -> None:
            if instance.starting is not None:
                await asyncio.wait([instance.starting])  # stop what the start made, not half of it
            try:
                if instance.engine is not None:
                    await instance.engine.stop()
            except Exception as exc:  # a failed stop must still free the slot
                log.error("engine stop failed", extra={"instance": instance.id, "error": repr(exc)})
            if hand_slot_to is None:
                self.slots.release(instance.slot)
            if (lease := self._leases.pop(instance.id, None)) is not None:
                self.store.release(lease)
            await self.state.propose({"op": Op.DELETE_INSTANCE, "id": instance.id})
            if self.warmer is not None:
                self.warmer.consider()  # the model left the device: keep it (or a more popular one) one copy away
            self._update_gauges(runtime)
            await self._notify(runtime)
            if hand_slot_to is None:
                self._on_capacity_freed()

        instance.stopped = self._spawn(stop())
        self._update_gauges(runtime)
        return instance.stopped

    def _on_capacity_freed(self) -> None:
        for runtime in list(self.runtimes.values()):
            if runtime.num_waiting:
                self._scale(runtime)

    # -- estimates -----------------------------------------------------------------------------

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

    # -- plumbing ------------------------------------------------------------------------------

    async def record_all(self) -> None:
        """Write the records of every live instance again (after the cluster dropped this node's records,
        e.g. while it was cut off longer than the dead-node timeout)."""
        for runtime in list(self.runtimes.values()):
            for instance in list(runtime.instances):
                await self._record(instance)

    async def _record(self, instance: Instance) -> None:
        record = InstanceRecord(instance.id, instance.deployment.name, self.node_id, instance.slot.device,
                                instance.state, instance.started_at)
        await self.state.propose({"op": Op.PUT_INSTANCE, "instance": record.to_wire()})

    async def _notify(self, runtime: ModelRuntime) -> None:
        async with runtime.changed:
            runtime.changed.notify_all()

    def _update_gauges(self, runtime: ModelRuntime) -> None:
        name = runtime.deployment.name
        for state in (InstanceState.STARTING, InstanceState.READY):
            self.metrics.instances.labels(name, state.value).set(sum(1 for i in runtime.instances if i.state is state))
        self.metrics.free_slots.set(self.slots.num_free)

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self) -> None:
        """Stop every instance and wait for background work."""
        if self.warmer is not None:
            await self.warmer.close()
        for name in list(self.runtimes):
            await self.remove_deployment(name)
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        if self.resources.vllm_pool is not None:
            await self.resources.vllm_pool.close()
