"""The placement policies `sllmd simulate` compares. Each answers the router's `AskLeader` (where a new
instance starts, and so where the request goes) and says where a cold start reads its checkpoint from; the
engine (`simengine`) does everything else the same way, routing included.

- `sllmd`: the daemon's own leader decision, `plan_new_instance` (max_instances, reservations, `plan_start`:
  calibrated estimators, checkpoint locality, queued loads, eviction of idle instances, migration of one
  running instance, the entry node preferred within ENTRY_PREFERENCE) over the engine's `node_states()`.
- `no-migration`: the same, `allow_migration=False`.
- `random`: a uniformly random free GPU (else a random idle instance of another model is evicted), the
  same node tiers as sllmd (DRAM cache, SSD homes, peer fetch).
- `ray-serve`: locality-unaware (the server with the most free GPUs; else the longest-idle instance is
  evicted), and every cold start downloads the checkpoint from the repository. No DRAM or SSD cache.
- `ray-serve-cache`: the same placement, but each server's SSD keeps checkpoints (the deploy-time homes
  and every download, LRU): a cold start reads the local SSD when it holds the model. No DRAM cache, no
  peer fetch.
"""

from __future__ import annotations

import random

from sllmd.scheduler.placement import InstanceSpec, Reservation, StartPlan, plan_new_instance
from sllmd.sim.cluster import ModelSpec
from sllmd.sim.engine import Policy, Simulation
from sllmd.sim.state import Decision, SimInstance, SimServer
from sllmd.types import Tier


class NodeTiers(Policy):
    """Reads from sllmd's node tiers: DRAM cache, local SSD, a peer holding it, else the repository."""

    def source_tier(self, server: SimServer, model: ModelSpec, sim: Simulation) -> Tier:
        if server.dram is not None and model.name in server.dram:
            return Tier.DRAM
        if model.name in server.ssd:
            return Tier.SSD
        if any(other is not server and _holds(other, model) for other in sim.servers):
            return Tier.PEER
        return Tier.REPOSITORY


class Sllmd(NodeTiers):
    """Places as the leader does; holds its reservations, so one object serves one `Simulation`."""

    def __init__(self, *, allow_migration: bool = True) -> None:
        self.name = "sllmd" if allow_migration else "no-migration"
        self.allow_migration = allow_migration
        self.reservations: tuple[Reservation, ...] = ()

    def place(self, model: ModelSpec, sim: Simulation, *, asked_by: str) -> str | None:
        spec = InstanceSpec(model.name, sim.hardware.engine_kind, model.num_bytes, sim.autoscaling.max_instances)
        placement, self.reservations = plan_new_instance(spec, sim.node_states(), self.reservations,
                                                         asked_by=asked_by, now=sim.now,
                                                         allow_migration=self.allow_migration)
        if placement is None:
            return None
        if placement.start is not None:  # None: the model has max_instances, the request joins them
            sim.start(model, _decision(placement.start, sim))
        return placement.node_id


def _decision(plan: StartPlan, sim: Simulation) -> Decision:
    """`plan` on the simulation's servers and instances."""
    servers = {s.id: s for s in sim.servers}
    server = servers[plan.node_id]
    instances = {i.id: i for s in sim.servers for i in s.instances}
    evictions = tuple(instances[i] for i in plan.evictions)
    if not plan.migrations:
        return Decision(server, evictions)
    (migration,) = plan.migrations
    return Decision(server, evictions, instances[migration.instance_id], servers[migration.to_node],
                    tuple(instances[i] for i in migration.evictions))


class RandomGpu(NodeTiers):
    name = "random"

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def decide(self, model: ModelSpec, sim: Simulation) -> Decision | None:
        free_gpus = [s for s in sim.servers for _ in range(s.num_free_slots)]
        if free_gpus:
            return Decision(self.rng.choice(free_gpus))
        idle = _idle_of_other_models(model, sim)
        if not idle:
            return None
        victim = self.rng.choice(idle)
        return Decision(victim.server, (victim,))


class RayServe(Policy):
    has_dram_cache = False

    def __init__(self, *, ssd_cache: bool) -> None:
        self.name = "ray-serve-cache" if ssd_cache else "ray-serve"
        self.keeps_fetched = self.has_checkpoint_homes = ssd_cache

    def decide(self, model: ModelSpec, sim: Simulation) -> Decision | None:
        free = [s for s in sim.servers if s.num_free_slots > 0]
        if free:
            return Decision(max(free, key=lambda s: s.num_free_slots))  # max keeps the first (lowest id) on ties
        idle = _idle_of_other_models(model, sim)
        if not idle:
            return None
        victim = min(idle, key=lambda i: (i.idle_since_s, i.id))
        return Decision(victim.server, (victim,))

    def source_tier(self, server: SimServer, model: ModelSpec, sim: Simulation) -> Tier:
        return Tier.SSD if self.keeps_fetched and model.name in server.ssd else Tier.REPOSITORY


def _holds(server: SimServer, model: ModelSpec) -> bool:
    return model.name in server.ssd or (server.dram is not None and model.name in server.dram)


def _idle_of_other_models(model: ModelSpec, sim: Simulation) -> list[SimInstance]:
    return [i for s in sim.servers for i in s.instances if sim.is_evictable(i) and i.spec.name != model.name]


def all_policies(seed: int) -> list[Policy]:
    return [Sllmd(), Sllmd(allow_migration=False), RayServe(ssd_cache=False), RayServe(ssd_cache=True), RandomGpu(seed)]
