"""The cluster view as placement plans on it: checkpoint ids back to models, instance counts from the records."""

from __future__ import annotations

from sllmd.scheduler.estimate import Calibration
from sllmd.scheduler.placement import ModelLoad, plan_start
from sllmd.scheduler.status import DeviceStatus, InstanceStatus, NodeStatus, PeerInfo, QueueStatus
from sllmd.scheduler.view import node_states
from sllmd.state.models import Deployment, InstanceRecord, InstanceState
from sllmd.types import AutoscalingPolicy, Backend, EngineKind, Tier


def deployment(name: str, num_bytes: int = 10**9, backend: Backend = Backend.TRANSFORMERS) -> Deployment:
    return Deployment(name, f"/models/{name}", backend, AutoscalingPolicy(), 2048, num_bytes, 0.0)


GIB = 1 << 30
ONE_DEVICE = (DeviceStatus(0, "cuda:0", 80 * GIB, 80 * GIB),)
DEPLOYMENTS = {"a": deployment("a"), "b": deployment("b", 2 * 10**9, Backend.VLLM), "local": deployment("local")}
MODELS_OF = {"a-1": ["a"], "b-2": ["b"]}


def status(**fields) -> NodeStatus:
    return NodeStatus(**{"devices": ONE_DEVICE, "topology": (), "dram_cached": (), "ssd_cached": (), "queues": {},
                         "calibration": Calibration.defaults(), "pending_load_s": 0.0, "instances": (),
                         "free_dram_bytes": 0, "free_ssd_bytes": 0, "parked_models": (), "parked_host_bytes": 0,
                         **fields})


def peer(node_id: str, *, alive: bool = True, http: str | None = "127.0.0.1:1", **fields) -> PeerInfo:
    return PeerInfo(node_id, http, "127.0.0.1:2", "follower", alive, True, 0.1, status(**fields))


def states(*nodes: PeerInfo, records: tuple[InstanceRecord, ...] = (), local: str = "n1"):
    return node_states(list(nodes), DEPLOYMENTS, records, models_of=MODELS_OF, in_place=frozenset({"local"}),
                       local_node_id=local)


def record(instance_id: str, model: str, node_id: str, state: InstanceState) -> InstanceRecord:
    return InstanceRecord(instance_id, model, node_id, "cpu", state, 0.0)


def test_store_and_cache_ids_become_models_and_in_place_models_are_on_every_ssd():
    (state,) = states(peer("n1", dram_cached=("b-2", "unknown-3"), ssd_cached=("a-1",)))
    assert state.dram_models == {"b"}
    assert state.ssd_models == {"a", "local"}


def test_parked_engines_are_listed_for_deployed_models_only():
    (state,) = states(peer("n1", parked_models=("b", "gone")))
    assert state.parked_models == {"b"}


def test_only_ready_instances_of_deployed_models_are_listed_with_their_engine_kind_checkpoint_and_memory():
    (state,) = states(peer("n1", devices=(*ONE_DEVICE, DeviceStatus(1, "cuda:1", 80 * GIB, 70 * GIB)), instances=(
        InstanceStatus("b-x", "b", InstanceState.READY, 2, 300, (1,), 10 * GIB, True, 0.25),
        InstanceStatus("a-y", "a", InstanceState.STARTING, 0, 0, (0,), 0, False, 0.0),
        InstanceStatus("z", "gone", InstanceState.READY, 1, 10, (0,), 0, False, 0.0))))
    assert [(i.id, i.engine_kind, i.num_requests, i.num_tokens, i.num_bytes, i.devices, i.memory_bytes, i.is_kept,
             i.request_rate) for i in state.instances] == [
        ("b-x", EngineKind.VLLM, 2, 300, 2 * 10**9, (1,), 10 * GIB, True, 0.25)]
    assert state.free_memory == (80 * GIB, 70 * GIB)


def test_loads_count_the_live_instance_records_and_the_requests_the_status_reports():
    records = (record("i1", "a", "n1", InstanceState.READY), record("i2", "a", "n1", InstanceState.STARTING),
               record("i3", "a", "n1", InstanceState.STOPPING), record("i4", "a", "n2", InstanceState.READY))
    n1, n2 = states(peer("n1", queues={"a": QueueStatus(2, 3), "b": QueueStatus(1, 0)}), peer("n2"), records=records)
    # The records show them before the statuses do: their memory is not yet out of the statuses' free memory.
    assert n1.loads == {"a": ModelLoad(1, 1, 5, num_in_status=0), "b": ModelLoad(0, 0, 1, num_in_status=0)}
    assert n2.load("a") == ModelLoad(1, 0, 0, num_in_status=0) and n2.load("b") == ModelLoad()
    (n1,) = states(peer("n1", instances=(InstanceStatus("i1", "a", InstanceState.READY, 0, 0, (0,), GIB, False, 0.0),)),
                   records=records[:2])
    assert n1.load("a") == ModelLoad(1, 1, 0, num_in_status=1)


def test_a_node_not_heard_from_yet_has_no_devices_and_default_calibration():
    unheard = PeerInfo("n2", "127.0.0.1:1", "127.0.0.1:2", "unknown", True, True, None, None)
    _, n2 = states(peer("n1"), unheard, records=(record("i1", "a", "n2", InstanceState.READY),))
    assert (n2.is_alive, n2.free_memory, n2.calibration, n2.ssd_models) == (
        True, (), Calibration.defaults(), {"local"})
    assert n2.load("a").num_ready == 1


def test_the_local_node_is_alive_whatever_the_view_says_and_dead_or_unaddressed_peers_are_not():
    n1, n2, n3 = states(peer("n1", alive=False), peer("n2", alive=False, ssd_cached=("a-1",)),
                        peer("n3", http=None, devices=ONE_DEVICE * 4))
    assert n1.is_alive and not n2.is_alive and not n3.is_alive
    plan = plan_start("a", EngineKind.TRANSFORMERS, 10**9, GIB, [n1, n2, n3])
    assert plan is not None and plan.node_id == "n1" and plan.tier is Tier.REPOSITORY  # n2's copy is unreachable


def test_the_plan_prefers_the_node_with_the_checkpoint_in_dram():
    plan = plan_start("b", EngineKind.VLLM, 2 * 10**9, GIB, states(peer("n1", ssd_cached=("b-2",)),
                                                             peer("n2", dram_cached=("b-2",))))
    assert plan is not None and (plan.node_id, plan.tier) == ("n2", Tier.DRAM)
