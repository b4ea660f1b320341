"""`sllmd ps` and `sllmd ls` as a user runs them (a subprocess) against a real node, and the admin API fields
they read: `GET /admin/instances`, an instance's idle time and keep-alive left, a model's checkpoint tiers."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace
from typing import Any

import pytest_asyncio

from sllmd.http.admin_api import remote_instance_views
from sllmd.scheduler.status import PeerInfo
from sllmd.state.models import InstanceRecord, InstanceState
from tests.nodes import RunningNode, free_port, running_node
from tests.test_cluster import running_cluster, wait_until

KEY = "ps-key"
PS_COLUMNS = ["MODEL", "NODE", "DEVICE", "MEMORY", "STATE", "IN-FLIGHT", "IDLE", "UNLOAD-IN", "TIER"]
LS_COLUMNS = ["NAME", "BACKEND", "SIZE", "MEMORY", "TIERS", "PINS", "INSTANCES"]
BYTES = re.compile(r"\d+(\.\d)? (B|KiB|MiB|GiB)")


@pytest_asyncio.fixture(scope="module")
async def served(demo_model_dir, tmp_path_factory) -> RunningNode:
    """"demo" (transformers) with one idle instance; "pinned" (dummy, min_instances 1) with its one."""
    async with running_node(tmp_path_factory.mktemp("ps"), devices__cpu_slots=2, server__api_keys=KEY) as running:
        running.http.headers["Authorization"] = f"Bearer {KEY}"
        await running.deploy("demo", demo_model_dir, keep_alive_s=600)
        await running.deploy("pinned", demo_model_dir, backend="dummy", min_instances=1, keep_alive_s=600)
        for model in ("demo", "pinned"):
            status, reply = await running.complete(model)
            assert status == 200, reply
        yield running


async def sllmd(*argv: str, **env: str) -> tuple[int, str, str]:
    """Run `python -m sllmd ARGV...` with `env` over an environment without SLLMD_URL or SLLMD_API_KEY: its
    exit status, stdout and stderr."""
    base = {k: v for k, v in os.environ.items() if k not in ("SLLMD_URL", "SLLMD_API_KEY")}
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "sllmd", *argv, env=base | env,
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await process.communicate()
    return process.returncode, out.decode(), err.decode()


def parse_table(text: str) -> tuple[list[str], list[dict[str, str]]]:
    """The header's column names and each row as {column: cell}, cut where each column's name begins."""
    header, *lines = text.splitlines()
    starts = [(match.group(), match.start()) for match in re.finditer(r"\S+", header)]
    bounds = [(name, start, starts[i + 1][1] if i + 1 < len(starts) else None) for i, (name, start) in
              enumerate(starts)]
    return [name for name, _ in starts], [{name: line[a:b].strip() for name, a, b in bounds} for line in lines]


async def ps_json(served: RunningNode) -> dict[str, dict[str, Any]]:
    """`sllmd ps --json` through the environment's URL and key: the rows by model."""
    rc, out, err = await sllmd("ps", "--json", SLLMD_URL=served.url, SLLMD_API_KEY=KEY)
    assert rc == 0 and not err, err
    return {row["model"]: row for row in json.loads(out)}


async def test_ps_prints_one_aligned_row_per_instance(served):
    rc, out, err = await sllmd("ps", "--url", served.url, "--api-key", KEY)
    assert rc == 0 and not err, err
    columns, rows = parse_table(out)
    assert columns == PS_COLUMNS
    by_model = {row["MODEL"]: row for row in rows}
    assert set(by_model) == {"demo", "pinned"}
    demo, pinned = by_model["demo"], by_model["pinned"]
    for row in (demo, pinned):
        assert (row["NODE"], row["DEVICE"], row["STATE"], row["IN-FLIGHT"]) == (served.node.node_id, "cpu", "ready",
                                                                                 "0")
        assert BYTES.fullmatch(row["MEMORY"]) and re.fullmatch(r"\d+s", row["IDLE"]), row
    assert re.fullmatch(r"9m\d\ds", demo["UNLOAD-IN"]) and demo["TIER"] in ("ssd", "dram")
    assert (pinned["UNLOAD-IN"], pinned["TIER"]) == ("-", "none")  # kept by min_instances; the dummy loads nothing


async def test_ps_json_shows_a_busy_instance_neither_idle_nor_unloading(served):
    async with served.node.worker.lease("demo"):
        demo = (await ps_json(served))["demo"]
    assert (demo["node"], demo["state"], demo["in_flight"]) == (served.node.node_id, "ready", 1)
    assert demo["idle_s"] is None and demo["unload_in_s"] is None
    demo = (await ps_json(served))["demo"]
    assert demo["in_flight"] == 0 and 0 <= demo["idle_s"] < 60 and 540 < demo["unload_in_s"] <= 600
    assert demo["tier"] in ("ssd", "dram") and demo["device"] == "cpu" and demo["id"].startswith("demo-")


async def test_ls_shows_sizes_tiers_pins_and_instances(served):
    node_id = served.node.node_id
    rc, out, err = await sllmd("ls", "--json", "--url", served.url, "--api-key", KEY)
    assert rc == 0 and not err, err
    demo, pinned = json.loads(out)  # by name
    fields = ("name", "backend", "min_instances", "instances")
    assert [demo[f] for f in fields] == ["demo", "transformers", 0, 1]
    assert demo["checkpoint_bytes"] > 0 and demo["checkpoint_tiers"]["ssd"] == [node_id]
    assert [pinned[f] for f in fields] == ["pinned", "dummy", 1, 1]
    assert pinned["checkpoint_tiers"] == {"dram": [], "ssd": []}  # read in place, never stored

    rc, out, err = await sllmd("ls", "--url", served.url, "--api-key", KEY)
    assert rc == 0 and not err, err
    columns, rows = parse_table(out)
    assert columns == LS_COLUMNS
    demo, pinned = rows
    assert f"ssd:{node_id}" in demo["TIERS"].split() and BYTES.fullmatch(demo["SIZE"])
    assert (demo["NAME"], demo["PINS"], demo["INSTANCES"]) == ("demo", "0", "1")
    assert (pinned["NAME"], pinned["TIERS"], pinned["PINS"], pinned["INSTANCES"]) == ("pinned", "-", "1", "1")


async def test_failures_exit_non_zero_with_one_line_on_stderr(served):
    rc, out, err = await sllmd("ps", "--url", f"http://127.0.0.1:{free_port()}")
    assert rc == 1 and not out
    assert err.startswith("sllmd ps: cannot reach http://127.0.0.1:") and err.count("\n") == 1, err
    rc, out, err = await sllmd("ls", "--url", served.url, "--api-key", "wrong")
    assert rc == 1 and not out
    assert err.startswith(f"sllmd ls: {served.url}/admin/models answered 401: ") and err.count("\n") == 1, err


async def test_admin_api_reports_idle_time_keep_alive_left_and_checkpoint_tiers(served):
    async with served.http.get(f"{served.url}/admin/instances") as response:
        instances = (await response.json())["instances"]
    assert [view["model"] for view in instances] == ["demo", "pinned"]
    demo = instances[0]
    assert set(demo) == {"id", "model", "node_id", "device", "memory_bytes", "state", "in_flight", "num_tokens",
                         "started_at", "idle_s", "unload_in_s", "load"}
    assert demo["idle_s"] >= 0 and demo["unload_in_s"] == max(0.0, 600 - demo["idle_s"])
    assert instances[1]["unload_in_s"] is None
    view = await served.model_view("demo")
    assert view["checkpoint_tiers"]["ssd"] == [served.node.node_id]
    (listed,) = view["instances"]  # the same instance, in the same form (a moment later)
    assert all(listed[key] == value for key, value in demo.items() if key not in ("idle_s", "unload_in_s"))


def test_one_node_lists_every_node_instances(tmp_path, demo_model_dir):
    """Two real processes, one instance each (min_instances 2 is dealt one per node): `ps` through n1 shows
    n2's too, with what n1 learns of it (state, requests, device), and `ls` through n2 counts both."""
    with running_cluster(tmp_path, ["n1", "n2"]) as cluster:
        n1, n2 = cluster
        body = {"name": "kept", "checkpoint": str(demo_model_dir), "backend": "dummy",
                "autoscaling": {"min_instances": 2, "max_instances": 2}}
        assert n1.post("/admin/models", body).status_code == 201

        def ps_by_node() -> dict[str, dict[str, Any]] | None:
            """n1's `sllmd ps --json` by node, once it shows both instances ready with their requests."""
            rows = {row["node"]: row for row in json.loads(run_sllmd("ps", "--json", "--url", n1.url))}
            is_known = set(rows) == {"n1", "n2"} and all(r["state"] == "ready" and r["in_flight"] == 0
                                                          for r in rows.values())
            return rows if is_known else None

        here, there = (wait_until(ps_by_node, 20, "both instances ready in n1's ps", cluster)[n] for n in ("n1", "n2"))
        assert here["idle_s"] >= 0 and here["unload_in_s"] is None and here["tier"] == "none"
        assert there["device"] == "cpu" and there["memory_bytes"] == here["memory_bytes"] > 0  # n2's status says
        assert there["idle_s"] is there["tier"] is None
        (row,) = json.loads(run_sllmd("ls", "--json", "--url", n2.url))
        assert (row["name"], row["min_instances"], row["instances"]) == ("kept", 2, 2)


def run_sllmd(*argv: str) -> str:
    """`python -m sllmd ARGV...`'s stdout; it must exit 0."""
    return subprocess.run([sys.executable, "-m", "sllmd", *argv], capture_output=True, text=True, check=True,
                          timeout=30).stdout


def test_other_nodes_instances_merge_records_and_statuses():
    def status(*instances: tuple[str, InstanceState, int, int]) -> Any:
        """A NodeStatus as far as the merge reads it: its instances (id, state, requests, tokens; each holding
        1 GiB)."""
        return SimpleNamespace(instances=[
            SimpleNamespace(id=i, model="m", state=state, num_requests=requests, num_tokens=tokens,
                            memory_bytes=1 << 30) for i, state, requests, tokens in instances])

    def peer(node_id: str, node_status: Any) -> PeerInfo:
        return PeerInfo(node_id, None, None, "follower", True, True, 0.1, node_status)

    records = [InstanceRecord("m-both", "m", "n2", "cuda:0", InstanceState.STARTING, 1.0),
               InstanceRecord("m-record", "m", "n3", "cuda:1", InstanceState.READY, 2.0),
               InstanceRecord("m-stopping", "m", "n2", "cuda:2", InstanceState.STOPPING, 3.0),
               InstanceRecord("m-local", "m", "n1", "cpu", InstanceState.READY, 4.0)]
    nodes = [peer("n1", status(("m-local", InstanceState.READY, 1, 5))),
             peer("n2", status(("m-both", InstanceState.READY, 2, 30), ("m-status", InstanceState.STARTING, 0, 0))),
             peer("n3", None)]
    views = {view["id"]: view for view in remote_instance_views(records, nodes, "n1")}
    assert set(views) == {"m-both", "m-record", "m-status"}  # neither this node's nor a stopping one
    both, record, from_status = views["m-both"], views["m-record"], views["m-status"]
    assert (both["device"], both["started_at"], both["state"], both["in_flight"], both["num_tokens"]) == (
        "cuda:0", 1.0, "ready", 2, 30)  # the status is newer than the record
    assert (record["node_id"], record["state"], record["in_flight"]) == ("n3", "ready", None)
    assert (from_status["node_id"], from_status["device"], from_status["state"]) == ("n2", None, "starting")
    assert record["memory_bytes"] is None and both["memory_bytes"] == from_status["memory_bytes"] == 1 << 30
    for view in views.values():
        assert view["idle_s"] is view["unload_in_s"] is view["load"] is None
