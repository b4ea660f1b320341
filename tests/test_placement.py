"""Request placement: each rule of `choose_node` in order, and deterministic ties."""

from __future__ import annotations

from sllmd.scheduler.placement import NodeView, choose_node


def node(node_id: str, *, alive: bool = True, free: int = 0, ready: int = 0, starting: int = 0, load: int = 0,
         evictable: int = 0) -> NodeView:
    return NodeView(node_id, is_alive=alive, num_free_slots=free, ready_instances_of_model=ready,
                    starting_instances_of_model=starting, in_flight_hint=load, num_evictable=evictable)


def choose(*nodes: NodeView, local: str = "a") -> str | None:
    return choose_node("m", local_node_id=local, nodes=list(nodes))


def test_local_ready_instance_wins_even_when_busier():
    assert choose(node("a", ready=1, load=9), node("b", ready=1), node("c", free=4)) == "a"


def test_remote_ready_instance_with_least_load_per_instance():
    assert choose(node("a", free=2), node("b", ready=1, load=3), node("c", ready=2, load=4)) == "c"
    assert choose(node("a", free=2), node("b", ready=1, load=1), node("c", ready=2, load=4)) == "b"


def test_ready_instances_on_dead_nodes_are_ignored():
    assert choose(node("a", free=1), node("b", alive=False, ready=1)) == "a"


def test_a_node_already_starting_one_beats_starting_another():
    assert choose(node("a", free=2), node("b", starting=1)) == "b"
    assert choose(node("a", free=2), node("b", alive=False, starting=1)) == "a"


def test_local_starting_instance_is_preferred_among_starting():
    assert choose(node("a", starting=1), node("b", starting=1), local="b") == "b"


def test_ready_beats_starting():
    assert choose(node("a", starting=1), node("b", ready=1, load=50)) == "b"


def test_local_node_with_a_free_slot_or_an_evictable_instance():
    assert choose(node("a", free=1), node("b", free=8)) == "a"
    assert choose(node("a", evictable=1), node("b", free=8)) == "a"


def test_otherwise_the_alive_node_with_most_free_slots():
    assert choose(node("a"), node("b", free=1), node("c", free=3), node("d", alive=False, free=9)) == "c"


def test_nothing_free_anywhere_is_none():
    assert choose(node("a"), node("b"), node("c", alive=False, free=2)) is None
    assert choose(local="a") is None


def test_the_local_node_counts_as_alive_whatever_its_view_says():
    assert choose(node("a", alive=False, ready=1), node("b", ready=1)) == "a"


def test_ties_break_by_node_id_whatever_the_order():
    for nodes in ([node("c", ready=1), node("b", ready=1)], [node("b", ready=1), node("c", ready=1)]):
        assert choose(node("a"), *nodes) == "b"
    assert choose(node("z"), node("c", starting=1), node("b", starting=1), local="z") == "b"
    assert choose(node("z"), node("c", free=2), node("b", free=2), local="z") == "b"
