"""Placement of new instances (`plan_start`), checkpoint homes, min_instances shares and DRAM warming."""

from __future__ import annotations

import dataclasses

import pytest

from sllmd.scheduler.estimate import Calibration, load_time_s, migration_time_s
from sllmd.scheduler.placement import (
    NodeState,
    RunningInstance,
    StartPlan,
    min_instances_share,
    plan_checkpoint_homes,
    plan_dram_warming,
    plan_start,
)
from sllmd.types import EngineKind, Tier

# Cold-start planning: plan_start, plan_checkpoint_homes, plan_dram_warming.

GB = 10**9
DEVICE = 80 * GB  # a device's memory; every instance here asks for a whole one
CAL = Calibration.defaults()
HF = EngineKind.TRANSFORMERS


def state(node_id: str, *, alive: bool = True, free: int = 0, dram: tuple[str, ...] = (), ssd: tuple[str, ...] = (),
          instances: tuple[RunningInstance, ...] = (), pending: float = 0.0, free_dram: int = 0,
          free_ssd: int = 0) -> NodeState:
    """`free` devices with room for one instance; each of `instances` fills one more device."""
    placed = tuple(dataclasses.replace(i, devices=(free + k,), memory_bytes=DEVICE) for k, i in enumerate(instances))
    return NodeState(node_id, is_alive=alive, free_memory=(DEVICE,) * free + (0,) * len(instances), calibration=CAL,
                     dram_models=frozenset(dram), ssd_models=frozenset(ssd), free_dram_bytes=free_dram,
                     free_ssd_bytes=free_ssd, pending_load_s=pending, instances=placed)


def busy(instance_id: str, model: str, *, tokens: int = 1000, num_bytes: int = 13 * GB) -> RunningInstance:
    return RunningInstance(instance_id, model, HF, num_requests=2, num_tokens=tokens, num_bytes=num_bytes)


def idle(instance_id: str, model: str, *, rate: float = 0.0) -> RunningInstance:
    return RunningInstance(instance_id, model, HF, num_requests=0, num_tokens=0, num_bytes=13 * GB, request_rate=rate)


def test_prefers_dram_over_ssd_over_peer_over_repository():
    nodes = [state("a", free=1), state("b", free=1, ssd=("m",)), state("c", free=1, dram=("m",))]
    plan = plan_start("m", HF, 26 * GB, DEVICE, nodes)
    assert (plan.node_id, plan.tier) == ("c", Tier.DRAM)
    assert plan.estimated_s == pytest.approx(load_time_s(HF, 26 * GB, Tier.DRAM, CAL))
    assert plan_start("m", HF, 26 * GB, DEVICE, nodes[:2]).tier == Tier.SSD
    # "b" holds it but has no slot: "a" fetches from the peer rather than the repository.
    peer = plan_start("m", HF, 26 * GB, DEVICE, [state("a", free=1), state("b", ssd=("m",))], allow_migration=False)
    assert (peer.node_id, peer.tier) == ("a", Tier.PEER)
    # A dead node's copy is no peer.
    dead_copy = [state("a", free=1), state("b", alive=False, ssd=("m",))]
    assert plan_start("m", HF, 26 * GB, DEVICE, dead_copy).tier == Tier.REPOSITORY


def test_a_node_with_a_parked_engine_of_the_models_shape_starts_it_in_seconds_not_a_minute():
    vllm = EngineKind.VLLM
    cold = state("a", free=1, dram=("m",))
    parked = NodeState("b", is_alive=True, free_memory=(DEVICE,), calibration=CAL, ssd_models=frozenset({"m"}),
                       parked_models=frozenset({"m"}))
    plan = plan_start("m", vllm, GB, DEVICE, [cold, parked])
    # Even from SSD against the other's DRAM: a new vLLM engine costs tens of seconds, a parked one the load.
    assert (plan.node_id, plan.tier) == ("b", Tier.SSD)
    assert plan.estimated_s == pytest.approx(load_time_s(EngineKind.VLLM_PARKED, GB, Tier.SSD, CAL))
    assert plan.estimated_s < load_time_s(vllm, GB, Tier.DRAM, CAL) / 10
    # Another model's parked engine is no help.
    assert plan_start("other", vllm, GB, DEVICE, [state("a", free=1, dram=("other",)), parked]).node_id == "a"


def test_queued_loads_delay_ssd_and_network_loads_but_not_dram_ones():
    nodes = [state("a", free=1, ssd=("m",), pending=30.0), state("b", free=1, ssd=("m",))]
    assert plan_start("m", HF, 26 * GB, DEVICE, nodes).node_id == "b"
    nodes = [state("a", free=1, ssd=("m",), pending=1.0), state("b", free=1, ssd=("m",), pending=2.0)]
    plan = plan_start("m", HF, 26 * GB, DEVICE, nodes)
    assert plan.node_id == "a" and plan.estimated_s == pytest.approx(1.0 + load_time_s(HF, 26 * GB, Tier.SSD, CAL))
    # Each GPU has its own PCIe link: a DRAM copy does not wait for the SSD queue.
    nodes = [state("a", free=1, dram=("m",), pending=30.0), state("b", free=1, ssd=("m",))]
    assert plan_start("m", HF, 26 * GB, DEVICE, nodes) == StartPlan("m", "a", Tier.DRAM,
                                                          load_time_s(HF, 26 * GB, Tier.DRAM, CAL))


def test_evicts_an_idle_instance_of_another_model_but_not_busy_ones():
    # By the cost rule: "x" is asked for every other second, "y" hardly ever.
    nodes = [state("a", dram=("m",), instances=(idle("i2", "x", rate=0.5), idle("i1", "y", rate=0.001),
                                                busy("i0", "z")))]
    plan = plan_start("m", HF, 26 * GB, DEVICE, nodes)
    assert (plan.node_id, plan.evictions, plan.migrations, plan.devices) == ("a", ("i1",), (), (1,))
    # A free device elsewhere at equal cost beats killing a warm instance.
    nodes = [state("a", dram=("m",), instances=(idle("i1", "y"),)), state("b", free=1, dram=("m",))]
    assert plan_start("m", HF, 26 * GB, DEVICE, nodes).node_id == "b"


def test_an_idle_instance_kept_for_min_instances_is_not_evicted():
    kept = RunningInstance("i1", "y", HF, num_requests=0, num_tokens=0, num_bytes=13 * GB, is_kept=True)
    plan = plan_start("m", HF, 26 * GB, DEVICE, [state("a", dram=("m",), instances=(kept, idle("i2", "x")))])
    assert plan.evictions == ("i2",)
    assert plan_start("m", HF, 26 * GB, DEVICE, [state("a", instances=(kept,))], allow_migration=False) is None
    assert not state("a", instances=(kept,)).can_start("m", DEVICE)
    assert state("a", instances=(idle("i2", "x"),)).can_start("m", DEVICE)


def test_never_plans_on_a_full_node_without_migration_or_on_dead_nodes():
    full = state("a", dram=("m",), instances=(busy("i1", "x"),))
    assert plan_start("m", HF, GB, DEVICE, [full], allow_migration=False) is None
    assert plan_start("m", HF, GB, DEVICE, [full]) is None  # nowhere to migrate to
    assert plan_start("m", HF, GB, DEVICE, [state("b", alive=False, free=4)]) is None
    assert plan_start("m", HF, GB, DEVICE, []) is None


def test_migrates_only_when_that_pays():
    # "a" has m in DRAM but its slot runs x; "b" has a free slot and x in DRAM, m only from the repository.
    nodes = [state("a", dram=("m",), instances=(busy("i1", "x"),)), state("b", free=1, dram=("x",))]
    plan = plan_start("m", HF, 26 * GB, DEVICE, nodes)
    assert plan.node_id == "a" and plan.tier == Tier.DRAM
    (migration,) = plan.migrations
    assert (migration.instance_id, migration.from_node, migration.to_node) == ("i1", "a", "b")
    expected_migration = load_time_s(HF, 13 * GB, Tier.DRAM, CAL) + migration_time_s(1000, CAL)
    assert migration.estimated_s == pytest.approx(expected_migration)
    assert plan.estimated_s == pytest.approx(expected_migration + load_time_s(HF, 26 * GB, Tier.DRAM, CAL))
    assert plan_start("m", HF, 26 * GB, DEVICE, nodes, allow_migration=False).node_id == "b"
    # When b can load m cheaply too, moving x costs more than it saves.
    nodes = [state("a", dram=("m",), instances=(busy("i1", "x"),)), state("b", free=1, dram=("x", "m"))]
    assert plan_start("m", HF, 26 * GB, DEVICE, nodes) == StartPlan("m", "b", Tier.DRAM,
                                                          load_time_s(HF, 26 * GB, Tier.DRAM, CAL))


def test_a_migrated_instance_reloads_as_its_own_engine_kind():
    # "b" has m on its SSD; "a" has m in DRAM but runs x. Moving x pays when x reloads in seconds (transformers),
    # not when it is a vLLM instance whose engine compiles for tens of seconds.
    def nodes(kind: EngineKind) -> list[NodeState]:
        x = RunningInstance("i1", "x", kind, num_requests=2, num_tokens=1000, num_bytes=13 * GB)
        return [state("a", dram=("m",), instances=(x,)), state("b", free=1, dram=("x",), ssd=("m",))]

    (migration,) = plan_start("m", HF, 26 * GB, DEVICE, nodes(HF)).migrations
    reload_s = load_time_s(HF, 13 * GB, Tier.DRAM, CAL)
    assert migration.estimated_s == pytest.approx(reload_s + migration_time_s(1000, CAL))
    plan = plan_start("m", HF, 26 * GB, DEVICE, nodes(EngineKind.VLLM))
    assert (plan.node_id, plan.tier, plan.migrations) == ("b", Tier.SSD, ())


def test_a_migration_never_reuses_the_plans_slot_and_unknown_sizes_stay_put():
    # The only free slot is on "a" itself: migrating a's instance there would count that slot twice.
    nodes = [state("a", free=0, dram=("m",), instances=(busy("i1", "x"),)), state("b", ssd=("x",))]
    assert plan_start("m", HF, 26 * GB, DEVICE, nodes) is None
    unknown = RunningInstance("i1", "x", HF, num_requests=2, num_tokens=10, num_bytes=0)
    nodes = [state("a", dram=("m",), instances=(unknown,)), state("b", free=1, dram=("x",))]
    assert plan_start("m", HF, 26 * GB, DEVICE, nodes).migrations == ()


def test_a_migration_may_evict_an_idle_instance_at_its_destination():
    # "b" has no free device, only an idle instance of y; x moves there (y stopped), m loads from a's DRAM.
    nodes = [state("a", dram=("m",), instances=(busy("i1", "x"),)),
             state("b", dram=("x",), instances=(idle("i3", "y", rate=0.1), idle("i2", "x", rate=0.1),
                                                busy("i4", "z")))]
    plan = plan_start("m", HF, 26 * GB, DEVICE, nodes)
    (migration,) = plan.migrations
    assert (plan.node_id, plan.tier, plan.evictions) == ("a", Tier.DRAM, ())
    assert (migration.to_node, migration.evictions) == ("b", ("i3",))  # never the idle instance of x itself
    # Without migration m goes to b from a peer, after evicting an idle instance there: x's, as asked for as
    # often as y but back from b's DRAM in a fraction of y's reload.
    no_migration = plan_start("m", HF, 26 * GB, DEVICE, nodes, allow_migration=False)
    assert (no_migration.node_id, no_migration.tier, no_migration.evictions) == ("b", Tier.PEER, ("i2",))
    # An idle instance of the cold model itself is never evicted to make room for it.
    nodes[1] = state("b", dram=("x",), instances=(idle("i5", "m"),))
    assert plan_start("m", HF, 26 * GB, DEVICE, nodes) is None


def test_the_queue_on_the_freed_node_drains_while_the_migration_runs():
    nodes = [state("a", ssd=("m",), pending=10.0, instances=(busy("i1", "x"),)), state("b", free=1, dram=("x",))]
    plan = plan_start("m", HF, 26 * GB, DEVICE, nodes)
    (migration,) = plan.migrations
    assert migration.estimated_s < 10  # so m's SSD load starts when the queue is done, not 10 s after the move
    assert plan.estimated_s == pytest.approx(10.0 + load_time_s(HF, 26 * GB, Tier.SSD, CAL))


def test_migration_picks_the_cheapest_instance_and_destination():
    nodes = [
        state("a", dram=("m",), instances=(busy("i1", "x", tokens=50_000), busy("i2", "y", tokens=100))),
        state("b", free=1, dram=("x", "y")),
        state("c", free=1, dram=("y",), pending=0.0),
    ]
    (migration,) = plan_start("m", HF, 26 * GB, DEVICE, nodes).migrations
    assert (migration.instance_id, migration.to_node) == ("i2", "b")  # fewer tokens; b before c on a tie


def test_ties_break_by_node_id_then_instance_id_whatever_the_order():
    nodes = [state("c", free=1, ssd=("m",)), state("b", free=1, ssd=("m",)), state("d", free=2, ssd=("m",))]
    for order in (nodes, nodes[::-1]):
        assert plan_start("m", HF, GB, DEVICE, order).node_id == "b"
    full = [state("a", dram=("m",), instances=(busy("i9", "x"), busy("i3", "x"))), state("b", free=1, dram=("x",))]
    for order in (full, full[::-1]):
        assert plan_start("m", HF, 26 * GB, DEVICE, order).migrations[0].instance_id == "i3"


def test_checkpoint_homes_are_k_alive_nodes_with_room_and_agree_across_views():
    nodes = [state(f"n{i}", free_ssd=100 * GB) for i in range(8)]
    homes = plan_checkpoint_homes("opt-13b", 26 * GB, nodes, k=3)
    assert len(homes) == 3 == len(set(homes))
    assert plan_checkpoint_homes("opt-13b", 26 * GB, nodes[::-1], k=3) == homes
    # Removing a node that is not a home changes nothing; removing a home replaces only that one.
    others = [n for n in nodes if n.id not in homes]
    assert plan_checkpoint_homes("opt-13b", 26 * GB, [n for n in nodes if n.id != others[0].id], k=3) == homes
    without_first = plan_checkpoint_homes("opt-13b", 26 * GB, [n for n in nodes if n.id != homes[0]], k=3)
    assert without_first[:2] == homes[1:]
    # Different models spread over different nodes.
    assert len({tuple(plan_checkpoint_homes(f"model-{i}", GB, nodes, k=1)) for i in range(40)}) > 4


def test_checkpoint_homes_skip_dead_and_full_nodes_but_keep_holders():
    nodes = [state("a", free_ssd=GB), state("b", alive=False, free_ssd=100 * GB), state("c", free_ssd=100 * GB),
             state("d", ssd=("m",))]
    assert sorted(plan_checkpoint_homes("m", 26 * GB, nodes, k=4)) == ["c", "d"]
    assert plan_checkpoint_homes("m", 26 * GB, nodes, k=0) == []
    with pytest.raises(ValueError):
        plan_checkpoint_homes("m", 26 * GB, nodes, k=-1)


def test_dram_warming_most_popular_first_within_free_dram():
    node = state("a", ssd=("big", "hot", "warm", "cold", "cached"), dram=("cached",), free_dram=40 * GB)
    rates = {"big": 5.0, "hot": 3.0, "warm": 1.0, "cold": 0.0, "cached": 9.0, "elsewhere": 7.0}
    sizes = {"big": 60 * GB, "hot": 26 * GB, "warm": 13 * GB, "cold": 1 * GB, "cached": 1 * GB, "elsewhere": GB}
    assert plan_dram_warming(rates, sizes, node) == ["hot", "warm"]  # big does not fit; never over 40 GB
    assert plan_dram_warming(rates, sizes, state("a", ssd=("hot",))) == []


def test_min_instances_are_dealt_over_the_live_nodes_and_add_up():
    nodes = ["n1", "n2", "n3"]
    for min_instances in range(7):
        shares = [min_instances_share("m", n, nodes, min_instances) for n in nodes]
        assert sum(shares) == min_instances and max(shares) - min(shares) <= 1
    holder = next(n for n in nodes if min_instances_share("m", n, nodes, 1))
    others = [n for n in nodes if n != holder]
    # The holder gone, exactly one of the others takes it; a node counts itself even when not listed.
    assert sum(min_instances_share("m", n, others, 1) for n in others) == 1
    assert min_instances_share("m", "n9", [], 2) == 2
