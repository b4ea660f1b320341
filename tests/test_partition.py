"""A real network partition: three `sllmd` processes, each in its own network namespace, joined by a
bridge in a fourth. Cutting the leader's link isolates it; the majority elects a new leader and commits,
the isolated leader cannot; once the link is back the old leader steps down and catches up.

Needs root and `ip netns` (CI runs as root); skipped otherwise. Everything lives in namespaces named
after this test process's pid and in a private /24 that exists only inside them: no traffic leaves
them, and the root namespace is not touched (HTTP requests run inside the namespaces with curl).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.test_cluster import wait_until

HTTP_PORT, PEER_PORT = 8343, 8344
PREFIX = f"sllmdpt{os.getpid()}"
SUBNET = f"10.231.{os.getpid() % 250}"  # a /24 configured only inside this test's namespaces
HUB = f"{PREFIX}hub"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=20)


def _netns_problem() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None or shutil.which("curl") is None:
        return "needs iproute2 (`ip netns`) and curl"
    probe = f"{PREFIX}probe"
    try:
        _ip("netns", "add", probe)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        return f"`ip netns add` is not available here: {getattr(exc, 'stderr', '') or exc}".strip()
    _ip("netns", "del", probe, check=False)
    return None


def _cleanup_namespaces() -> None:
    """Delete every namespace (and so every veth inside it) and root-side link with this test's prefix,
    including leftovers of an earlier crashed run with the same pid."""
    listed = _ip("netns", "list", check=False).stdout.split("\n")
    for name in (line.split()[0] for line in listed if line.strip()):
        if name.startswith(PREFIX):
            _ip("netns", "del", name, check=False)
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
        if name.startswith(f"sp{os.getpid()}x"):
            _ip("link", "del", name, check=False)


class NsMember:
    """One sllmd process in its own namespace, reached over the bridge at SUBNET.i."""

    def __init__(self, root: Path, index: int) -> None:
        self.node_id = f"n{index}"
        self.ns = f"{PREFIX}n{index}"
        self.veth = f"sp{os.getpid()}x{index}"  # inside the member's namespace; <= 15 characters
        self.address = f"{SUBNET}.{index}"
        self.data_dir = root / self.node_id
        self.log_path = root / f"{self.node_id}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def peer(self) -> str:
        return f"{self.address}:{PEER_PORT}"

    def create(self) -> None:
        hub_side = f"{self.veth}h"
        _ip("netns", "add", self.ns)
        _ip("link", "add", self.veth, "type", "veth", "peer", "name", hub_side)
        _ip("link", "set", self.veth, "netns", self.ns)
        _ip("link", "set", hub_side, "netns", HUB)
        _ip("-n", HUB, "link", "set", hub_side, "master", "br0", "up")
        _ip("-n", self.ns, "addr", "add", f"{self.address}/24", "dev", self.veth)
        _ip("-n", self.ns, "link", "set", self.veth, "up")
        _ip("-n", self.ns, "link", "set", "lo", "up")

    def start(self, join: NsMember | None = None) -> None:
        command = ["ip", "netns", "exec", self.ns, sys.executable, "-m", "sllmd", "--host", self.address,
                   "--port", str(HTTP_PORT), "--peer-port", str(PEER_PORT), "--data-dir", str(self.data_dir),
                   "--node-id", self.node_id, "--log-format", "text"]
        if join is not None:
            command += ["--join", join.peer]
        env = {**os.environ, "SLLMD_DEVICES_KIND": "cpu"}
        with open(self.log_path, "a") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=log, env=env)

    def link(self, state: str) -> None:
        _ip("-n", self.ns, "link", "set", self.veth, state)

    def request(self, method: str, path: str, body: dict[str, Any] | None = None,
                timeout_s: float = 5) -> tuple[int, Any]:
        """HTTP to this member from inside its own namespace (works while its link is down)."""
        command = ["ip", "netns", "exec", self.ns, "curl", "-s", "-m", str(timeout_s), "-X", method,
                   "-w", "\n%{http_code}", f"http://{self.address}:{HTTP_PORT}{path}"]
        if body is not None:
            command += ["-H", "content-type: application/json", "--data-binary", json.dumps(body)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s + 10)
        text, _, status = done.stdout.rpartition("\n")
        try:
            payload = json.loads(text) if text else None
        except ValueError:
            payload = text
        return int(status or 0), payload

    def get(self, path: str) -> Any:
        status, payload = self.request("GET", path)
        assert status == 200, (status, payload)
        return payload

    def models(self) -> set[str]:
        return {m["id"] for m in self.get("/v1/models")["data"]}

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)

    def log(self) -> str:
        return self.log_path.read_text()[-3000:] if self.log_path.exists() else ""


def leader_seen_by(members: list[NsMember], num_voters: int) -> str | None:
    views = [m.get("/admin/cluster") for m in members]
    leaders = {view["leader"] for view in views}
    if len(leaders) != 1 or None in leaders:
        return None
    if any(sum(n["voter"] for n in view["nodes"]) != num_voters for view in views):
        return None
    return leaders.pop()


def test_an_isolated_leader_cannot_commit_and_catches_up_after_the_partition_heals(demo_model_dir, tmp_path):
    problem = _netns_problem()
    if problem:
        pytest.skip(problem)
    members = [NsMember(tmp_path, i) for i in (1, 2, 3)]
    by_id = {m.node_id: m for m in members}
    _cleanup_namespaces()
    try:
        _ip("netns", "add", HUB)
        _ip("-n", HUB, "link", "add", "br0", "type", "bridge")
        _ip("-n", HUB, "link", "set", "br0", "up")
        _ip("-n", HUB, "link", "set", "lo", "up")
        for member in members:
            member.create()
        n1, n2, n3 = members
        n1.start()
        n2.start(join=n1)
        n3.start(join=n1)
        for member in members:
            wait_until(lambda m=member: m.request("GET", "/health", timeout_s=1)[0] == 200, 60,
                       f"{member.node_id} ready", members)
        old = by_id[wait_until(lambda: leader_seen_by(members, 3), 20, "three members agreeing on a leader",
                               members)]
        majority = [m for m in members if m is not old]
        body = {"name": "before", "checkpoint": str(demo_model_dir), "backend": "dummy"}
        status, reply = majority[0].request("POST", "/admin/models", body, timeout_s=15)
        assert status == 201, reply

        # Cut the leader's link (its side of the veth pair): it is alone, the other two are a majority.
        old.link("down")
        cut_at = time.monotonic()
        stranded = subprocess.Popen(  # the isolated leader's write, in parallel with the majority's
            ["ip", "netns", "exec", old.ns, "curl", "-s", "-m", "15", "-w", "\n%{http_code}", "-H",
             "content-type: application/json", "--data-binary",
             json.dumps({"name": "lost", "checkpoint": str(demo_model_dir), "backend": "dummy"}),
             f"http://{old.address}:{HTTP_PORT}/admin/models"], stdout=subprocess.PIPE, text=True)
        after = {"name": "after-cut", "checkpoint": str(demo_model_dir), "backend": "dummy"}
        statuses = []
        while time.monotonic() - cut_at < 15:
            status, reply = majority[0].request("POST", "/admin/models", after, timeout_s=10)
            statuses.append(status)
            if status != 503:
                break
        committed_s = time.monotonic() - cut_at
        assert statuses[-1] == 201, (statuses, reply)
        new_leader = wait_until(lambda: leader_seen_by(majority, 3), 5, "the majority agreeing", members)
        assert new_leader != old.node_id
        stdout, _ = stranded.communicate(timeout=30)
        text, _, stranded_status = stdout.rpartition("\n")
        assert stranded_status in ("503", "000"), stdout  # 503 no_leader, or no answer at all
        if stranded_status == "503":
            assert json.loads(text)["error"]["code"] in ("no_leader", "leader_changed"), text
        assert "lost" not in old.models()
        isolated_view = old.get("/admin/cluster")
        assert next(n for n in isolated_view["nodes"] if n["id"] == old.node_id)["role"] != "leader"  # check-quorum
        print(f"partition: leader {old.node_id} cut off -> new leader {new_leader}, admin write committed by the "
              f"majority in {committed_s:.2f}s (statuses {statuses}); isolated write: {stranded_status}")

        # Heal: the old leader follows the new one and catches up.
        old.link("up")
        healed_at = time.monotonic()
        wait_until(lambda: "after-cut" in old.models(), 20, "the old leader catching up", members)
        caught_up_s = time.monotonic() - healed_at
        wait_until(lambda: leader_seen_by(members, 3), 10, "all three agreeing again", members)
        view = old.get("/admin/cluster")
        assert view["leader"] != old.node_id
        assert next(n for n in view["nodes"] if n["id"] == old.node_id)["role"] == "follower"
        assert all("lost" not in m.models() for m in members)
        print(f"heal: old leader {old.node_id} saw the new deployment {caught_up_s:.2f}s after the link came back")
    finally:
        for member in members:
            with contextlib.suppress(Exception):  # keep cleaning up
                member.stop()
        _cleanup_namespaces()
