"""LMDB state: commands apply atomically, survive reopening, and a failed command changes nothing."""

import subprocess
import sys

import pytest

from sllmd.errors import Conflict, ModelNotFound
from sllmd.state.machine import LocalStateMachine, Op
from sllmd.state.models import Deployment, InstanceRecord, InstanceState
from sllmd.state.store import StateStore
from sllmd.types import AutoscalingPolicy, Backend


def deployment(name: str = "m") -> Deployment:
    return Deployment(name, "/models/m", Backend.DUMMY, AutoscalingPolicy(), 1024, 0, 1.0)


def instance(instance_id: str, model: str = "m", node_id: str = "n1") -> InstanceRecord:
    return InstanceRecord(instance_id, model, node_id, "cpu", InstanceState.READY, 2.0)


async def test_deployments_and_instances_survive_reopening(tmp_path):
    store = StateStore(tmp_path)
    state = LocalStateMachine(store)
    await state.propose({"op": Op.DEPLOY, "deployment": deployment().to_wire()})
    await state.propose({"op": Op.PUT_INSTANCE, "instance": instance("i1").to_wire()})
    store.close()

    reopened = LocalStateMachine(StateStore(tmp_path))
    assert reopened.deployments() == {"m": deployment()}
    assert reopened.instances() == [instance("i1")]


async def test_a_rejected_command_changes_nothing(tmp_path):
    state = LocalStateMachine(StateStore(tmp_path))
    await state.propose({"op": Op.DEPLOY, "deployment": deployment().to_wire()})
    changed = deployment().with_autoscaling(AutoscalingPolicy(max_instances=3))
    with pytest.raises(Conflict):
        await state.propose({"op": Op.DEPLOY, "deployment": changed.to_wire()})
    assert state.deployment("m") == deployment()
    with pytest.raises(ModelNotFound):
        await state.propose({"op": Op.UNDEPLOY, "name": "absent"})


async def test_undeploy_drops_the_models_instances_and_node_cleanup_only_its_own(tmp_path):
    state = LocalStateMachine(StateStore(tmp_path))
    for name in ("a", "b"):
        await state.propose({"op": Op.DEPLOY, "deployment": deployment(name).to_wire()})
    for record in (instance("a1", "a"), instance("b1", "b"), instance("b2", "b", node_id="n2")):
        await state.propose({"op": Op.PUT_INSTANCE, "instance": record.to_wire()})
    await state.propose({"op": Op.UNDEPLOY, "name": "a"})
    assert {i.id for i in state.instances()} == {"b1", "b2"}
    assert await state.propose({"op": Op.DELETE_NODE_INSTANCES, "node_id": "n1"}) == 1
    assert [i.id for i in state.instances()] == ["b2"]


async def test_update_bumps_the_revision(tmp_path):
    state = LocalStateMachine(StateStore(tmp_path))
    await state.propose({"op": Op.DEPLOY, "deployment": deployment().to_wire()})
    updated = deployment().with_autoscaling(AutoscalingPolicy(max_instances=2))
    await state.propose({"op": Op.UPDATE_DEPLOYMENT, "deployment": updated.to_wire()})
    assert state.deployment("m").revision == 2
    assert state.deployment("m").autoscaling.max_instances == 2


KILL_MID_WRITE = """
import os, sys
from sllmd.state.store import StateStore
store = StateStore(__import__("pathlib").Path(sys.argv[1]))
with store.write() as txn:
    for i in range(1000):
        txn.put("deployments", f"partial-{i}", {"i": i})
    os._exit(9)  # die inside the transaction, before commit
"""


def test_a_process_killed_mid_write_leaves_the_old_state(tmp_path):
    store = StateStore(tmp_path)
    with store.write() as txn:
        txn.put("deployments", "kept", {"v": 1})
    store.close()
    result = subprocess.run([sys.executable, "-c", KILL_MID_WRITE, str(tmp_path)], check=False)
    assert result.returncode == 9
    with StateStore(tmp_path).read() as txn:
        assert dict(txn.items("deployments")) == {"kept": {"v": 1}}


async def test_reads_see_every_commit_whoever_made_it(tmp_path):
    """Reads reuse decoded tables while the store is unchanged: a commit by another object, from another
    thread (a Raft apply), or a snapshot restore must show in the very next read, and a caller changing what
    it got must not change what the next one gets."""
    import threading

    from sllmd.state.machine import StoreStateMachine

    store = StateStore(tmp_path)
    reads, applier = LocalStateMachine(store), StoreStateMachine(store)
    await reads.propose({"op": Op.DEPLOY, "deployment": deployment("a").to_wire()})
    assert set(reads.deployments()) == {"a"}
    assert reads.instances() == []

    thread = threading.Thread(target=applier.apply, args=([
        {"op": Op.DEPLOY, "deployment": deployment("b").to_wire()},
        {"op": Op.PUT_INSTANCE, "instance": instance("b1", "b").to_wire()}], 7))
    thread.start()
    thread.join()
    assert set(reads.deployments()) == {"a", "b"}
    assert reads.deployment("b") == deployment("b")
    assert reads.instances() == [instance("b1", "b")]

    reads.deployments().pop("a")
    reads.instances().clear()
    assert set(reads.deployments()) == {"a", "b"} and len(reads.instances()) == 1

    applier.restore(b"", 8)
    assert reads.deployments() == {} and reads.deployment("a") is None and reads.instances() == []
