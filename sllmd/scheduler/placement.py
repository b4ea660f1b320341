"""Placement: where a request is served, and where a new instance starts. Pure policy over a snapshot of
the cluster, no I/O or clocks.

Warm routing, `choose_node` over `NodeView`s:

The entry node builds a `NodeView` per known node (its own from the worker, the others from the
replicated instance records and NODE_STATUS soft state) and asks `choose_node`. Rules, first match wins:

1. this node, if it has a ready instance of the model (no hop);
2. the alive node with a ready instance and the least load per ready instance;
3. the alive node already starting one (this node first), so a cold start is not started twice;
4. this node, if it can start one (a free slot, or an idle instance it may evict);
5. the alive node with the most free slots;
6. None: nothing can take it now; the caller serves locally and queues (or answers 503) there.

Ties are broken by node id, so every entry node with the same view makes the same choice.

Cold starts, `plan_start` over `NodeState`s (the leader asks it for every instance the autoscaler wants):
the node where the model will be serving soonest by the estimators of `sllmd.scheduler.estimate`,
possibly after evicting idle instances or migrating one running instance away (see `plan_start`).
Checkpoint homes (`plan_checkpoint_homes`, at deploy) and DRAM warming (`plan_dram_warming`, per node)
decide where checkpoints sit before any request needs them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sllmd.scheduler.estimate import Calibration, EngineKind, Tier, load_time_s, migration_time_s


@dataclass(frozen=True, slots=True)
class NodeView:
    """One node as the entry node sees it for one model. Counts are of that model's instances."""

    id: str
    is_alive: bool
    num_free_slots: int
    ready_instances_of_model: int = 0
    starting_instances_of_model: int = 0
    in_flight_hint: int = 0  # requests of the model the entry node knows to be in flight there
    num_evictable: int = 0  # idle instances of other models it may stop to start this one

    @property
    def can_start(self) -> bool:
        return self.num_free_slots + self.num_evictable > 0


def choose_node(model: str, *, local_node_id: str, nodes: Sequence[NodeView]) -> str | None:
    """The id of the node that should serve a request for `model`, or None (see the module doc).

    `model` is not used by these rules yet; it is part of the signature for locality-aware ones.
    The local node counts as alive whatever its view says.
    """
    del model
    alive = sorted((n for n in nodes if n.is_alive or n.id == local_node_id), key=lambda n: n.id)
    local = next((n for n in alive if n.id == local_node_id), None)
    if local is not None and local.ready_instances_of_model > 0:
        return local.id
    ready = [n for n in alive if n.ready_instances_of_model > 0]
    if ready:
        return min(ready, key=lambda n: (n.in_flight_hint / n.ready_instances_of_model, n.id)).id
    starting = [n for n in alive if n.starting_instances_of_model > 0]
    if starting:
        return min(starting, key=lambda n: (n.id != local_node_id, n.id)).id
    if local is not None and local.can_start:
        return local.id
    free = [n for n in alive if n.num_free_slots > 0]
    if free:
        return min(free, key=lambda n: (-n.num_free_slots, n.id)).id
    return None


@dataclass(frozen=True, slots=True)
class RunningInstance:
    """A ready instance. `engine_kind`: its model's (how its reload at a migration's destination inits).
    `num_tokens`: prompt + generated tokens of its in-flight requests (what a migration moves). `num_bytes`:
    its model's checkpoint size; 0 means unknown, and such an instance is never migrated (its reload cost at
    the destination could not be estimated)."""

    id: str
    model: str
    engine_kind: EngineKind
    num_requests: int
    num_tokens: int
    num_bytes: int = 0

    @property
    def is_idle(self) -> bool:
        return self.num_requests == 0


@dataclass(frozen=True, slots=True)
class NodeState:
    """One node as the leader sees it for a cold start. Byte counts are free cache space; `pending_load_s`
    is the estimated seconds its SSD and network stay busy with loads already queued or in progress there:
    a new load that reads the SSD or fetches from a peer or the repository waits behind them, one from DRAM
    does not (each GPU has its own PCIe link). `instances` are its ready instances (starting ones hold
    slots but are not listed)."""

    id: str
    is_alive: bool
    num_free_slots: int
    calibration: Calibration
    dram_models: frozenset[str] = frozenset()
    ssd_models: frozenset[str] = frozenset()
    free_dram_bytes: int = 0
    free_ssd_bytes: int = 0
    pending_load_s: float = 0.0
    instances: tuple[RunningInstance, ...] = ()
    parked_models: frozenset[str] = frozenset()  # vLLM models with an engine of their shape parked there

    def start_kind(self, model: str, engine_kind: EngineKind) -> EngineKind:
        """How a start of `model` here would init: on a parked engine where one of its shape waits."""
        return EngineKind.VLLM_PARKED if model in self.parked_models else engine_kind


@dataclass(frozen=True, slots=True)
class Migration:
    """Move running instance `instance_id` (of `model`) from `from_node` to `to_node`, after stopping
    `evictions` (idle instance ids on `to_node`) to free a slot there."""

    instance_id: str
    model: str
    from_node: str
    to_node: str
    estimated_s: float  # the instance's load at `to_node` plus moving its tokens
    evictions: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class StartPlan:
    """Start `model` on `node_id` from `tier`: first stop `evictions` (idle instance ids on `node_id`) and
    complete `migrations` (which free the slot), then load. `estimated_s`: seconds until it serves."""

    model: str
    node_id: str
    tier: Tier
    estimated_s: float
    migrations: tuple[Migration, ...] = ()
    evictions: tuple[str, ...] = ()


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
                      after_s: float = 0.0) -> float:
    """Seconds until an `engine_kind` engine loading `num_bytes` from `tier` on `node`, begun `after_s` seconds
    from now, serves. Loads from the SSD or the network wait for `node.pending_load_s` (which drains
    meanwhile); DRAM ones do not wait."""
    wait_s = after_s if tier is Tier.DRAM else max(after_s, node.pending_load_s)
    return wait_s + load_time_s(engine_kind, num_bytes, tier, node.calibration)


def plan_start(
    model: str, engine_kind: EngineKind, num_bytes: int, nodes: Sequence[NodeState], *, allow_migration: bool = True
) -> StartPlan | None:
    """The plan that has a new instance of `model` (an `engine_kind` engine on `num_bytes` of checkpoint)
    serving soonest, or None when no alive node can take one.

    The start on node N is estimated by `estimated_start_s` from N's best tier. Candidates:
    - N with a free slot;
    - N with an idle instance of another model, evicted first (the lowest id; eviction costs ~0);
    - with `allow_migration`, N whose slot is freed by migrating ONE running instance of another model to
      its best other alive node D that has a free slot or an idle instance of a third model to evict
      (`_best_migration`). The instance must load at D and move its tokens (migration_time_s at D's
      calibration) before N's slot is free, so `model`'s load on N starts only then. D is never N, so no
      slot is counted twice.
    The minimum wins; on equal estimates a plan without migration, then without eviction, then the lower
    node id, then the lower instance id. Dead nodes are never chosen, nor used as migration destinations.
    """
    alive = sorted((n for n in nodes if n.is_alive), key=lambda n: n.id)
    best: tuple[tuple[float, int, int, str, str], StartPlan] | None = None
    for node in alive:
        for plan in _plans_on(model, engine_kind, num_bytes, node, alive, allow_migration):
            victim = plan.evictions[0] if plan.evictions else plan.migrations[0].instance_id if plan.migrations else ""
            key = (plan.estimated_s, len(plan.migrations), len(plan.evictions), node.id, victim)
            if best is None or key < best[0]:
                best = (key, plan)
    return None if best is None else best[1]


def _plans_on(model: str, engine_kind: EngineKind, num_bytes: int, node: NodeState, alive: Sequence[NodeState],
              allow_migration: bool) -> list[StartPlan]:
    tier = best_tier(model, node, alive)
    engine_kind = node.start_kind(model, engine_kind)
    start_s = estimated_start_s(engine_kind, num_bytes, tier, node)
    if node.num_free_slots > 0:
        return [StartPlan(model, node.id, tier, start_s)]
    others = sorted((i for i in node.instances if i.model != model), key=lambda i: i.id)
    idle = [i for i in others if i.is_idle]
    if idle:
        return [StartPlan(model, node.id, tier, start_s, evictions=(idle[0].id,))]
    if not allow_migration:
        return []
    plans = []
    for instance in others:
        migration = _best_migration(instance, model, node, alive)
        if migration is not None:
            seconds = estimated_start_s(engine_kind, num_bytes, tier, node, after_s=migration.estimated_s)
            plans.append(StartPlan(model, node.id, tier, seconds, migrations=(migration,)))
    return plans


def _best_migration(instance: RunningInstance, cold_model: str, source: NodeState, alive: Sequence[NodeState]
                    ) -> Migration | None:
    """Where `instance` (running on `source`) is serving again soonest: an alive node other than `source`
    with a free slot, or else with an idle instance (lowest id) of a model other than the instance's and
    `cold_model` to evict. None when its size is unknown or no node qualifies. Ties keep the lower node id."""
    if instance.num_bytes <= 0:
        return None
    best: Migration | None = None
    for dest in alive:
        if dest.id == source.id:
            continue
        evictions: tuple[str, ...] = ()
        if dest.num_free_slots <= 0:
            idle = sorted(i.id for i in dest.instances if i.is_idle and i.model not in (instance.model, cold_model))
            if not idle:
                continue
            evictions = (idle[0],)
        tier = best_tier(instance.model, dest, alive)
        move_s = migration_time_s(instance.num_tokens, dest.calibration)
        seconds = estimated_start_s(dest.start_kind(instance.model, instance.engine_kind), instance.num_bytes, tier,
                                    dest) + move_s
        if best is None or seconds < best.estimated_s:  # `alive` is in id order: ties keep the lower id
            best = Migration(instance.id, instance.model, source.id, dest.id, seconds, evictions)
    return best


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
