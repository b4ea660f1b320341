"""Where a request goes from its entry node (`scheduler.routing.route`), rule by rule, as tables."""

from __future__ import annotations

import pytest

from sllmd.scheduler.placement import ModelLoad, NodeState, RunningInstance
from sllmd.scheduler.routing import AskLeader, RelayTo, ServeHere, has_room, route
from sllmd.types import AutoscalingPolicy, EngineKind

POLICY = AutoscalingPolicy(max_instances=4, target_concurrency=2)
DEVICE = 80 * 10**9  # what one instance asks
HERE = ServeHere()


def node(node_id: str, *, alive: bool = True, free: int = 0, ready: int = 0, starting: int = 0, requests: int = 0,
         idle_other: bool = False, kept_other: bool = False) -> NodeState:
    """A node with `ready`/`starting` instances of model "m" and `requests` for it, and room for `free` more on
    its first device; `idle_other`/`kept_other`: an idle instance of another model filling a second device,
    evictable or kept for min_instances."""
    instances = tuple(RunningInstance(f"{node_id}-x", "x", EngineKind.TRANSFORMERS, 0, 0, is_kept=kept_other,
                                      devices=(1,), memory_bytes=DEVICE)
                      for _ in range(idle_other or kept_other))
    loads = {"m": ModelLoad(ready, starting, requests)} if ready or starting or requests else {}
    return NodeState(node_id, is_alive=alive, free_memory=(free * DEVICE, 0), instances=instances, loads=loads)


def ask(fallback: ServeHere | RelayTo, *eligible: str) -> AskLeader:
    return AskLeader(fallback, frozenset(eligible))


@pytest.mark.parametrize(("nodes", "expected"), [
    # Serve here: a ready instance here with room, even when another node is idler.
    ([node("a", ready=1, requests=1), node("b", ready=2)], HERE),
    # Relay to the node with a ready instance: the fewest requests per ready instance, then the lowest id.
    ([node("a", free=2), node("b", ready=1, requests=1), node("c", ready=2, requests=1)], RelayTo("c")),
    ([node("a", free=2), node("c", ready=1), node("b", ready=1)], RelayTo("b")),
    # A ready instance beats one starting here; a starting one beats starting another (here first).
    ([node("a", starting=1), node("b", ready=1, requests=1)], RelayTo("b")),
    ([node("a", free=2), node("b", starting=1)], RelayTo("b")),
    ([node("a", starting=1), node("b", starting=1)], HERE),
    # No instance anywhere: ask the leader; without an answer, here if it can start one (room on a device, or
    # after evicting an idle instance), else the alive node with the most memory free on one device, else
    # here, queued.
    ([node("a", free=1), node("b", free=8)], ask(HERE, "a", "b")),
    ([node("a", idle_other=True), node("b", free=8)], ask(HERE, "a", "b")),
    ([node("a", kept_other=True), node("b", free=1), node("c", free=3)], ask(RelayTo("c"), "a", "b", "c")),
    ([node("a"), node("b")], ask(HERE, "a", "b")),
    ([node("a")], ask(HERE, "a")),
    # Saturated (requests at target concurrency × live instances) and below max_instances: ask the leader.
    ([node("a", ready=1, requests=2), node("b", free=1)], ask(HERE, "a", "b")),
    ([node("a"), node("b", ready=1, starting=1, requests=4)], ask(RelayTo("b"), "a", "b")),
    ([node("a"), node("b", ready=1, starting=1, requests=3)], RelayTo("b")),  # the starting one has room
    # ... at max_instances (dead nodes' instances count): served where the instances are.
    ([node("a", ready=2, requests=9), node("b", ready=2)], HERE),
    ([node("a", ready=3, requests=9), node("b", alive=False, ready=1)], HERE),
    # Dead nodes are left out; this node counts as alive whatever its state says.
    ([node("a", free=1), node("b", alive=False, ready=1)], ask(HERE, "a")),
    ([node("a", free=2), node("b", alive=False, starting=1)], ask(HERE, "a")),
    ([node("a", alive=False, ready=1), node("b", ready=1)], HERE),
])
def test_route(nodes, expected):
    assert route("m", POLICY, nodes, local_id="a", memory_bytes=DEVICE) == expected


def test_nodes_a_relay_failed_to_lately_count_as_dead():
    nodes = [node("a", free=1), node("b", ready=1), node("c", ready=1, requests=1)]
    assert route("m", POLICY, nodes, local_id="a", memory_bytes=DEVICE) == RelayTo("b")
    assert route("m", POLICY, nodes, local_id="a", memory_bytes=DEVICE, avoid={"b"}) == RelayTo("c")
    assert route("m", POLICY, nodes, local_id="a", memory_bytes=DEVICE, avoid={"b", "c"}) == ask(HERE, "a")


def test_requests_relayed_there_count_when_its_status_lags():
    nodes = [node("a"), node("b", ready=1), node("c", ready=1, requests=1)]
    assert route("m", POLICY, nodes, local_id="a", memory_bytes=DEVICE, num_relayed={"b": 2}) == RelayTo("c")
    assert route("m", POLICY, [node("a"), node("b", ready=1)], local_id="a", memory_bytes=DEVICE,
                 num_relayed={"b": 2}) == ask(RelayTo("b"), "a", "b")


def test_ties_break_by_node_id_whatever_the_order():
    for peers in ([node("c", ready=1), node("b", ready=1)], [node("b", ready=1), node("c", ready=1)]):
        assert route("m", POLICY, [node("a"), *peers], local_id="a", memory_bytes=DEVICE) == RelayTo("b")
    for peers in ([node("c", free=2), node("b", free=2)], [node("b", free=2), node("c", free=2)]):
        assert route("m", POLICY, [node("z"), *peers], local_id="z", memory_bytes=DEVICE).fallback == RelayTo("b")


@pytest.mark.parametrize(("placed", "expected"), [
    ("b", RelayTo("b")),  # the leader's answer stands
    ("a", HERE),
    ("c", RelayTo("d")),  # a node this one takes for dead or avoids: the fallback
    ("gone", RelayTo("d")),
    (None, RelayTo("d")),  # no answer, or no node can take it now
])
def test_the_leaders_answer_is_followed_to_an_eligible_node_only(placed, expected):
    assert ask(RelayTo("d"), "a", "b", "d").then(placed, local_id="a") == expected


def test_has_room_counts_ready_and_starting_instances():
    assert has_room(ModelLoad(1, 1), 3, POLICY) and not has_room(ModelLoad(1, 1), 4, POLICY)
    assert not has_room(ModelLoad(), 0, POLICY)
