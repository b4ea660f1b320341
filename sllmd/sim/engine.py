# long: one job, the discrete-event loop; its handlers read and write the same simulated cluster, clock and event
# heap, so split by event kind the invariants (no GPU holds past its memory budget, one load at a time per server)
# would span files.
"""The discrete-event engine of `sllmd simulate`: a heap of events on a simulated clock (no asyncio, no
sleeping). It plays one trace against one placement policy on a simulated cluster and returns what
happened; the policy (`simpolicies`) only decides where a new instance the router asks for starts and
where the bytes of a cold start come from, and the `Capacity` how GPUs hold instances.

Mechanics, mirroring the daemon's request pipeline and worker:
- Request i enters at server i mod N (round robin). There the daemon's router, `routing.route`, decides over
  `node_states()` where it goes: `ServeHere` / `RelayTo` a server, or `AskLeader`, which the policy answers
  (`Policy.place`: it starts a new instance and names its server), falling back to `AskLeader.fallback`
  when no server can take one now.
- On the server it goes to, a request takes a ready instance of its model there (`pick_instance`: packing,
  over target when all are at target), else it waits there for one. Either way that server's autoscaler
  (`num_instances_to_start`, as the worker's) may start more instances of the model there, each where
  `make_room` says (as the worker's `_make_room` and `Devices.acquire`): for a model on one GPU, the GPU with
  the least free memory that has the instance's need free; for one spanning k GPUs, the first k-GPU set of
  `topology.device_groups` (closest in `Hardware.topology`; flat by default) whose GPUs all have it free;
  else the set where evicting idle instances of other models there makes room, chosen by `plan_evictions`
  over those sets under the capacity's rule. So does any memory freed or instance gone idle on it while
  requests wait there. A request left waiting where its model has no instance (no server could take
  one) is routed again whenever memory frees or an instance goes idle: a client's retry, without the
  daemon's wait bound (the simulator rejects nothing).
- An instance holds its memory (`Capacity.memory_bytes`: a whole GPU per device, else its share of the
  weights and KV budget and an engine overhead) on each of its model's `num_gpus` GPUs, all of one server,
  from the moment it is placed until it stops; a GPU never holds more than its budget (asserted whenever a
  hold grows). Each server tracks every model's request rate there
  (`RequestRate`, over the requests admitted there), which the cost rule and the leader's view read.
- Each server loads one checkpoint at a time, in order (loads share its SSD, NIC and PCIe): a load waits
  behind the server's queue, then fetches (peer / repository → SSD), loads (SSD or DRAM → GPUs) and
  initialises, all at the true figures of `Hardware` (a DRAM load onto k GPUs runs k PCIe copies at once; the
  SSD and the network are one stream). Every completed load and migration is fed to that server's
  `Calibration`.
- Loaded checkpoints stay in the server's DRAM cache (LRU) when the policy has one; fetched ones stay in
  its SSD cache when the policy keeps them.
- An instance idle for `keep_alive_s` stops; idle instances may be evicted at once to make room, and
  whenever one goes idle the models whose requests wait for memory are offered it (oldest first).
- A migration (instance I of model A from N to D, to free memory on I's GPUs of N for model B): D makes room
  for A on as many GPUs as A spans (`make_room`) and loads A, while B's instance holds, on each GPU it shares
  with I, the part of its need that I will not free (on its other GPUs, all of it); the
  tokens of I's requests are re-prefilled on D (`migration_base_s` + prefill time) while I keeps decoding;
  at cut-over I's requests continue on D, I stops and B's load on N starts.
- Decode time per token is constant per model (batch 1: weights read from HBM plus a fixed per-token
  cost, see `Hardware`); prefill is compute bound; a model on k GPUs splits both k ways.
- With `has_checkpoint_homes`, each checkpoint is put on `num_homes` servers' SSDs before the trace
  starts (`plan_checkpoint_homes`, as at deploy). With a DRAM cache, every WARM_INTERVAL_S each server
  copies the models `plan_dram_warming` picks (request rates over the last RATE_WINDOW_S) from its SSD
  into DRAM, available after an SSD read of their size; warming does not queue behind loads.
"""

from __future__ import annotations

import bisect
import heapq
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

from sllmd.scheduler.autoscale import num_instances_to_start, pick_instance
from sllmd.scheduler.estimate import load_time_s, transfer_time_s
from sllmd.scheduler.eviction import EvictionCandidate, RequestRate, plan_evictions
from sllmd.scheduler.placement import (
    ModelLoad,
    NodeState,
    RunningInstance,
    plan_checkpoint_homes,
    plan_dram_warming,
)
from sllmd.scheduler.routing import AskLeader, ServeHere, route
from sllmd.scheduler.topology import device_groups
from sllmd.sim.cluster import Capacity, Hardware, LruCache, ModelSpec
from sllmd.sim.state import Decision, InstanceState, LoadJob, SimInstance, SimRequest, SimServer
from sllmd.sim.trace import Request
from sllmd.types import AutoscalingPolicy, Tier

WARM_INTERVAL_S = 60.0
RATE_WINDOW_S = 600.0


@dataclass
class Outcome:
    requests: list[SimRequest]
    # Memory held × seconds, in whole GPUs (an instance holding half a GPU for 2 s counts 1, one holding half of
    # each of two GPUs for 2 s counts 2); a migration's heir counts from its cut-over.
    gpu_s: float
    loads: Counter[str]  # instance loads (scale-outs and migrations' copies too) by the tier they read from
    num_cold_starts: int  # loads that requests waited for (they found no ready instance of their model)
    num_migrations: int
    num_evictions: int  # idle instances stopped to make room (keep-alive expiries are not counted)
    max_memory_share: dict[str, float]  # per server, the largest share of its GPUs' memory held at once


class Policy:
    """What differs between the compared systems. Subclasses in `simpolicies`."""

    name: str
    has_dram_cache: bool = True  # loaded checkpoints stay in DRAM
    keeps_fetched: bool = True  # fetched checkpoints stay on the SSD
    has_checkpoint_homes: bool = True  # checkpoints are placed on SSDs at deploy

    def place(self, model: ModelSpec, sim: Simulation, *, asked_by: str) -> str | None:
        """The leader's answer to a request for `model` that entered at server `asked_by` and wants a new
        instance: the id of the server the request goes to, having started there (`sim.start`) the instance
        placed for it, if any; None when no server can take one now. By default, where `decide` starts one."""
        decision = self.decide(model, sim)
        if decision is None:
            return None
        sim.start(model, decision)
        return decision.server.id

    def decide(self, model: ModelSpec, sim: Simulation) -> Decision | None:
        """Where a new instance of `model` starts; None: nowhere now."""
        raise NotImplementedError

    def source_tier(self, server: SimServer, model: ModelSpec, sim: Simulation) -> Tier:
        raise NotImplementedError


class Simulation:
    def __init__(self, hardware: Hardware, models: list[ModelSpec], autoscaling: AutoscalingPolicy,
                 policy: Policy, *, capacity: Capacity = Capacity.PACK_COST, num_homes: int = 2) -> None:
        self.hardware, self.autoscaling, self.policy, self.capacity = hardware, autoscaling, policy, capacity
        self.models = {m.name: m for m in models}
        self.memory_bytes = {m.name: capacity.memory_bytes(m, hardware) for m in models}
        too_big = sorted(m.name for m in models
                         if self.memory_bytes[m.name] > hardware.gpu_bytes or m.num_gpus > hardware.gpus_per_server)
        if too_big:
            raise ValueError(f"an instance of {too_big[0]} needs more GPUs or more memory on each than a server has")
        self.servers = [
            SimServer(f"s{i}", (hardware.gpu_bytes,) * hardware.gpus_per_server, LruCache(hardware.ssd_cache_bytes),
                      LruCache(hardware.dram_cache_bytes) if policy.has_dram_cache else None)
            for i in range(hardware.num_servers)
        ]
        self._by_id = {s.id: s for s in self.servers}
        self.now = 0.0
        self._num_arrived = 0
        self._events: list[tuple[float, int, Callable[[object], None], object]] = []
        self._num_events = 0
        self._num_instances = 0
        self._gpu_s = 0.0
        self._loads: Counter[str] = Counter()
        self._num_cold_starts = 0
        self._num_migrations = 0
        self._num_evictions = 0
        self._max_memory_share = {s.id: 0.0 for s in self.servers}
        self._rates: dict[tuple[str, str], RequestRate] = {}  # by (server id, model)
        self._arrivals: deque[tuple[float, str]] = deque()
        self._last_arrival_s = 0.0
        if policy.has_checkpoint_homes:
            for model in models:
                for home in plan_checkpoint_homes(model.name, model.num_bytes, self.node_states(), num_homes):
                    self._by_id[home].ssd.add(model.name, model.num_bytes, pin=True)

    def node_states(self, model: str | None = None) -> list[NodeState]:
        """The cluster as the leader's scheduler would see it now (all servers alive); with `model`, what routing
        reads of it, the cheaper to build: only that model's loads, and no instance's tokens (0: routing never
        migrates)."""
        return [
            NodeState(
                s.id, is_alive=True, free_memory=s.free_memory(), topology=self.hardware.topology,
                calibration=s.calibration,
                dram_models=s.dram.models() if s.dram is not None else frozenset(), ssd_models=s.ssd.models(),
                free_dram_bytes=s.dram.free_bytes if s.dram is not None else 0, free_ssd_bytes=s.ssd.free_bytes,
                pending_load_s=s.pending_load_s(self.now),
                instances=tuple(self._running(i, with_tokens=model is None) for i in s.instances
                                if i.state is InstanceState.READY and i.migrating_to is None),
                loads=_loads(s, model),
            )
            for s in self.servers
        ]

    def _running(self, instance: SimInstance, *, with_tokens: bool) -> RunningInstance:
        decode_s = instance.spec.decode_s_per_token(self.hardware)
        num_tokens = sum(r.num_tokens(self.now, decode_s) for r in instance.requests) if with_tokens else 0
        return RunningInstance(instance.id, instance.spec.name, self.hardware.engine_kind, len(instance.requests),
                               num_tokens, instance.spec.num_bytes, devices=instance.devices,
                               memory_bytes=instance.memory_bytes,
                               request_rate=self._rate(instance.server, instance.spec.name).per_s(self.now))

    def _rate(self, server: SimServer, model: str) -> RequestRate:
        return self._rates.setdefault((server.id, model), RequestRate())

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
        return Outcome(requests, self._gpu_s, self._loads, self._num_cold_starts, self._num_migrations,
                       self._num_evictions, self._max_memory_share)

    # -- requests and scaling --------------------------------------------------------------------

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
        """The request enters at the next server (round robin) and is routed from there."""
        model = request.request.model
        self._arrivals.append((self.now, model))
        entry = self.servers[self._num_arrived % len(self.servers)]
        self._num_arrived += 1
        self._route(request, entry)

    def _route(self, request: SimRequest, entry: SimServer) -> SimServer:
        """Send `request`, entered at `entry`, where `routing.route` (and the policy, for `AskLeader`) says;
        the server it went to."""
        model = request.request.model
        decision = route(model, self.autoscaling, self.node_states(model), local_id=entry.id,
                         memory_bytes=self.memory_bytes[model], num_devices=self.models[model].num_gpus)
        if isinstance(decision, AskLeader):
            decision = decision.then(self.policy.place(self.models[model], self, asked_by=entry.id),
                                     local_id=entry.id)
        server = entry if isinstance(decision, ServeHere) else self._by_id[decision.node_id]
        self._admit(request, server)
        return server

    def _admit(self, request: SimRequest, server: SimServer) -> None:
        """`request` on `server`, as its worker takes it: a ready instance there, else it waits there (in
        arrival order, so one routed again keeps its place); then the server's autoscaler runs."""
        model = request.request.model
        self._rate(server, model).observe(self.now)
        if _ready(server, model):
            self._dispatch(request, server)
        else:
            bisect.insort(server.waiting.setdefault(model, deque()), request, key=lambda r: r.request.time_s)
        self._scale(server, model)

    def _dispatch(self, request: SimRequest, server: SimServer) -> None:
        ready = _ready(server, request.request.model)
        instance = ready[pick_instance([len(i.requests) for i in ready], self.autoscaling.target_concurrency)]
        instance.requests.add(request)
        instance.idle_since_s = None
        request.instance, request.dispatched_s = instance, self.now
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
                self._retry_waiting(instance.server)  # it may be evicted for a model whose requests wait there

    def _scale(self, server: SimServer, model: str) -> None:
        """`server`'s autoscaler for `model`, as the worker's `_scale`: the instances its demand there calls
        for, each where `make_room` says, until one finds no room. `max_instances` bounds them with the model's
        instances elsewhere, except the server's first one (the leader placed it, or the request was sent here
        with no new instance possible)."""
        here = [i for i in server.instances if i.spec.name == model]
        live = [i for i in here if i.migrating_to is None]  # a migrating pair counts once, at its destination
        demand = len(server.waiting.get(model, ())) + sum(len(i.requests) for i in here)
        elsewhere = sum(i.spec.name == model and i.migrating_to is None
                        for s in self.servers if s is not server for i in s.instances)
        wanted = num_instances_to_start(self.autoscaling, demand=demand, num_live=len(live),
                                        num_startable=self.autoscaling.max_instances,  # found out as it goes
                                        num_elsewhere=elsewhere if live else 0)
        spec = self.models[model]
        for _ in range(wanted):
            decision = self.make_room(server, spec)
            if decision is None:
                return
            self.start(spec, decision)

    def gpu_groups(self, server: SimServer, spec: ModelSpec) -> list[tuple[int, ...]]:
        """The sets of `spec.num_gpus` GPUs of `server` an instance of `spec` may take, closest first."""
        return device_groups(len(server.gpu_bytes), spec.num_gpus, self.hardware.topology)

    def fitting(self, server: SimServer, spec: ModelSpec) -> list[tuple[int, ...]]:
        """`gpu_groups` whose GPUs all have an instance of `spec`'s need free now, in the same order."""
        need, free = self.memory_bytes[spec.name], server.free_memory()
        return [group for group in self.gpu_groups(server, spec) if all(free[d] >= need for d in group)]

    def make_room(self, server: SimServer, spec: ModelSpec) -> Decision | None:
        """Where `server`'s worker puts a new instance of `spec`, as the daemon's `_make_room`: of the GPU sets
        with the instance's need free on each (`fitting`), for one GPU the one with the least free memory (best
        fit: large holes stay for large models; the lowest index on ties), for several the first; else the set
        where stopping idle instances of other models makes room, by `plan_evictions` over `gpu_groups`
        under the capacity's rule. None: no set there can."""
        fitting = self.fitting(server, spec)
        if fitting and spec.num_gpus > 1:
            return Decision(server, fitting[0])
        if fitting:
            free = server.free_memory()
            return Decision(server, min(fitting, key=lambda group: (free[group[0]], group)))
        idle = {i.id: i for i in server.instances if self.is_evictable(i) and i.spec.name != spec.name}
        plan = plan_evictions([self._candidate(i) for i in idle.values()], dict(enumerate(server.free_memory())),
                              self.memory_bytes[spec.name], self.capacity.rule,
                              groups=self.gpu_groups(server, spec))
        return None if plan is None else Decision(server, plan.devices, tuple(idle[i] for i in plan.evictions))

    def _candidate(self, instance: SimInstance) -> EvictionCandidate:
        """An idle instance as the eviction rule sees it, at the server's own estimates (as the worker's are):
        the seconds to start it again from where its checkpoint is now, its model's request rate there."""
        server, spec = instance.server, instance.spec
        tier = self.policy.source_tier(server, spec, self)
        reload_s = load_time_s(self.hardware.engine_kind, spec.num_bytes, tier, server.calibration,
                               num_devices=spec.num_gpus)
        assert instance.idle_since_s is not None
        idle_s = self.now - instance.idle_since_s
        return EvictionCandidate(instance.id, instance.devices, instance.memory_bytes, reload_s,
                                 self._rate(server, spec.name).per_s(self.now), idle_s,
                                 max(0.0, self._keep_alive_s(spec) - idle_s))

    def _retry_waiting(self, server: SimServer) -> None:
        """Memory was freed or an instance went idle on `server`: the models whose requests wait there, oldest
        request first, may start there now. Then every request stranded on a server (waiting where no instance
        of its model is live: no server could take one when it was routed) is routed again from there, oldest
        first; once one is stranded again, no server can take a new instance of any model, so only those whose
        model has instances are. The daemon's worker does the former; the latter stands for the retry of a
        client whose request timed out there, without the timeout (the simulator has none)."""
        waiting = server.waiting
        for model in sorted((m for m, q in waiting.items() if q), key=lambda m: waiting[m][0].request.time_s):
            self._scale(server, model)
        stranded = sorted(((r, s) for s in self.servers for m, q in s.waiting.items()
                           if q and not _has_instance(s, m) for r in q), key=lambda pair: pair[0].request.time_s)
        can_start = True
        for request, at in stranded:
            model = request.request.model
            if not can_start and not any(_has_instance(s, model) for s in self.servers):
                continue
            at.waiting[model].remove(request)
            went_to = self._route(request, at)
            can_start = can_start and (request.instance is not None or _has_instance(went_to, model))

    # -- instances -------------------------------------------------------------------------------

    @staticmethod
    def is_evictable(instance: SimInstance) -> bool:
        return instance.state is InstanceState.READY and not instance.requests and instance.migrating_to is None

    def _new_instance(self, spec: ModelSpec, server: SimServer, devices: tuple[int, ...], state: InstanceState, *,
                      waiting_for: SimInstance | None = None) -> SimInstance:
        assert len(set(devices)) == len(devices) == spec.num_gpus, f"{spec.name} on GPUs {devices}"
        self._num_instances += 1
        instance = SimInstance(f"i{self._num_instances:05d}", spec, server, devices, self.memory_bytes[spec.name],
                               state, self.now, waiting_for=waiting_for)
        server.instances.append(instance)
        self._check_memory(server)
        return instance

    def _check_memory(self, server: SimServer) -> None:
        """The invariant: no GPU of `server` holds more than its budget. Runs whenever a hold grows."""
        free = server.free_memory()
        assert min(free) >= 0, f"{server.id} holds past a GPU's budget: free {free}"
        share = 1 - sum(free) / sum(server.gpu_bytes)
        self._max_memory_share[server.id] = max(self._max_memory_share[server.id], share)

    def start(self, spec: ModelSpec, decision: Decision) -> None:
        """Start an instance of `spec` as `decision` says."""
        self._evict(decision)
        if decision.migrate is None:
            self._enqueue_load(self._new_instance(spec, decision.server, decision.devices, InstanceState.LOADING))
            return
        source, dest = decision.migrate, decision.migrate_to
        assert dest is not None and dest.server is not decision.server and set(source.devices) & set(decision.devices)
        self._evict(dest)
        copy = self._new_instance(source.spec, dest.server, dest.devices, InstanceState.MIGRATING_IN)
        source.migrating_to, copy.migrating_from = copy, source
        self._new_instance(spec, decision.server, decision.devices, InstanceState.WAITING_FOR_MEMORY,
                           waiting_for=source)
        self._num_migrations += 1
        self._enqueue_load(copy)

    def _evict(self, decision: Decision) -> None:
        for victim in decision.evictions:
            assert self.is_evictable(victim) and victim.server is decision.server
            assert set(victim.devices) & set(decision.devices)
            self._stop(victim, retry=False)
            self._num_evictions += 1

    def _keep_alive_s(self, spec: ModelSpec) -> float:
        return self.autoscaling.keep_alive_s if spec.keep_alive_s is None else spec.keep_alive_s

    def _arm_keep_alive(self, instance: SimInstance) -> None:
        instance.idle_since_s = self.now
        self.at(self.now + self._keep_alive_s(instance.spec), self._keep_alive_expired, (instance, self.now))

    def _keep_alive_expired(self, arg: object) -> None:
        instance, idle_since_s = arg  # type: ignore[misc]
        if self.is_evictable(instance) and instance.idle_since_s == idle_since_s:
            self._stop(instance, retry=True)

    def _stop(self, instance: SimInstance, *, retry: bool) -> None:
        self._gpu_s += ((self.now - instance.held_since_s) * instance.memory_bytes * len(instance.devices)
                        / self.hardware.gpu_bytes)
        instance.state = InstanceState.STOPPED
        instance.server.instances.remove(instance)
        if retry:
            self._retry_waiting(instance.server)

    def _became_ready(self, instance: SimInstance) -> None:
        instance.state = InstanceState.READY
        waiting = instance.server.waiting.get(instance.spec.name, deque())
        self._num_cold_starts += bool(waiting)
        while waiting:
            self._dispatch(waiting.popleft(), instance.server)
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
        server.queue.append(LoadJob(instance, transfer_time_s(instance.spec.num_bytes, tier, server.calibration,
                                                              num_devices=instance.spec.num_gpus)))
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
        self._loads[str(tier)] += 1
        fetch_s = self.hardware.fetch_s(spec.num_bytes, tier) if tier in (Tier.PEER, Tier.REPOSITORY) else 0.0
        source = Tier.DRAM if tier is Tier.DRAM else Tier.SSD
        load_s = self.hardware.load_s(spec.num_bytes, source, spec.num_gpus)
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
        # The calibration's DRAM bandwidth is one link's (`transfer_time_s` multiplies it by the GPUs loaded), so
        # a DRAM load onto k GPUs is taught as k links' worth of time.
        streams = spec.num_gpus if source is Tier.DRAM else 1
        server.calibration = server.calibration.observe_load(self.hardware.engine_kind, source, spec.num_bytes,
                                                             load_s * streams, init_s)
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
        heir.waiting_for, heir.state, heir.held_since_s = None, InstanceState.LOADING, self.now
        self._check_memory(heir.server)
        self._enqueue_load(heir)
        self._became_ready(copy)


def _has_instance(server: SimServer, model: str) -> bool:
    return any(i.spec.name == model for i in server.instances)


def _ready(server: SimServer, model: str) -> list[SimInstance]:
    """`server`'s ready instances of `model` that take requests (a migration's source does not)."""
    return [i for i in server.instances
            if i.spec.name == model and i.state is InstanceState.READY and i.migrating_to is None]


def _loads(server: SimServer, model: str | None) -> dict[str, ModelLoad]:
    """Per model (`model` only, unless None), the server's live instances (a migrating pair counts once, as its
    copy) and its requests: on its instances, or waiting there for one."""
    ready: Counter[str] = Counter()
    starting: Counter[str] = Counter()
    requests: Counter[str] = Counter({name: len(queue) for name, queue in server.waiting.items()
                                      if queue and model in (None, name)})
    for instance in server.instances:
        name = instance.spec.name
        if model not in (None, name):
            continue
        requests[name] += len(instance.requests)
        if instance.migrating_to is None:
            (ready if instance.state is InstanceState.READY else starting)[name] += 1
    return {name: ModelLoad(ready[name], starting[name], requests[name]) for name in requests}
