"""Placement: where a new instance starts, and where checkpoints sit. Pure policy over a snapshot of the
cluster (`NodeState`s), no I/O; time arrives as `now`.

A new instance, `plan_new_instance` (the leader runs it for every node that asks, see `cluster.placer`): at
the model's `max_instances` (counting the leader's reservations) no new one, the request goes to the alive
node with the fewest of its instances; otherwise `plan_start` finds the node where the model will be serving
soonest by the estimators of `sllmd.scheduler.estimate`, possibly after evicting idle instances or migrating
one running instance away; the asking (entry) node wins when its own plan is within ENTRY_PREFERENCE of
that. Each start placed is reserved until it shows in its node's state.

Where a request goes among the instances that exist is `scheduler.routing`'s. Checkpoint homes
(`plan_checkpoint_homes`, at deploy) and DRAM warming (`plan_dram_warming`, per node) decide where
checkpoints sit before any request needs them.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from sllmd.scheduler.estimate import Calibration, load_time_s, migration_time_s, transfer_time_s
from sllmd.scheduler.eviction import EvictionCandidate, EvictionPlan, EvictionRule, plan_evictions
from sllmd.scheduler.topology import device_groups
from sllmd.types import EngineKind, Tier

# The asking (entry) node gets the start when its estimate is this close to the best: no relay hop, and the
# client's own node, for a difference within the estimators' noise.
ENTRY_PREFERENCE = (0.05, 0.005)  # (relative, absolute seconds)
RESERVATION_SLACK_S = 5.0  # a reservation outlives its start's estimate by this much at most


@dataclass(frozen=True, slots=True)
class RunningInstance:
    """A ready instance. `engine_kind`: its model's (how its reload at a migration's destination inits).
    `num_tokens`: prompt + generated tokens of its in-flight requests (what a migration moves). `num_bytes`:
    its model's checkpoint size; 0 means unknown, and such an instance is never migrated (its reload cost at
    the destination could not be estimated). `devices` and `memory_bytes`: the devices it runs on (indices into
    its node's `free_memory`; several for a model spanning GPUs) and the memory it holds on each. `is_kept`:
    kept for its model's min_instances, so never evicted. `request_rate`: its model's recent requests/s on the
    node (what evicting it costs)."""

    id: str
    model: str
    engine_kind: EngineKind
    num_requests: int
    num_tokens: int
    num_bytes: int = 0
    is_kept: bool = False
    devices: tuple[int, ...] = (0,)
    memory_bytes: int = 0
    request_rate: float = 0.0

    @property
    def is_evictable(self) -> bool:
        return self.num_requests == 0 and not self.is_kept


@dataclass(frozen=True, slots=True)
class ModelLoad:
    """One model on one node: its live instances (by the replicated instance records, or the node's own
    worker) and the requests for it there, waiting or in flight. `num_in_status`: the live instances the node's
    last status lists, which its free memory accounts for (None: the same as `num_live`, e.g. the node's own
    worker's exact figures)."""

    num_ready: int = 0
    num_starting: int = 0
    num_requests: int = 0
    num_in_status: int | None = None

    @property
    def num_live(self) -> int:
        """Starting or ready: what counts against max_instances."""
        return self.num_ready + self.num_starting

    @property
    def num_accounted(self) -> int:
        """Live instances whose memory the node's free memory already leaves out."""
        return self.num_live if self.num_in_status is None else self.num_in_status


@dataclass(frozen=True, slots=True)
class NodeState:
    """One node as placement sees it. `free_memory`: each device's memory not held by an instance (starting
    ones included). The other byte counts are free cache space; `pending_load_s` is the estimated
    seconds its SSD and network stay busy with loads already queued or in progress there: a new load that
    reads the SSD or fetches from a peer or the repository waits behind them, one from DRAM does not (each GPU
    has its own PCIe link). `instances` are its ready instances (starting ones hold memory but are not listed);
    `loads` holds, per model, its live instances and requests (a model absent has none)."""

    id: str
    is_alive: bool
    free_memory: tuple[int, ...] = ()
    topology: tuple[tuple[int, ...], ...] = ()  # distances between its devices (`scheduler.topology`); (): flat
    calibration: Calibration = field(default_factory=Calibration.defaults)
    dram_models: frozenset[str] = frozenset()
    ssd_models: frozenset[str] = frozenset()
    free_dram_bytes: int = 0
    free_ssd_bytes: int = 0
    pending_load_s: float = 0.0
    instances: tuple[RunningInstance, ...] = ()
    parked_models: frozenset[str] = frozenset()  # vLLM models with an engine of their shape parked there
    loads: Mapping[str, ModelLoad] = field(default_factory=dict)

    def load(self, model: str) -> ModelLoad:
        return self.loads.get(model, ModelLoad())

    def can_start(self, model: str, num_bytes: int, num_devices: int = 1) -> bool:
        """A start of `model` needing `num_bytes` on each of `num_devices` devices could begin here now: that
        many devices have them free, or would after evicting idle instances of other models."""
        return self.eviction_plan(model, num_bytes, lambda instance: 0.0, num_devices=num_devices) is not None

    def eviction_plan(self, model: str, num_bytes: int, reload_s: Callable[[RunningInstance], float],
                      rule: EvictionRule = EvictionRule.COST, *, num_devices: int = 1) -> EvictionPlan | None:
        """The devices a start of `model` needing `num_bytes` on each of `num_devices` would run on (the sets
        close in the topology preferred), and the idle instances of other models to evict for it
        (`eviction.plan_evictions` by `rule`; `reload_s(i)`: seconds to start `i` again here); None when no
        set can make the room."""
        candidates = [EvictionCandidate(i.id, i.devices, i.memory_bytes, reload_s(i), i.request_rate, 0.0, 0.0)
                      for i in self.instances if i.is_evictable and i.model != model]
        groups = device_groups(len(self.free_memory), num_devices, self.topology)
        return plan_evictions(candidates, dict(enumerate(self.free_memory)), num_bytes, rule, groups=groups)

    def start_kind(self, model: str, engine_kind: EngineKind) -> EngineKind:
        """How a start of `model` here would init: on a parked engine where one of its shape waits."""
        return EngineKind.VLLM_PARKED if model in self.parked_models else engine_kind


@dataclass(frozen=True, slots=True)
class Migration:
    """Move running instance `instance_id` (of `model`) from `from_node` to `to_node`, after stopping
    `evictions` (idle instance ids on `to_node`) to make room there."""

    instance_id: str
    model: str
    from_node: str
    to_node: str
    estimated_s: float  # the instance's load at `to_node` plus moving its tokens
    evictions: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class StartPlan:
    """Start `model` on the devices `devices` of `node_id` from `tier`: first stop `evictions` (idle instance
    ids on `node_id`) and complete `migrations` (which free the memory), then load. `estimated_s`: seconds until
    it serves."""

    model: str
    node_id: str
    tier: Tier
    estimated_s: float
    migrations: tuple[Migration, ...] = ()
    evictions: tuple[str, ...] = ()
    devices: tuple[int, ...] = (0,)


def best_tier(model: str, node: NodeState, alive: Sequence[NodeState]) -> Tier:
    """The fastest place `node` can load `model` from: its DRAM, its SSD, another alive node, the repository."""
    if model in node.dram_models:
        return Tier.DRAM
    if model in node.ssd_models:
        return Tier.SSD
    if any(model in n.dram_models or model in n.ssd_models for n in alive if n.id != node.id):
        return Tier.PEER
    return Tier.REPOSITORY


def estimated_start_s(engine_kind: EngineKind, num_bytes: int, tier: Tier, node: NodeState, *,
                      after_s: float = 0.0, num_devices: int = 1) -> float:
    """Seconds until an `engine_kind` engine loading `num_bytes` from `tier` onto `num_devices` devices of
    `node`, begun `after_s` seconds from now, serves. Loads from the SSD or the network wait for
    `node.pending_load_s` (which drains meanwhile); DRAM ones do not wait."""
    wait_s = after_s if tier is Tier.DRAM else max(after_s, node.pending_load_s)
    return wait_s + load_time_s(engine_kind, num_bytes, tier, node.calibration, num_devices=num_devices)


def plan_start(
    model: str, engine_kind: EngineKind, num_bytes: int, memory_bytes: int, nodes: Sequence[NodeState], *,
    allow_migration: bool = True, num_devices: int = 1
) -> StartPlan | None:
    """The plan that has a new instance of `model` (an `engine_kind` engine on `num_bytes` of checkpoint, asking
    `memory_bytes` of each of `num_devices` devices) serving soonest, or None when no alive node can take one.

    The start on node N is estimated by `estimated_start_s` from N's best tier. Candidates:
    - N with devices that have the memory free, or would after evicting idle (not kept) instances of other
      models: `NodeState.eviction_plan` by the cost rule (eviction itself costs ~0 now; what it costs later is
      the rule's business);
    - with `allow_migration`, N where migrating ONE running instance of another model away makes the room, to
      its best other alive node D that has room for it (on as many devices as it spans), possibly after
      evictions there of a third model's idle instances (`_best_migration`). The instance must load at D and
      move its tokens (migration_time_s at D's calibration) before N's memory is free, so `model`'s load on N
      starts only then. D is never N, so no memory is counted twice.
    The minimum wins; on equal estimates a plan without migration, then without eviction, then the lower
    node id, then the lower instance id. Dead nodes are never chosen, nor used as migration destinations.
    """
    alive = sorted((n for n in nodes if n.is_alive), key=lambda n: n.id)
    best: tuple[tuple[float, int, int, str, str], StartPlan] | None = None
    for node in alive:
        for plan in _plans_on(model, engine_kind, num_bytes, memory_bytes, num_devices, node, alive,
                              allow_migration):
            victim = plan.evictions[0] if plan.evictions else plan.migrations[0].instance_id if plan.migrations else ""
            key = (plan.estimated_s, len(plan.migrations), len(plan.evictions), node.id, victim)
            if best is None or key < best[0]:
                best = (key, plan)
    return None if best is None else best[1]


def reload_estimate(node: NodeState, alive: Sequence[NodeState]) -> Callable[[RunningInstance], float]:
    """Seconds to start instance `i` of `node` again there, from the tier its checkpoint would load from."""
    def reload_s(instance: RunningInstance) -> float:
        tier = best_tier(instance.model, node, alive)
        return load_time_s(node.start_kind(instance.model, instance.engine_kind), instance.num_bytes, tier,
                           node.calibration, num_devices=len(instance.devices))
    return reload_s


def _plans_on(model: str, engine_kind: EngineKind, num_bytes: int, memory_bytes: int, num_devices: int,
              node: NodeState, alive: Sequence[NodeState], allow_migration: bool) -> list[StartPlan]:
    tier = best_tier(model, node, alive)
    engine_kind = node.start_kind(model, engine_kind)
    start_s = estimated_start_s(engine_kind, num_bytes, tier, node, num_devices=num_devices)
    room = node.eviction_plan(model, memory_bytes, reload_estimate(node, alive), num_devices=num_devices)
    if room is not None:
        return [StartPlan(model, node.id, tier, start_s, evictions=room.evictions, devices=room.devices)]
    if not allow_migration:
        return []
    plans = []
    for instance in sorted((i for i in node.instances if i.model != model), key=lambda i: i.id):
        freed = _without(node, instance)
        room = freed.eviction_plan(model, memory_bytes, lambda i: 0.0, num_devices=num_devices)
        if room is None or room.evictions:
            continue  # moving it away alone would not make room
        migration = _best_migration(instance, model, node, alive)
        if migration is not None:
            seconds = estimated_start_s(engine_kind, num_bytes, tier, node, after_s=migration.estimated_s,
                                        num_devices=num_devices)
            plans.append(StartPlan(model, node.id, tier, seconds, migrations=(migration,), devices=room.devices))
    return plans


def _without(node: NodeState, instance: RunningInstance) -> NodeState:
    """`node` once `instance` has left it: its memory free on its devices."""
    free = tuple(f + instance.memory_bytes if d in instance.devices else f for d, f in enumerate(node.free_memory))
    return dataclasses.replace(node, free_memory=free, instances=tuple(i for i in node.instances if i is not instance))


def _best_migration(instance: RunningInstance, cold_model: str, source: NodeState, alive: Sequence[NodeState]
                    ) -> Migration | None:
    """Where `instance` (running on `source`) is serving again soonest: an alive node other than `source`
    with room for its memory on as many devices as it spans, or room after evicting idle instances of models
    other than the instance's and `cold_model` (by the cost rule). None when its size is unknown or no node
    qualifies. Ties keep the lower node id."""
    if instance.num_bytes <= 0:
        return None
    best: Migration | None = None
    for dest in alive:
        if dest.id == source.id:
            continue
        others = dataclasses.replace(dest, instances=tuple(i for i in dest.instances if i.model != cold_model))
        room = others.eviction_plan(instance.model, instance.memory_bytes, reload_estimate(dest, alive),
                                    num_devices=len(instance.devices))
        if room is None:
            continue
        tier = best_tier(instance.model, dest, alive)
        move_s = migration_time_s(instance.num_tokens, dest.calibration)
        seconds = estimated_start_s(dest.start_kind(instance.model, instance.engine_kind), instance.num_bytes, tier,
                                    dest, num_devices=len(instance.devices)) + move_s
        if best is None or seconds < best.estimated_s:  # `alive` is in id order: ties keep the lower id
            best = Migration(instance.id, instance.model, source.id, dest.id, seconds, room.evictions)
    return best


@dataclass(frozen=True, slots=True)
class InstanceSpec:
    """What placing a new instance of `model` needs to know of it."""

    model: str
    engine_kind: EngineKind
    num_bytes: int  # its checkpoint's
    max_instances: int  # its live instances cluster-wide, at most
    memory_bytes: int = 0  # what an instance asks of each of its devices (`scheduler.memory`)
    num_devices: int = 1  # devices an instance spans (a deployment's num_gpus)


@dataclass(frozen=True, slots=True)
class Reservation:
    """A start `plan_new_instance` placed, which its node's state may not show yet: its memory on its device
    is not offered again and its transfer counts as queued on the node. It ends once the node's free memory
    accounts for more live instances of the model than `num_live_before` (the start shows in the node's status,
    not only in the replicated records, which can come first), or RESERVATION_SLACK_S after its estimate ran
    out."""

    model: str
    node_id: str
    estimated_s: float  # until it serves
    transfer_s: float  # of which the node's SSD or network is busy (what other starts there queue behind)
    made_at: float  # the `now` it was made at
    num_live_before: int  # the model's live instances on the node when it was made
    devices: tuple[int, ...] = (0,)
    memory_bytes: int = 0  # on each of `devices`

    def remaining_transfer_s(self, now: float) -> float:
        return max(0.0, self.transfer_s - (now - self.made_at))

    def is_expired(self, now: float) -> bool:
        return now - self.made_at > self.estimated_s + RESERVATION_SLACK_S


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a request that wants a new instance goes: to `node_id`, which starts one by `start`; or, with
    `start` None (the model has max_instances already), to the instances `node_id` has."""

    node_id: str
    start: StartPlan | None = None


def plan_new_instance(spec: InstanceSpec, states: Sequence[NodeState], reservations: Sequence[Reservation], *,
                      asked_by: str | None, now: float, allow_migration: bool = True
                      ) -> tuple[Placement | None, tuple[Reservation, ...]]:
    """The leader's answer for a request of `spec.model` that entered at node `asked_by` (None: no entry node)
    and wants a new instance, and the reservations it holds afterwards. None: no alive node can take it now.

    1. Reservations that ended (see `Reservation`) are dropped; the others take their memory out of their
       device's free memory and add their remaining transfer to its node's `pending_load_s`.
    2. With `max_instances` live or reserved instances of the model (dead nodes' count, their records stand
       until the leader drops them), no new one: the alive node with the fewest of them (then the lowest id)
       takes the request.
    3. Otherwise `plan_start`. When its node is not `asked_by`, the same planning with only `asked_by` able to
       take the start (the others still hold copies to fetch from) wins if its estimate is within
       ENTRY_PREFERENCE of the best. The start chosen is reserved.
    """
    by_id = {s.id: s for s in states}

    def num_live(node_id: str, model: str) -> int:
        state = by_id.get(node_id)
        return 0 if state is None else state.load(model).num_live

    def num_accounted(node_id: str, model: str) -> int:
        state = by_id.get(node_id)
        return 0 if state is None else state.load(model).num_accounted

    held = tuple(r for r in reservations
                 if not r.is_expired(now) and num_accounted(r.node_id, r.model) <= r.num_live_before)
    states = _with_reservations(states, held, now)
    live = collections.Counter({s.id: s.load(spec.model).num_live for s in states})
    # A held start the records show already is counted there, not again.
    live.update(r.node_id for r in held if r.model == spec.model and num_live(r.node_id, r.model) <= r.num_live_before)
    if live.total() >= spec.max_instances:
        serving = sorted((live[s.id], s.id) for s in states if s.is_alive and live[s.id] > 0)
        return (Placement(serving[0][1]) if serving else None), held
    plan = plan_start(spec.model, spec.engine_kind, spec.num_bytes, spec.memory_bytes, states,
                      allow_migration=allow_migration, num_devices=spec.num_devices)
    if plan is None:
        return None, held
    if asked_by is not None and plan.node_id != asked_by:
        only_entry = [s if s.id == asked_by else dataclasses.replace(s, free_memory=(), instances=())
                      for s in states]
        entry_plan = plan_start(spec.model, spec.engine_kind, spec.num_bytes, spec.memory_bytes, only_entry,
                                allow_migration=allow_migration, num_devices=spec.num_devices)
        relative, absolute = ENTRY_PREFERENCE
        if entry_plan is not None and entry_plan.estimated_s <= plan.estimated_s * (1 + relative) + absolute:
            plan = entry_plan
    node = by_id[plan.node_id]
    transfer_s = 0.0 if plan.tier is Tier.DRAM else transfer_time_s(spec.num_bytes, plan.tier, node.calibration,
                                                                     num_devices=spec.num_devices)
    reservation = Reservation(spec.model, plan.node_id, plan.estimated_s, transfer_s, now,
                              num_live(plan.node_id, spec.model), plan.devices, spec.memory_bytes)
    return Placement(plan.node_id, plan), (*held, reservation)


def _with_reservations(states: Sequence[NodeState], reservations: Sequence[Reservation], now: float
                       ) -> list[NodeState]:
    """Reserved memory taken out of its device's free memory, remaining transfers added to `pending_load_s`."""
    held: collections.defaultdict[tuple[str, int], int] = collections.defaultdict(int)
    queued_s: collections.defaultdict[str, float] = collections.defaultdict(float)
    for r in reservations:
        for device in r.devices:
            held[r.node_id, device] += r.memory_bytes
        queued_s[r.node_id] += r.remaining_transfer_s(now)
    return [dataclasses.replace(
        s, free_memory=tuple(max(0, free - held[s.id, device]) for device, free in enumerate(s.free_memory)),
        pending_load_s=s.pending_load_s + queued_s[s.id]) if s.id in queued_s else s for s in states]


def plan_checkpoint_homes(model: str, num_bytes: int, nodes: Sequence[NodeState], k: int) -> list[str]:
    """The ids of (up to) `k` alive nodes whose SSDs should hold `model`'s checkpoint, best first.

    Rendezvous hashing of (model, node id) among alive nodes that hold it already or have `num_bytes` of
    free SSD: deterministic, so every node computes the same homes from the same view, and a node joining
    or leaving moves only the homes it wins or held.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    eligible = [n.id for n in nodes if n.is_alive and (model in n.ssd_models or n.free_ssd_bytes >= num_bytes)]
    return sorted(eligible, key=lambda node_id: (_rendezvous_score(model, node_id), node_id), reverse=True)[:k]


def min_instances_share(model: str, node_id: str, node_ids: Sequence[str], min_instances: int) -> int:
    """How many of `model`'s `min_instances` node `node_id` keeps running, the instances being dealt over
    `node_ids` (the live nodes; `node_id` counts as one of them) one by one in rendezvous order of (model,
    node), the order checkpoint homes are ranked in, so kept instances tend to sit where the checkpoint
    is. Every node computes its own share from the same list, and the shares add up to `min_instances`."""
    ranked = sorted(set(node_ids) | {node_id}, key=lambda n: (_rendezvous_score(model, n), n), reverse=True)
    per_node, remainder = divmod(min_instances, len(ranked))
    return per_node + (1 if ranked.index(node_id) < remainder else 0)


def _rendezvous_score(model: str, node_id: str) -> bytes:
    # A keyed digest rather than hash(): Python salts str hashes per process.
    return hashlib.blake2b(f"{len(model)}:{model}:{node_id}".encode(), digest_size=8).digest()


def plan_dram_warming(request_rates: Mapping[str, float], model_bytes: Mapping[str, int], node: NodeState) -> list[str]:
    """Models on `node`'s SSD (not yet in its DRAM) worth copying into its DRAM, most requested first
    (`request_rates` in requests/s; ties by name). Models with no requests or unknown size are skipped;
    the total never exceeds `node.free_dram_bytes` (a model that does not fit is passed over for smaller,
    less requested ones)."""
    candidates = sorted(
        (m for m in node.ssd_models - node.dram_models if request_rates.get(m, 0.0) > 0 and m in model_bytes),
        key=lambda m: (-request_rates[m], m),
    )
    chosen, free_bytes = [], node.free_dram_bytes
    for model in candidates:
        if model_bytes[model] <= free_bytes:
            chosen.append(model)
            free_bytes -= model_bytes[model]
    return chosen
