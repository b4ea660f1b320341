"""The discrete-event engine of `sllmd simulate`: a heap of events on a simulated clock (no asyncio, no
sleeping). It plays one trace against one placement policy on a simulated cluster and returns what
happened; the policy (`simpolicies`) only decides where instances start and where their bytes come from.

Mechanics, mirroring the daemon's worker:
- A request goes to a ready instance of its model if there is one (`pick_instance`, packing, over target
  when all are at target), else it waits. Either way the autoscaler (`num_instances_to_start`) is asked
  how many instances to add, and the policy places each one; a request never waits for a new instance
  while a ready one exists.
- An instance holds one GPU from the moment it is placed until it stops. Each server loads one
  checkpoint at a time, in order (loads share its SSD, NIC and PCIe): a load waits behind the server's
  queue, then fetches (peer / repository → SSD), loads (SSD or DRAM → GPU) and initialises, all at the
  true figures of `Hardware`. Every completed load and migration is fed to that server's `Calibration`.
- Loaded checkpoints stay in the server's DRAM cache (LRU) when the policy has one; fetched ones stay in
  its SSD cache when the policy keeps them.
- An instance idle for `keep_alive_s` stops; idle instances may be evicted at once by a placement, and
  whenever one goes idle the models whose requests wait for a GPU are offered it (oldest first).
- A migration (instance I of model A from N to D, to free N's GPU for model B): D takes a GPU (evicting
  an idle instance there if the policy says so) and loads A; the tokens of I's requests are re-prefilled
  on D (`migration_base_s` + prefill time) while I keeps decoding; at cut-over I's requests continue on
  D, I stops and B's load on N starts.
- Decode time per token is constant per model (batch 1: weights read from HBM plus a fixed per-token
  cost, see `Hardware`); prefill is compute bound.
- With `has_checkpoint_homes`, each checkpoint is put on `num_homes` servers' SSDs before the trace
  starts (`plan_checkpoint_homes`, as at deploy). With a DRAM cache, every WARM_INTERVAL_S each server
  copies the models `plan_dram_warming` picks (request rates over the last RATE_WINDOW_S) from its SSD
  into DRAM, available after an SSD read of their size; warming does not queue behind loads.
"""

from __future__ import annotations

import heapq
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

from sllmd.scheduler.autoscale import num_instances_to_start, pick_instance
from sllmd.scheduler.estimate import transfer_time_s
from sllmd.scheduler.placement import (
    ModelLoad,
    NodeState,
    RunningInstance,
    plan_checkpoint_homes,
    plan_dram_warming,
)
from sllmd.sim.cluster import Hardware, LruCache, ModelSpec
from sllmd.sim.state import Decision, InstanceState, LoadJob, SimInstance, SimRequest, SimServer
from sllmd.sim.trace import Request
from sllmd.types import AutoscalingPolicy, Tier

WARM_INTERVAL_S = 60.0
RATE_WINDOW_S = 600.0


@dataclass
class Outcome:
    requests: list[SimRequest]
    gpu_s: float
    cold_starts: Counter[str]
    num_migrations: int
    max_slots_used: dict[str, int]


class Policy:
    """What differs between the compared systems. Subclasses in `simpolicies`."""

    name: str
    has_dram_cache: bool = True  # loaded checkpoints stay in DRAM
    keeps_fetched: bool = True  # fetched checkpoints stay on the SSD
    has_checkpoint_homes: bool = True  # checkpoints are placed on SSDs at deploy

    def decide(self, model: ModelSpec, sim: Simulation) -> Decision | None:
        raise NotImplementedError

    def source_tier(self, server: SimServer, model: ModelSpec, sim: Simulation) -> Tier:
        raise NotImplementedError


class Simulation:
    def __init__(self, hardware: Hardware, models: list[ModelSpec], autoscaling: AutoscalingPolicy,
                 policy: Policy, *, num_homes: int = 2) -> None:
        self.hardware, self.autoscaling, self.policy = hardware, autoscaling, policy
        self.models = {m.name: m for m in models}
        self.servers = [
            SimServer(f"s{i}", hardware.gpus_per_server, LruCache(hardware.ssd_cache_bytes),
                      LruCache(hardware.dram_cache_bytes) if policy.has_dram_cache else None)
            for i in range(hardware.num_servers)
        ]
        self.now = 0.0
        self.waiting: dict[str, deque[SimRequest]] = {name: deque() for name in self.models}
        self._events: list[tuple[float, int, Callable[[object], None], object]] = []
        self._num_events = 0
        self._num_instances = 0
        self._gpu_s = 0.0
        self._cold_starts: Counter[str] = Counter()
        self._num_migrations = 0
        self._max_slots_used = {s.id: 0 for s in self.servers}
        self._arrivals: deque[tuple[float, str]] = deque()
        self._last_arrival_s = 0.0
        if policy.has_checkpoint_homes:
            by_id = {s.id: s for s in self.servers}
            for model in models:
                for home in plan_checkpoint_homes(model.name, model.num_bytes, self.node_states(), num_homes):
                    by_id[home].ssd.add(model.name, model.num_bytes, pin=True)

    def node_states(self) -> list[NodeState]:
        """The cluster as the leader's scheduler would see it now (all servers alive)."""
        return [
            NodeState(
                s.id, is_alive=True, num_free_slots=s.num_free_slots, calibration=s.calibration,
                dram_models=s.dram.models() if s.dram is not None else frozenset(), ssd_models=s.ssd.models(),
                free_dram_bytes=s.dram.free_bytes if s.dram is not None else 0, free_ssd_bytes=s.ssd.free_bytes,
                pending_load_s=s.pending_load_s(self.now),
                instances=tuple(self._running(i) for i in s.instances
                                if i.state is InstanceState.READY and i.migrating_to is None),
                loads=_loads(s),
            )
            for s in self.servers
        ]

    def _running(self, instance: SimInstance) -> RunningInstance:
        decode_s = instance.spec.decode_s_per_token(self.hardware)
        num_tokens = sum(r.num_tokens(self.now, decode_s) for r in instance.requests)
        return RunningInstance(instance.id, instance.spec.name, self.hardware.engine_kind, len(instance.requests),
                               num_tokens, instance.spec.num_bytes)

    # -- the clock -------------------------------------------------------------------------------

    def at(self, time_s: float, handler: Callable[[object], None], arg: object = None) -> None:
        self._num_events += 1  # the sequence number keeps simultaneous events in scheduling order
        heapq.heappush(self._events, (time_s, self._num_events, handler, arg))

    def run(self, trace: list[Request]) -> Outcome:
        requests = [SimRequest(r) for r in trace]
        for request in requests:
            self.at(request.request.time_s, self._arrive, request)
        self._last_arrival_s = trace[-1].time_s if trace else 0.0
        if self.policy.has_dram_cache:
            self.at(WARM_INTERVAL_S, self._warm)
        while self._events:
            self.now, _, handler, arg = heapq.heappop(self._events)
            handler(arg)
        return Outcome(requests, self._gpu_s, self._cold_starts, self._num_migrations, self._max_slots_used)

    # -- requests and scaling --------------------------------------------------------------------

    def ready_instances(self, model: str) -> list[SimInstance]:
        return [i for s in self.servers for i in s.instances
                if i.spec.name == model and i.state is InstanceState.READY]

    def _warm(self, _: object) -> None:
        while self._arrivals and self._arrivals[0][0] < self.now - RATE_WINDOW_S:
            self._arrivals.popleft()
        window_s = min(RATE_WINDOW_S, self.now)
        rates = {m: n / window_s for m, n in Counter(m for _, m in self._arrivals).items()}
        sizes = {name: spec.num_bytes for name, spec in self.models.items()}
        for server, state in zip(self.servers, self.node_states(), strict=True):
            for model in plan_dram_warming(rates, sizes, state):
                read_s = self.hardware.load_s(sizes[model], Tier.SSD)
                self.at(self.now + read_s, self._warmed, (server, model))
        if self.now < self._last_arrival_s:
            self.at(self.now + WARM_INTERVAL_S, self._warm)

    def _warmed(self, arg: object) -> None:
        server, model = arg  # type: ignore[misc]
        assert server.dram is not None
        server.dram.add(model, self.models[model].num_bytes)

    def _arrive(self, request: SimRequest) -> None:
        self._arrivals.append((self.now, request.request.model))
        if self.ready_instances(request.request.model):
            self._dispatch(request)
        else:
            self.waiting[request.request.model].append(request)
        self._scale(request.request.model)

    def _dispatch(self, request: SimRequest) -> None:
        ready = self.ready_instances(request.request.model)
        instance = ready[pick_instance([len(i.requests) for i in ready], self.autoscaling.target_concurrency)]
        instance.requests.add(request)
        instance.idle_since_s = None
        request.instance = instance
        spec = instance.spec
        request.first_token_s = self.now + spec.prefill_s(request.request.prompt_tokens, self.hardware)
        decode_s = spec.decode_s_per_token(self.hardware)
        self.at(request.first_token_s + request.request.output_tokens * decode_s, self._finish, request)

    def _finish(self, request: SimRequest) -> None:
        request.done_s = self.now
        instance = request.instance
        assert instance is not None
        instance.requests.discard(request)
        if not instance.requests and instance.state is InstanceState.READY:
            self._arm_keep_alive(instance)
            if instance.migrating_to is None:
                self._retry_waiting()  # it may be evicted for a model whose requests wait for a GPU

    def _scale(self, model: str) -> None:
        instances = [i for s in self.servers for i in s.instances if i.spec.name == model]
        live = [i for i in instances if i.migrating_to is None]  # a migrating pair counts once
        demand = len(self.waiting[model]) + sum(len(i.requests) for i in instances)
        num_startable = sum(s.num_free_slots for s in self.servers) + sum(
            1 for s in self.servers for i in s.instances if self.is_evictable(i) and i.spec.name != model
        )
        wanted = num_instances_to_start(self.autoscaling, demand=demand, num_live=len(live),
                                        num_startable=num_startable)
        for _ in range(wanted):
            decision = self.policy.decide(self.models[model], self)
            if decision is None:
                return
            self._apply(self.models[model], decision)

    def _retry_waiting(self) -> None:
        """A GPU was freed or an instance went idle: models with waiting requests, oldest request first,
        may start now."""
        for model in sorted((m for m, q in self.waiting.items() if q), key=lambda m: self.waiting[m][0].request.time_s):
            self._scale(model)

    # -- instances -------------------------------------------------------------------------------

    @staticmethod
    def is_evictable(instance: SimInstance) -> bool:
        return instance.state is InstanceState.READY and not instance.requests and instance.migrating_to is None

    def _new_instance(self, spec: ModelSpec, server: SimServer, state: InstanceState) -> SimInstance:
        self._num_instances += 1
        instance = SimInstance(f"i{self._num_instances:05d}", spec, server, state, self.now)
        server.instances.append(instance)
        self._note_slots_used(server)
        return instance

    def _note_slots_used(self, server: SimServer) -> None:
        used = server.num_gpus - server.num_free_slots
        self._max_slots_used[server.id] = max(self._max_slots_used[server.id], used)

    def _apply(self, spec: ModelSpec, decision: Decision) -> None:
        for victim in decision.evictions:
            assert self.is_evictable(victim) and victim.server is decision.server
            self._stop(victim, retry=False)
        if decision.migrate is None:
            self._enqueue_load(self._new_instance(spec, decision.server, InstanceState.LOADING))
            return
        source, dest_server = decision.migrate, decision.migrate_to
        for victim in decision.migrate_to_evictions:
            assert self.is_evictable(victim) and victim.server is dest_server
            self._stop(victim, retry=False)
        assert dest_server is not None and dest_server is not decision.server and dest_server.num_free_slots > 0
        copy = self._new_instance(source.spec, dest_server, InstanceState.MIGRATING_IN)
        source.migrating_to, copy.migrating_from = copy, source
        self._new_instance(spec, decision.server, InstanceState.WAITING_FOR_SLOT).waiting_for = source
        self._num_migrations += 1
        self._enqueue_load(copy)

    def _arm_keep_alive(self, instance: SimInstance) -> None:
        instance.idle_since_s = self.now
        self.at(self.now + self.autoscaling.keep_alive_s, self._keep_alive_expired, (instance, self.now))

    def _keep_alive_expired(self, arg: object) -> None:
        instance, idle_since_s = arg  # type: ignore[misc]
        if self.is_evictable(instance) and instance.idle_since_s == idle_since_s:
            self._stop(instance, retry=True)

    def _stop(self, instance: SimInstance, *, retry: bool) -> None:
        self._gpu_s += self.now - instance.slot_since_s
        instance.state = InstanceState.STOPPED
        instance.server.instances.remove(instance)
        if retry:
            self._retry_waiting()

    def _became_ready(self, instance: SimInstance) -> None:
        instance.state = InstanceState.READY
        waiting = self.waiting[instance.spec.name]
        while waiting:
            self._dispatch(waiting.popleft())
        if not instance.requests:
            self._arm_keep_alive(instance)

    # -- loads -----------------------------------------------------------------------------------

    def _enqueue_load(self, instance: SimInstance) -> None:
        """DRAM→GPU copies start at once (each GPU has its own PCIe link); loads that read the SSD or
        the network wait for the server's previous ones (one SSD, one NIC)."""
        server = instance.server
        tier = self.policy.source_tier(server, instance.spec, self)
        if tier is Tier.DRAM:
            self._load(instance, tier)
            return
        server.queue.append(LoadJob(instance, transfer_time_s(instance.spec.num_bytes, tier, server.calibration)))
        if server.loading is None:
            self._start_next_load(server)

    def _start_next_load(self, server: SimServer) -> None:
        server.loading = server.queue.popleft() if server.queue else None
        if server.loading is None:
            return
        server.loading_since_s = self.now
        instance = server.loading.instance
        io_s = self._load(instance, self.policy.source_tier(server, instance.spec, self))  # where the bytes are now
        self.at(self.now + io_s, lambda _: self._start_next_load(server))

    def _load(self, instance: SimInstance, tier: Tier) -> float:
        """Start loading `instance` from `tier` at the true figures; the seconds its SSD/NIC use take."""
        spec = instance.spec
        self._cold_starts[str(tier)] += 1
        fetch_s = self.hardware.fetch_s(spec.num_bytes, tier) if tier in (Tier.PEER, Tier.REPOSITORY) else 0.0
        source = Tier.DRAM if tier is Tier.DRAM else Tier.SSD
        load_s = self.hardware.load_s(spec.num_bytes, source)
        init_s = self.hardware.init_s(spec.num_bytes)
        done_s = self.now + fetch_s + load_s + init_s
        self.at(done_s, self._load_done, (instance, tier, fetch_s, source, load_s, init_s))
        return fetch_s + load_s

    def _load_done(self, arg: object) -> None:
        instance, tier, fetch_s, source, load_s, init_s = arg  # type: ignore[misc]
        server, spec = instance.server, instance.spec
        if fetch_s > 0:
            server.calibration = server.calibration.observe_fetch(tier, spec.num_bytes, fetch_s)
            if self.policy.keeps_fetched:
                server.ssd.add(spec.name, spec.num_bytes)
        server.calibration = server.calibration.observe_load(self.hardware.engine_kind, source, spec.num_bytes, load_s,
                                                             init_s)
        server.ssd.touch(spec.name)
        if server.dram is not None:
            server.dram.add(spec.name, spec.num_bytes)
        if instance.state is InstanceState.MIGRATING_IN:
            source_instance = instance.migrating_from
            assert source_instance is not None
            decode_s = spec.decode_s_per_token(self.hardware)
            num_tokens = sum(r.num_tokens(self.now, decode_s) for r in source_instance.requests)
            seconds = self.hardware.migration_base_s + spec.prefill_s(num_tokens, self.hardware)
            self.at(self.now + seconds, self._cut_over, (instance, num_tokens, seconds))
        else:
            self._became_ready(instance)

    def _cut_over(self, arg: object) -> None:
        copy, num_tokens, seconds = arg  # type: ignore[misc]
        source = copy.migrating_from
        copy.server.calibration = copy.server.calibration.observe_migration(num_tokens, seconds)
        for request in source.requests:
            request.instance = copy
        copy.requests, source.requests = source.requests, set()
        copy.migrating_from = source.migrating_to = None
        self._stop(source, retry=False)
        heir = next(i for i in source.server.instances if i.waiting_for is source)
        heir.waiting_for, heir.state, heir.slot_since_s = None, InstanceState.LOADING, self.now
        self._note_slots_used(heir.server)
        self._enqueue_load(heir)
        self._became_ready(copy)


def _loads(server: SimServer) -> dict[str, ModelLoad]:
    """Per model, the server's live instances (a migrating pair counts once, as its copy) and their requests."""
    ready: Counter[str] = Counter()
    starting: Counter[str] = Counter()
    requests: Counter[str] = Counter()
    for instance in server.instances:
        name = instance.spec.name
        requests[name] += len(instance.requests)
        if instance.migrating_to is None:
            (ready if instance.state is InstanceState.READY else starting)[name] += 1
    return {name: ModelLoad(ready[name], starting[name], requests[name]) for name in requests}
