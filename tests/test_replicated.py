"""The replicated state machine in one process: several ClusterNodes on loopback ports, real ZeroMQ and
LMDB, fast Raft timing. Partitions use the transport's block() hook on both sides."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from sllmd.cluster.curve import cluster_curve_keys, generate_curve_keypair
from sllmd.cluster.replicated import ReplicatedStateMachine
from sllmd.config import ClusterConfig, ConfigError, load_config
from sllmd.errors import Conflict, ModelNotFound, Overloaded
from sllmd.raft.core import Role
from sllmd.state.machine import NodeRecord, Op
from sllmd.state.models import Deployment, InstanceRecord, InstanceState
from sllmd.state.store import StateStore
from sllmd.types import AutoscalingPolicy, Backend
from tests.nodes import free_port, running_node

FAST = ClusterConfig(tick_s=0.01, heartbeat_interval_s=0.03, election_timeout_min_s=0.15,
                     election_timeout_max_s=0.3, propose_timeout_s=1.5)


def deploy(name: str) -> dict[str, Any]:
    deployment = Deployment(name, "/models/m", Backend.DUMMY, AutoscalingPolicy(), 1024, 0, 1.0)
    return {"op": Op.DEPLOY, "deployment": deployment.to_wire()}


async def wait_until(predicate, timeout_s: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not reached within {timeout_s}s"
        await asyncio.sleep(0.01)


class Cluster:
    def __init__(self, root: Path, settings: ClusterConfig = FAST) -> None:
        self.root = root
        self.settings = settings
        self.ports: dict[str, int] = {}
        self.nodes: dict[str, ReplicatedStateMachine] = {}
        self.applied: dict[str, list[dict[str, Any] | None]] = {}

    def peer(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    async def start(self, name: str, *, seed: str | None = None, settings: ClusterConfig | None = None
                    ) -> ReplicatedStateMachine:
        port = self.ports.setdefault(name, free_port())
        me = NodeRecord(name, f"127.0.0.1:{port}", f"127.0.0.1:{port + 1}")
        node = ReplicatedStateMachine.create(StateStore(self.root / name), me, bind_host="127.0.0.1", peer_port=port,
                                             seed=seed and self.peer(seed), cluster_config=settings or self.settings)
        self.applied[name] = []
        node.on_applied = lambda command, result: self.applied[name].append(command)
        await node.start()
        self.nodes[name] = node
        return node

    async def stop(self, name: str) -> None:
        node = self.nodes.pop(name)
        await node.close()
        node.store.close()

    async def close(self) -> None:
        for name in list(self.nodes):
            await self.stop(name)

    async def three(self) -> None:
        await self.start("n1")
        await self.start("n2", seed="n1")
        await self.start("n3", seed="n1")
        await self.wait_stable(voters=("n1", "n2", "n3"))

    async def wait_stable(self, voters: tuple[str, ...] | None = None, timeout_s: float = 5.0
                          ) -> ReplicatedStateMachine:
        """Every running node follows the same running leader (and has exactly `voters`)."""
        def is_stable() -> bool:
            leaders = {node.leader_id for node in self.nodes.values()}
            if len(leaders) != 1 or next(iter(leaders)) not in self.nodes:
                return False
            return voters is None or all(node.cluster.voters == voters for node in self.nodes.values())
        await wait_until(is_stable, timeout_s, "a stable leader")
        return self.nodes[next(iter(self.nodes.values())).leader_id]

    def followers(self) -> list[ReplicatedStateMachine]:
        return [node for node in self.nodes.values() if not node.is_leader]

    def partition(self, minority: set[str]) -> None:
        for name, node in self.nodes.items():
            for other in self.nodes:
                if (name in minority) != (other in minority):
                    node.cluster.transport.block(other)

    def heal(self) -> None:
        for node in self.nodes.values():
            node.cluster.transport.unblock_all()


@pytest.fixture
async def cluster(tmp_path):
    running = Cluster(tmp_path)
    yield running
    await running.close()


async def test_three_nodes_elect_a_leader_and_a_follower_write_applies_everywhere(cluster):
    await cluster.three()
    leader = await cluster.wait_stable()
    follower = cluster.followers()[0]

    result = await follower.propose(deploy("m1"))  # forwarded to the leader
    assert result.name == "m1"
    assert follower.deployment("m1") is not None  # read-your-writes on the node written through
    await wait_until(lambda: all(n.deployment("m1") for n in cluster.nodes.values()), what="m1 everywhere")
    def num_deploys(name: str) -> int:
        return sum(1 for c in cluster.applied[name] if c and c["op"] == Op.DEPLOY)
    await wait_until(lambda: all(num_deploys(name) >= 1 for name in cluster.nodes), what="on_applied everywhere")
    await asyncio.sleep(0.1)
    assert all(num_deploys(name) == 1 for name in cluster.nodes)  # applied once on each node

    with pytest.raises(Conflict) as conflict:  # a domain error crosses the wire as the same class
        await follower.propose(deploy("m1"))
    assert conflict.value.code == "model_exists"
    with pytest.raises(ModelNotFound):
        await follower.propose({"op": Op.UNDEPLOY, "name": "absent"})

    # The node table holds every member's addresses; views agree on the leader.
    assert {n: r.peer for n, r in leader.nodes().items()} == {n: cluster.peer(n) for n in ("n1", "n2", "n3")}
    await wait_until(lambda: all(all(m.is_alive for m in n.cluster_view().nodes) for n in cluster.nodes.values()))
    for node in cluster.nodes.values():
        view = node.cluster_view()
        assert view.leader_id == leader.node_id and len(view.nodes) == 3
        assert {m.id for m in view.nodes if m.role == "leader"} == {leader.node_id}


async def test_instance_records_are_best_effort_and_never_block_without_a_leader(cluster):
    await cluster.three()
    follower = cluster.followers()[0]
    record = InstanceRecord("i1", "m", follower.node_id, "cpu", InstanceState.READY, 1.0)
    await follower.propose({"op": Op.PUT_INSTANCE, "instance": record.to_wire()})
    await wait_until(lambda: all(n.instances() == [record] for n in cluster.nodes.values()))

    cluster.partition({follower.node_id})
    await wait_until(lambda: follower.leader_id is None, what="the isolated follower to lose its leader")
    began = time.monotonic()
    assert await follower.propose({"op": Op.DELETE_INSTANCE, "id": "i1"}) is None  # queued, not awaited
    assert time.monotonic() - began < 0.1
    cluster.heal()  # the queued delete commits once a leader is back
    await wait_until(lambda: all(n.instances() == [] for n in cluster.nodes.values()), what="the queued delete")


async def propose_retrying(node, command: dict, *, within_s: float) -> object:
    """Propose as a client would: retry a 503 (no leader yet, or the leader vanished mid-write, so the
    write did not happen there) until `within_s` has passed."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            return await node.propose(command)
        except Overloaded:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def test_a_new_leader_accepts_writes_within_3s_of_the_leader_stopping(cluster):
    await cluster.three()
    leader = await cluster.wait_stable()
    began = time.monotonic()
    await cluster.stop(leader.node_id)
    survivor = next(iter(cluster.nodes.values()))
    await propose_retrying(survivor, deploy("after"), within_s=3.0)
    assert time.monotonic() - began < 3.0
    new_leader = await cluster.wait_stable()
    assert new_leader.node_id != leader.node_id and new_leader.term > leader.term


async def test_a_minority_cannot_commit_the_majority_can_and_the_minority_catches_up_after_healing(cluster):
    await cluster.three()
    old = await cluster.wait_stable()
    cluster.partition({old.node_id})  # the leader alone on the minority side

    stranded = asyncio.create_task(old.propose(deploy("lost")))
    majority = [n for n in cluster.nodes.values() if n is not old]
    await propose_retrying(majority[0], deploy("kept"), within_s=10.0)  # the majority elects a leader, commits
    with pytest.raises(Overloaded) as timed_out:
        await stranded
    assert timed_out.value.status == 503
    assert old.role is not Role.LEADER  # check-quorum: it stepped down
    with pytest.raises(Overloaded):  # and a follower cut off from the majority cannot write either
        await old.propose(deploy("lost-too"))

    cluster.heal()
    await wait_until(lambda: old.deployment("kept") is not None, what="the old leader catching up")
    await cluster.wait_stable()
    await asyncio.sleep(0.2)
    assert all(n.deployment("lost") is None and n.deployment("lost-too") is None for n in cluster.nodes.values())


async def test_a_late_joiner_installs_a_snapshot(tmp_path):
    cluster = Cluster(tmp_path, ClusterConfig(**{**FAST.__dict__, "compact_every_entries": 5}))
    try:
        first = await cluster.start("n1")
        for i in range(12):
            await first.propose(deploy(f"m{i}"))
        assert first.cluster.raft.snapshot.index > 1  # the log no longer starts at 1: a joiner needs the copy
        joiner = await cluster.start("n2", seed="n1")
        await wait_until(lambda: len(joiner.deployments()) == 12, what="the joiner catching up")
        assert None in cluster.applied["n2"]  # caught up by InstallSnapshot, not by replaying entries
        assert joiner.deployments() == first.deployments()
        await cluster.wait_stable(voters=("n1", "n2"))
        await joiner.propose(deploy("after-join"))
        await wait_until(lambda: first.deployment("after-join") is not None)
    finally:
        await cluster.close()


async def test_a_restarted_node_catches_up_from_its_own_lmdb_state_without_reapplying(cluster):
    await cluster.three()
    await cluster.nodes["n1"].propose(deploy("before"))
    await wait_until(lambda: cluster.nodes["n3"].deployment("before") is not None)
    await cluster.stop("n3")
    survivor = cluster.nodes["n1"]
    await survivor.propose(deploy("while-down"))

    restarted = await cluster.start("n3")  # no seed: its peers come from the node table on disk

    def deploys() -> list[str]:
        return [c["deployment"]["name"] for c in cluster.applied["n3"] if c and c["op"] == Op.DEPLOY]

    # Its on_applied callbacks, not just the state: entries are applied in a thread and the callbacks
    # follow on the event loop, so the state can show the deployment a moment before they run.
    await wait_until(lambda: restarted.deployment("while-down") is not None and deploys(),
                     what="the restarted node catching up")
    assert deploys() == ["while-down"]  # "before" was applied before the restart and is not applied again
    await cluster.wait_stable(voters=("n1", "n2", "n3"))
    await restarted.propose(deploy("after-restart"))
    await wait_until(lambda: all(n.deployment("after-restart") for n in cluster.nodes.values()))


async def test_removing_a_member_through_a_follower_shrinks_the_cluster_for_good(cluster):
    await cluster.three()
    leader = await cluster.wait_stable()
    follower = cluster.followers()[0]
    removed = next(n for n in cluster.nodes.values() if n is not leader and n is not follower)
    await follower.propose({"op": Op.REMOVE_NODE, "node_id": removed.node_id})
    kept = tuple(sorted(n for n in cluster.nodes if n != removed.node_id))
    await wait_until(lambda: leader.cluster.voters == kept and follower.cluster.voters == kept)
    assert set(follower.nodes()) == set(kept)
    await asyncio.sleep(0.5)  # a removed node does not ask its way back in
    assert leader.cluster.voters == kept
    await follower.propose(deploy("two-nodes"))  # a majority of the two remaining members commits
    await wait_until(lambda: leader.deployment("two-nodes") is not None)


def keyed(public: bytes, secret: bytes, settings: ClusterConfig = FAST) -> ClusterConfig:
    return dataclasses.replace(settings, secret_key=secret.decode(), public_key=public.decode(),
                               public_keys=(public.decode(),))


async def test_a_node_without_the_cluster_keys_cannot_join_a_keyed_cluster(cluster):
    public, secret = generate_curve_keypair()
    settings = keyed(public, secret)
    first = await cluster.start("n1", settings=settings)
    member = await cluster.start("n2", seed="n1", settings=settings)  # the keyed one joins
    await cluster.wait_stable(voters=("n1", "n2"))
    other_public, other_secret = generate_curve_keypair()
    outsider = await cluster.start("n3", seed="n1")  # no keys at all
    stranger = await cluster.start("n4", seed="n1", settings=keyed(other_public, other_secret))  # other keys
    await asyncio.sleep(1.5)  # JOINs every 0.2 s: plenty of attempts
    for node in (first, member):
        assert node.cluster.voters == ("n1", "n2") and set(node.nodes()) == {"n1", "n2"}
    assert outsider.cluster.voters == () and stranger.cluster.voters == ()
    assert first.cluster.transport.stats.rejected_handshakes > 0
    await member.propose(deploy("keyed"))  # the keyed members still commit
    await wait_until(lambda: first.deployment("keyed") is not None)


def curve_keys(cluster: ClusterConfig):
    """What the node builds from [cluster]: load_config checks the settings, cluster_curve_keys the keys."""
    return cluster_curve_keys(cluster.secret_key, cluster.public_key, cluster.public_keys)


@pytest.mark.parametrize(("changes", "fragment"), [
    ({"secret_key": "x" * 40}, "cluster.secret_key and cluster.public_key must both be set"),
    ({"secret_key": "x" * 40, "public_key": "y" * 40}, "public_key does not belong to secret_key"),
    ({"secret_key": "short", "public_key": "short"}, "40 z85 characters"),
])
def test_bad_cluster_keys_are_a_one_line_config_error(changes, fragment):
    env = {f"SLLMD_CLUSTER_{key.upper()}": value for key, value in changes.items()}
    with pytest.raises(ConfigError) as raised:
        curve_keys(load_config(None, env=env).cluster)
    assert fragment in str(raised.value) and "\n" not in str(raised.value)
    public, secret = generate_curve_keypair()
    with pytest.raises(ConfigError, match=r"must include cluster\.public_key"):
        load_config(None, env={"SLLMD_CLUSTER_SECRET_KEY": secret.decode(), "SLLMD_CLUSTER_PUBLIC_KEY": public.decode(),
                               "SLLMD_CLUSTER_PUBLIC_KEYS": generate_curve_keypair()[0].decode()})


def test_cluster_keys_command_prints_a_loadable_pair(tmp_path):
    done = subprocess.run([sys.executable, "-m", "sllmd", "cluster-keys"], capture_output=True, text=True, check=True)
    path = tmp_path / "keys.toml"
    path.write_text(done.stdout)
    config = load_config(path, env={})
    assert curve_keys(config.cluster) is not None
    assert config.cluster.public_keys == (config.cluster.public_key,)


async def test_the_leader_deletes_the_instance_records_of_a_silent_node(tmp_path):
    cluster = Cluster(tmp_path, dataclasses.replace(FAST, dead_node_timeout_s=0.5))
    try:
        await cluster.three()
        leader = await cluster.wait_stable()
        dying, living = cluster.followers()
        for i, node in enumerate((dying, living)):
            record = InstanceRecord(f"i{i}", "m", node.node_id, "cpu", InstanceState.READY, 1.0)
            await node.propose({"op": Op.PUT_INSTANCE, "instance": record.to_wire()})
        await wait_until(lambda: len(leader.instances()) == 2)
        await cluster.stop(dying.node_id)
        began = time.monotonic()
        await wait_until(lambda: [i.id for i in leader.instances()] == ["i1"], 5, "the dead node's records deleted")
        await wait_until(lambda: [i.id for i in living.instances()] == ["i1"], 2)
        assert time.monotonic() - began < 0.5 + 2.0
        assert set(leader.nodes()) == {"n1", "n2", "n3"}  # still a member: it may come back
    finally:
        await cluster.close()


async def test_delete_admin_cluster_node_removes_the_member_and_its_instances(tmp_path):
    fast = {f"cluster__{key}": value for key, value in dataclasses.asdict(FAST).items()
            if key in ("tick_s", "heartbeat_interval_s", "election_timeout_min_s", "election_timeout_max_s")}
    async with running_node(tmp_path / "a", server__node_id="a", **fast) as a:
        peer = f"127.0.0.1:{a.node.config.server.peer_port}"
        async with running_node(tmp_path / "b", server__node_id="b", server__join=peer, **fast) as b:
            await wait_until(lambda: a.node.state.cluster.voters == ("a", "b") and "b" in a.node.state.nodes(),
                             10, "b joining")
            record = InstanceRecord("ib", "m", "b", "cpu", InstanceState.READY, 1.0)
            await b.node.state.propose({"op": Op.PUT_INSTANCE, "instance": record.to_wire()})
            await wait_until(lambda: a.node.state.instances() == [record])
            async with a.http.delete(f"{a.url}/admin/cluster/nodes/absent") as response:
                assert response.status == 404, await response.text()
                assert (await response.json())["error"]["code"] == "node_not_found"
            async with a.http.delete(f"{a.url}/admin/cluster/nodes/b") as response:
                assert response.status == 200, await response.text()
                assert await response.json() == {"removed": "b", "instances_deleted": 1}
            assert a.node.state.cluster.voters == ("a",) and set(a.node.state.nodes()) == {"a"}
            assert a.node.state.instances() == []
            async with a.http.get(f"{a.url}/admin/cluster") as response:
                assert {n["id"] for n in (await response.json())["nodes"]} == {"a"}
