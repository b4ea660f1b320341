"""The leader's decision for a request that wants a new instance (`placement.plan_new_instance`), as tables:
max_instances, reservations and their end, the entry node's preference, dead nodes."""

from __future__ import annotations

import dataclasses

import pytest

from sllmd.scheduler.estimate import Calibration, load_time_s, transfer_time_s
from sllmd.scheduler.placement import (
    RESERVATION_SLACK_S,
    InstanceSpec,
    ModelLoad,
    NodeState,
    Placement,
    Reservation,
    plan_new_instance,
)
from sllmd.types import EngineKind, Tier

GB = 10**9
DEVICE = 80 * GB  # a device's memory; every instance here asks for a whole one
HF = EngineKind.TRANSFORMERS
CAL = Calibration.defaults()
SPEC = InstanceSpec("m", HF, 2 * GB, 2, DEVICE)
SSD_S = load_time_s(HF, 2 * GB, Tier.SSD, CAL)


def node(node_id: str, *, alive: bool = True, free: int = 1, ssd: bool = True, dram: bool = False,
         pending: float = 0.0, live: int = 0) -> NodeState:
    return NodeState(node_id, is_alive=alive, free_memory=(DEVICE,) * free, calibration=CAL,
                     ssd_models=frozenset({"m"} if ssd else ()), dram_models=frozenset({"m"} if dram else ()),
                     pending_load_s=pending, loads={"m": ModelLoad(num_ready=live)} if live else {})


def plan(states, reservations=(), *, asked_by: str | None = None, now: float = 100.0, spec: InstanceSpec = SPEC):
    return plan_new_instance(spec, states, reservations, asked_by=asked_by, now=now)


def test_a_new_instance_goes_where_it_serves_soonest_and_is_reserved():
    placement, reservations = plan([node("a"), node("b", dram=True)])
    assert placement is not None and placement.node_id == "b" and placement.start.tier is Tier.DRAM
    # DRAM: no transfer; the instance's memory on device 0 is held.
    assert reservations == (Reservation("m", "b", placement.start.estimated_s, 0.0, 100.0, 0, (0,), DEVICE),)
    placement, (reservation,) = plan([node("a"), node("b", pending=10.0)])
    assert placement.node_id == "a"
    assert reservation.transfer_s == pytest.approx(transfer_time_s(2 * GB, Tier.SSD, CAL))


@pytest.mark.parametrize(("states", "expected"), [
    # At max_instances: no new instance; the alive node with the fewest of them (then the lowest id).
    ([node("a", live=1), node("b", live=1), node("c")], Placement("a")),
    ([node("a", live=2), node("b", live=1)], Placement("b")),
    ([node("a", live=1), node("b", alive=False, live=1), node("c")], Placement("a")),  # the dead one counts
    ([node("a", alive=False, live=2), node("c")], None),  # ... but takes no request
    # Nowhere to start one.
    ([node("a", free=0), node("b", alive=False)], None),
    ([], None),
])
def test_max_instances_and_no_room(states, expected):
    placement, reservations = plan(states)
    assert placement == expected and reservations == ()


def test_a_reservation_holds_the_slot_and_counts_against_max_instances():
    _, reservations = plan([node("a"), node("b", pending=1.0)])
    assert [r.node_id for r in reservations] == ["a"]
    # a's one slot is reserved: the next start goes to b, before a's state shows the first.
    placement, reservations = plan([node("a"), node("b", pending=1.0)], reservations, now=100.1)
    assert placement.node_id == "b" and [r.node_id for r in reservations] == ["a", "b"]
    # Two reserved, max_instances 2: no third start; the requests go to the reserved nodes.
    placement, held = plan([node("a"), node("b", pending=1.0), node("c")], reservations, now=100.2)
    assert placement == Placement("a") and held == reservations


def test_a_reserved_transfer_queues_later_starts_on_that_node_while_it_lasts():
    other = InstanceSpec("x", HF, 2 * GB, 4, DEVICE)  # in no node's store: fetched from the repository
    _, (reservation,) = plan([node("a"), node("b", pending=5.0)], spec=other)
    assert reservation.node_id == "a"
    assert reservation.transfer_s == pytest.approx(transfer_time_s(2 * GB, Tier.REPOSITORY, CAL))
    states = [node("a", free=2), node("b", pending=5.0)]
    assert plan(states)[0].node_id == "a"
    assert plan(states, (reservation,), now=100.0)[0].node_id == "b"  # a's SSD and network busy for 20 s
    assert plan(states, (reservation,), now=100.0 + reservation.transfer_s)[0].node_id == "a"  # done


def test_a_reservation_holds_while_only_the_records_show_its_start():
    spec = InstanceSpec("m", HF, 2 * GB, 4, DEVICE)
    _, (reservation,) = plan([node("a")], spec=spec)
    # The records show the instance, the node's status (its free memory) not yet: the memory stays reserved.
    recorded_only = dataclasses.replace(node("a"), loads={"m": ModelLoad(num_starting=1, num_in_status=0)})
    placement, held = plan([recorded_only], (reservation,), now=100.1, spec=spec)
    assert held[0] == reservation and placement is None  # its one device is reserved: no second start there
    in_status = dataclasses.replace(node("a"), loads={"m": ModelLoad(num_starting=1, num_in_status=1)})
    assert plan([in_status], (reservation,), now=100.1, spec=spec)[1][:1] != (reservation,)


def test_a_reservation_ends_when_its_start_shows_or_after_its_estimate_and_the_slack():
    _, (reservation,) = plan([node("a")], spec=InstanceSpec("m", HF, 2 * GB, 1, DEVICE))
    shown = [node("a", free=0, live=1)]
    assert plan(shown, (reservation,), now=100.1)[1] == ()
    placement, held = plan([node("a")], (reservation,), now=100.1, spec=InstanceSpec("m", HF, 2 * GB, 1, DEVICE))
    assert placement == Placement("a") and held == (reservation,)  # not shown yet: held, at max_instances
    expired_at = 100.0 + reservation.estimated_s + RESERVATION_SLACK_S + 0.01
    placement, held = plan([node("a")], (reservation,), now=expired_at,
                           spec=InstanceSpec("m", HF, 2 * GB, 1, DEVICE))
    assert placement.start is not None and held == (Reservation("m", "a", placement.start.estimated_s,
                                                                reservation.transfer_s, expired_at, 0, (0,), DEVICE),)


@pytest.mark.parametrize(("entry_pending", "expected"), [
    (0.004, "a"),  # within ENTRY_PREFERENCE's absolute margin of the best: the entry node
    (0.05 * SSD_S, "a"),  # within its relative margin
    (0.1 * SSD_S + 0.01, "b"),  # outside: the best
])
def test_the_entry_node_wins_within_the_preference_margin(entry_pending, expected):
    placement, (reservation,) = plan([node("a", pending=entry_pending), node("b")], asked_by="a")
    assert placement.node_id == reservation.node_id == expected
    # No entry node (the simulator's case): the best.
    assert plan([node("a", pending=entry_pending), node("b")])[0].node_id == "b"


def test_the_entry_node_must_be_able_to_start_it_itself():
    placement, _ = plan([node("a", free=0), node("b")], asked_by="a")
    assert placement.node_id == "b"


def test_dead_nodes_are_never_chosen():
    placement, _ = plan([node("a", alive=False, dram=True), node("b", pending=30.0)], asked_by="a")
    assert placement.node_id == "b"
