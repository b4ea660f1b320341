"""The placement policies `sllmd simulate` compares. Each answers the router's `AskLeader` (which server a
new instance starts on, and so where the request goes) and says where a cold start reads its checkpoint from;
the engine (`simengine`) does everything else the same way, routing included, and the server chosen makes
room as its worker does (`Simulation.make_room`: the best-fit GPU, or for a model spanning k GPUs the closest
k-GPU set with room, else evictions by the capacity's rule).

- `sllmd`: the daemon's own leader decision, `plan_new_instance` (max_instances, reservations, `plan_start`:
  calibrated estimators, checkpoint locality, queued loads, room after evicting idle instances, migration of
  one running instance, the entry node preferred within ENTRY_PREFERENCE) over the engine's `node_states()`.
  As in the daemon, the plan's evictions are its estimate only: the node's worker makes its own room.
- `no-migration`: the same, `allow_migration=False`.
- `random`: a uniformly random GPU (or set of k GPUs of one server, for a model spanning k) with room, else
  a random server where evicting makes room; the same node tiers as sllmd (DRAM cache, SSD homes, peer fetch).
- `ray-serve`: locality-unaware (of the servers with GPUs that have room, the one with the most free memory;
  else the server of the longest-idle instance, if evicting makes room there), and every cold start
  downloads the checkpoint from the repository. No DRAM or SSD cache.
- `ray-serve-cache`: the same placement, but each server's SSD keeps checkpoints (the deploy-time homes
  and every download, LRU): a cold start reads the local SSD when it holds the model. No DRAM cache, no
  peer fetch.
"""

from __future__ import annotations

import random

from sllmd.scheduler.placement import InstanceSpec, Reservation, StartPlan, plan_new_instance
from sllmd.sim.cluster import ModelSpec
from sllmd.sim.engine import Policy, Simulation
from sllmd.sim.state import Decision, SimServer
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
        spec = InstanceSpec(model.name, sim.hardware.engine_kind, model.num_bytes, sim.autoscaling.max_instances,
                            sim.memory_bytes[model.name], model.num_gpus)
        placement, self.reservations = plan_new_instance(spec, sim.node_states(), self.reservations,
                                                         asked_by=asked_by, now=sim.now,
                                                         allow_migration=self.allow_migration)
        if placement is None:
            return None
        if placement.start is not None:  # None: the model has max_instances, the request joins them
            decision = _decision(placement.start, model, sim)
            if decision is not None:  # None: the request waits there, for the server's autoscaler
                sim.start(model, decision)
        return placement.node_id


def _decision(plan: StartPlan, model: ModelSpec, sim: Simulation) -> Decision | None:
    """`plan` on the simulation's servers and instances. Its node, and its migration's destination, make their
    own room (`Simulation.make_room`), as the daemon's workers do; a migration frees memory on the GPUs of the
    instance it moves, so the new instance takes the plan's devices (which include one of them at least)."""
    servers = {s.id: s for s in sim.servers}
    if not plan.migrations:
        return sim.make_room(servers[plan.node_id], model)
    (migration,) = plan.migrations
    instance = next(i for i in servers[migration.from_node].instances if i.id == migration.instance_id)
    copy = sim.make_room(servers[migration.to_node], instance.spec)
    return None if copy is None else Decision(servers[plan.node_id], plan.devices, migrate=instance, migrate_to=copy)


class RandomGpu(NodeTiers):
    name = "random"

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def decide(self, model: ModelSpec, sim: Simulation) -> Decision | None:
        with_room = [Decision(s, group) for s in sim.servers for group in sim.fitting(s, model)]
        if with_room:
            return self.rng.choice(with_room)
        after_evictions = [d for d in (sim.make_room(s, model) for s in sim.servers) if d is not None]
        return self.rng.choice(after_evictions) if after_evictions else None


class RayServe(Policy):
    has_dram_cache = False

    def __init__(self, *, ssd_cache: bool) -> None:
        self.name = "ray-serve-cache" if ssd_cache else "ray-serve"
        self.keeps_fetched = self.has_checkpoint_homes = ssd_cache

    def decide(self, model: ModelSpec, sim: Simulation) -> Decision | None:
        with_room = [s for s in sim.servers if sim.fitting(s, model)]
        if with_room:  # max keeps the first (lowest id) on ties
            return sim.make_room(max(with_room, key=lambda s: sum(s.free_memory())), model)
        idle = [i for s in sim.servers for i in s.instances if sim.is_evictable(i) and i.spec.name != model.name]
        for victim in sorted(idle, key=lambda i: (i.idle_since_s, i.id)):
            decision = sim.make_room(victim.server, model)
            if decision is not None:
                return decision
        return None

    def source_tier(self, server: SimServer, model: ModelSpec, sim: Simulation) -> Tier:
        return Tier.SSD if self.keeps_fetched and model.name in server.ssd else Tier.REPOSITORY


def _holds(server: SimServer, model: ModelSpec) -> bool:
    return model.name in server.ssd or (server.dram is not None and model.name in server.dram)


def all_policies(seed: int) -> list[Policy]:
    return [Sllmd(), Sllmd(allow_migration=False), RayServe(ssd_cache=False), RayServe(ssd_cache=True), RandomGpu(seed)]
