"""The cluster view as the scheduler plans on it: checkpoint ids back to models, hostile fields neutralised."""

from __future__ import annotations

import pytest

from sllmd.engine.base import Backend
from sllmd.scheduler.autoscale import AutoscalingPolicy
from sllmd.scheduler.estimate import Calibration, EngineKind, Tier
from sllmd.scheduler.placement import plan_start
from sllmd.scheduler.view import node_states
from sllmd.state.models import Deployment


def deployment(name: str, num_bytes: int = 10**9, backend: Backend = Backend.TRANSFORMERS) -> Deployment:
    return Deployment(name, f"/models/{name}", backend, AutoscalingPolicy(), 2048, num_bytes, 0.0)


DEPLOYMENTS = {"a": deployment("a"), "b": deployment("b", 2 * 10**9, Backend.VLLM), "local": deployment("local")}
MODELS_OF = {"a-1": ["a"], "b-2": ["b"]}


def view(node_id: str, **fields) -> dict:
    return {"id": node_id, "alive": True, "free_slots": 1, "dram_cached": [], "ssd_cached": [], "instances": [],
            "calibration": Calibration.defaults().to_wire(), "pending_load_s": 0.0, **fields}


def states(*nodes: dict, local: str = "n1"):
    return node_states(list(nodes), DEPLOYMENTS, models_of=MODELS_OF, in_place=frozenset({"local"}),
                       local_node_id=local)


def test_store_and_cache_ids_become_models_and_in_place_models_are_on_every_ssd():
    (state,) = states(view("n1", dram_cached=["b-2", "unknown-3"], ssd_cached=["a-1"]))
    assert state.dram_models == {"b"}
    assert state.ssd_models == {"a", "local"}


def test_parked_engines_are_listed_for_known_models_only():
    (state,) = states(view("n1", parked_models=["b", "gone", 7, {"b": 1}]))
    assert state.parked_models == {"b"}


def test_only_ready_instances_of_known_models_are_listed_with_their_engine_kind_and_checkpoint_size():
    (state,) = states(view("n1", instances=[
        {"id": "b-x", "model": "b", "requests": 2, "tokens": 300, "state": "ready"},
        {"id": "a-y", "model": "a", "requests": 0, "state": "starting"},
        {"id": "z", "model": "gone", "requests": 1, "state": "ready"},
        {"id": "bad", "model": "a", "requests": "many", "state": "ready"},
        "not a dict"]))
    assert [(i.id, i.engine_kind, i.num_requests, i.num_tokens, i.num_bytes) for i in state.instances] == [
        ("b-x", EngineKind.VLLM, 2, 300, 2 * 10**9)]


def unknown_engine_kind() -> dict:
    wire = Calibration.defaults().to_wire()
    wire["init"]["tpu"] = wire["init"]["vllm"]
    return wire


def old_single_init_line() -> dict:
    wire = Calibration.defaults().to_wire()
    wire["init"] = wire["init"]["transformers"]
    return wire


@pytest.mark.parametrize("calibration", [{"load_gbps": {"ssd": -1}}, unknown_engine_kind(), old_single_init_line()])
def test_a_calibration_that_does_not_parse_reads_as_the_defaults(calibration):
    (state,) = states(view("n1", calibration=calibration))
    assert state.calibration == Calibration.defaults()


def test_the_local_node_is_alive_whatever_the_view_says_and_dead_peers_are_not_chosen():
    n1, n2 = states(view("n1", alive=False), view("n2", alive=False, ssd_cached=["a-1"]))
    assert n1.is_alive and not n2.is_alive
    plan = plan_start("a", EngineKind.TRANSFORMERS, 10**9, [n1, n2])
    assert plan is not None and plan.node_id == "n1" and plan.tier is Tier.REPOSITORY  # n2's copy is unreachable


def test_the_plan_prefers_the_node_with_the_checkpoint_in_dram():
    plan = plan_start("b", EngineKind.VLLM, 2 * 10**9, states(view("n1", ssd_cached=["b-2"]),
                                                             view("n2", dram_cached=["b-2"])))
    assert plan is not None and (plan.node_id, plan.tier) == ("n2", Tier.DRAM)
