"""Three real `sllmd` processes: join, replicate a deployment made through a follower, serve it on every
node, survive `kill -9` of the leader, and take the old leader back from its data dir."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports (held open together, so no two are the same)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class Member:
    """One sllmd process with a fixed id, ports and data dir (so it can be killed and restarted)."""

    def __init__(self, root: Path, node_id: str, port: int, peer_port: int, env: dict[str, str] | None = None
                 ) -> None:
        """`env`: SLLMD_* settings (or any variables) for this node's process, over the test's environment."""
        self.node_id = node_id
        self.env = env or {}
        self.data_dir = root / node_id
        self.log_path = root / f"{node_id}.log"
        self.port, self.peer_port = port, peer_port
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    @property
    def peer(self) -> str:
        return f"127.0.0.1:{self.peer_port}"

    def start(self, join: Member | None = None) -> None:
        command = [sys.executable, "-m", "sllmd", "--data-dir", str(self.data_dir), "--port", str(self.port),
                   "--peer-port", str(self.peer_port), "--node-id", self.node_id, "--log-format", "text"]
        if join is not None:
            command += ["--join", join.peer]
        with open(self.log_path, "a") as log:  # a file, not a pipe: a chatty node must never block on stderr
            self.process = subprocess.Popen(command, stdout=log, stderr=log, env=os.environ | self.env)

    def wait_ready(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process is not None and self.process.poll() is None, self.log()
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        raise AssertionError(f"{self.node_id} did not become ready:\n{self.log()}")

    def get(self, path: str) -> Any:
        response = httpx.get(f"{self.url}{path}", timeout=5)
        assert response.status_code == 200, response.text
        return response.json()

    def post(self, path: str, body: dict[str, Any], timeout_s: float = 30) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", json=body, timeout=timeout_s)

    def models(self) -> set[str]:
        return {m["id"] for m in self.get("/v1/models")["data"]}

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()  # SIGKILL: no shutdown path runs
        self.process.wait(timeout=10)

    def terminate(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def wait_stopped(self) -> None:
        if self.process is not None:
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""


def wait_until(predicate, timeout_s: float, what: str, members: list) -> Any:
    """Poll `predicate` until it returns something truthy, and return that; on timeout fail with the
    tail of every member's log. Errors while the cluster settles (refused connections, 503s read as
    missing keys, curl timeouts) count as "not yet"."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            result = predicate()
            if result:
                return result
        except (httpx.TransportError, AssertionError, KeyError, TypeError, ValueError, subprocess.TimeoutExpired):
            pass
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {m.node_id}\n{m.log()[-3000:]}" for m in members)
            raise AssertionError(f"{what} not reached within {timeout_s}s\n{logs}")
        time.sleep(0.1)


def agreed_leader(members: list[Member], num_nodes: int) -> str | None:
    """The leader every member names, if they all agree and each lists `num_nodes` alive voters."""
    views = [m.get("/admin/cluster") for m in members]
    leaders = {view["leader"] for view in views}
    if len(leaders) != 1 or None in leaders:
        return None
    for view in views:
        nodes = view["nodes"]
        if len(nodes) != num_nodes or not all(n["voter"] and n["alive"] and n["http"] for n in nodes):
            return None
    return leaders.pop()


def fetches_by_tier(member: Member) -> dict[str, float]:
    """The node's checkpoint fetches so far by where they came from (its /metrics)."""
    counts = {"peer": 0.0, "repository": 0.0}
    for line in httpx.get(f"{member.url}/metrics").text.splitlines():
        if line.startswith("sllmd_checkpoint_fetches_total{"):
            counts[line.split('"')[1]] = float(line.rsplit(" ", 1)[1])
    return counts


@contextlib.contextmanager
def running_cluster(root: Path, node_ids: list[str], *, env: dict[str, str] | None = None,
                    node_env: dict[str, dict[str, str]] | None = None) -> Iterator[list[Member]]:
    """Real daemons named `node_ids` (the first bootstraps, the others join it), ready and agreeing on a
    leader; stopped on exit. `env` applies to every one of them, `node_env[id]` (over it) to one."""
    ports = free_ports(2 * len(node_ids))
    node_env = node_env or {}
    members = [Member(root, node_id, ports[2 * i], ports[2 * i + 1], (env or {}) | node_env.get(node_id, {}))
               for i, node_id in enumerate(node_ids)]
    try:
        members[0].start()
        for member in members[1:]:
            member.start(join=members[0])
        for member in members:
            member.wait_ready()
        wait_until(lambda: agreed_leader(members, len(members)), 20, "the members agreeing on a leader", members)
        yield members
    finally:
        for member in members:
            member.terminate()
        for member in members:
            member.wait_stopped()


def test_three_processes_deploy_through_a_follower_fail_over_and_rejoin(demo_model_dir, tmp_path):
    ports = free_ports(6)
    members = [Member(tmp_path, f"n{i + 1}", ports[2 * i], ports[2 * i + 1]) for i in range(3)]
    by_id = {m.node_id: m for m in members}
    n1, n2, n3 = members
    try:
        n1.start()
        n2.start(join=n1)
        n3.start(join=n1)
        for member in members:
            member.wait_ready()
        wait_until(lambda: agreed_leader(members, 3), 20, "three members agreeing on a leader", members)
        leader = by_id[agreed_leader(members, 3)]
        followers = [m for m in members if m is not leader]
        view = followers[0].get("/admin/cluster")
        assert {n["id"]: n["peer"] for n in view["nodes"]} == {m.node_id: m.peer for m in members}
        assert [n["role"] for n in view["nodes"] if n["id"] == leader.node_id] == ["leader"]

        # A deployment made through a follower appears on every node, and every node serves it locally.
        body = {"name": "tiny", "checkpoint": str(demo_model_dir), "backend": "dummy"}
        reply = followers[0].post("/admin/models", body)
        assert reply.status_code == 201, reply.text
        assert "tiny" in followers[0].models()  # read-your-writes on the node written through
        wait_until(lambda: all("tiny" in m.models() for m in members), 5, "tiny on every node", members)
        for member in members:
            reply = member.post("/v1/completions", {"model": "tiny", "prompt": "Hello", "max_tokens": 4})
            assert reply.status_code == 200, reply.text
            assert reply.json()["usage"]["completion_tokens"] == 4
        reply = followers[1].post("/admin/models", {"name": "demo", "checkpoint": str(demo_model_dir)})
        assert reply.status_code == 201, reply.text
        wait_until(lambda: "demo" in followers[0].models(), 5, "demo on the other follower", members)
        reply = followers[0].post("/v1/completions", {"model": "demo", "prompt": "Hello", "max_tokens": 4,
                                                       "temperature": 0})
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 4, reply.text

        # kill -9 the leader: a survivor takes an admin write within 3 s (503 while there is no leader).
        leader.kill()
        began = time.monotonic()
        after = {"name": "after-failover", "checkpoint": str(demo_model_dir), "backend": "dummy"}
        statuses = []
        while time.monotonic() - began < 10:
            reply = followers[0].post("/admin/models", after, timeout_s=10)
            statuses.append(reply.status_code)
            if reply.status_code != 503:
                break
        failover_s = time.monotonic() - began
        print(f"failover: kill -9 of leader {leader.node_id} -> admin write committed in {failover_s:.2f}s "
              f"(statuses {statuses})")
        assert statuses[-1] == 201, reply.text
        assert failover_s < 3.0
        survivors = followers

        def seen_by(observer: Member, node_id: str) -> dict[str, Any]:
            return next(n for n in observer.get("/admin/cluster")["nodes"] if n["id"] == node_id)

        wait_until(lambda: len({m.get("/admin/cluster")["leader"] for m in survivors}) == 1, 5,
                   "survivors agreeing on a new leader", members)
        new_leader = survivors[0].get("/admin/cluster")["leader"]
        assert new_leader in {m.node_id for m in survivors}
        wait_until(lambda: not seen_by(survivors[0], leader.node_id)["alive"], 5, "the dead leader reported dead",
                   members)
        assert seen_by(survivors[0], leader.node_id)["voter"]  # still a member: it may come back

        # The old leader restarts on its data dir, without --join, and catches up.
        leader.start()
        leader.wait_ready()
        wait_until(lambda: "after-failover" in leader.models(), 10, "the old leader catching up", members)
        wait_until(lambda: agreed_leader(members, 3) == new_leader, 10, "all three agreeing again", members)
        reply = leader.post("/v1/completions", {"model": "after-failover", "prompt": "Hi", "max_tokens": 2})
        assert reply.status_code == 200, reply.text
    finally:
        for member in members:
            member.terminate()
        for member in members:
            member.wait_stopped()
