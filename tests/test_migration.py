"""Live migration between two real `sllmd` processes: requests moved mid-stream keep one uninterrupted SSE
stream with the tokens of an unmigrated run; device memory ends up held once; the admin route's errors; a
destination that dies before the cut-over leaves the requests running on the source; a source that dies
after the cut-over leaves nothing held on the destination."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.test_cluster import Member, running_cluster, wait_until

ONE_INSTANCE = {"max_instances": 1, "keep_alive_s": 300}


@pytest.fixture
def pair(tmp_path: Path, demo_model_dir: Path) -> Iterator[tuple[Member, Member]]:
    """Source `s` (serving the demo model) and destination `d`, agreeing on a leader."""
    with running_cluster(tmp_path, ["s", "d"]) as (source, destination):
        body = {"name": "demo", "checkpoint": str(demo_model_dir), "autoscaling": ONE_INSTANCE}
        assert source.post("/admin/models", body).status_code == 201
        wait_until(lambda: "demo" in destination.models(), 5, "the model on d", [source, destination])
        assert source.post("/v1/completions", {"model": "demo", "prompt": "Hi", "max_tokens": 2}).status_code == 200
        yield source, destination


def bodies(max_tokens: int) -> list[dict[str, Any]]:
    greedy = {"temperature": 0}
    return [{"model": "demo", "prompt": prompt, "max_tokens": max_tokens, "stream": True,
             "stream_options": {"include_usage": True}, **(greedy if i % 2 == 0 else {"temperature": 0.9, "seed": i})}
            for i, prompt in enumerate(["Once upon", "The sea", "A long", "Dear"])]


def stream(member: Member, body: dict[str, Any], progressed: threading.Event, after: int) -> list[Any]:
    """Every SSE payload of one response ("[DONE]" as is); sets `progressed` after `after` text chunks."""
    events: list[Any] = []
    with httpx.stream("POST", f"{member.url}/v1/completions", json=body, timeout=120) as reply:
        assert reply.status_code == 200, reply.read()
        for line in reply.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
                if len(events) == after:
                    progressed.set()
    progressed.set()
    return events


def text_of(events: list[Any]) -> str:
    return "".join(c.get("text") or "" for e in events[:-1] if "choices" in e for c in e["choices"])


def run(member: Member, max_tokens: int, during=None, after: int = 20) -> tuple[list[list[Any]], Any]:
    """Stream every body at once through `member`; call `during()` once each has `after` chunks."""
    requests = bodies(max_tokens)
    flags = [threading.Event() for _ in requests]
    with ThreadPoolExecutor(len(requests)) as pool:
        futures: list[Future] = [pool.submit(stream, member, b, f, after) for b, f in zip(requests, flags, strict=True)]
        for flag in flags:
            flag.wait(60)
        outcome = during() if during is not None else None
        return [f.result() for f in futures], outcome


def instance_id(member: Member) -> str:
    (instance,) = member.get("/admin/models/demo")["instances"]
    return instance["id"]


def holders(member: Member) -> list[str]:
    """The instances holding device memory on `member`, as its own status says; their holds must be all the
    memory its devices have lent."""
    (view,) = [n for n in member.get("/admin/cluster")["nodes"] if n["id"] == member.node_id]
    held = sum(device["budget_bytes"] - device["free_bytes"] for device in view["devices"])
    assert held == sum(instance["memory_bytes"] for instance in view["instances"]), view
    return [instance["id"] for instance in view["instances"]]


def test_requests_move_mid_stream_with_identical_output_and_memory_held_once(pair):
    source, destination = pair
    expected, _ = run(source, 150)
    moved_id = instance_id(source)

    def migrate() -> httpx.Response:  # through d: the call is forwarded to s, which runs the instance
        return destination.post(f"/admin/instances/{moved_id}/migrate", {"to": "d"}, timeout_s=60)

    got, reply = run(source, 150, migrate)
    assert reply.status_code == 200, reply.text
    result = reply.json()
    assert result["outcome"] == "moved" and result["to_node"] == "d" and result["instance_id"] == moved_id
    assert result["num_requests"] == 4 and result["num_tokens"] > 4 * 20 and result["num_rounds"] >= 1
    for events, reference in zip(got, expected, strict=True):
        assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1])
        assert text_of(events) == text_of(reference)
        assert events[-2]["usage"] == reference[-2]["usage"]
    # The source's memory is free; the destination's holds exactly the new instance.
    assert holders(source) == [] and source.get("/admin/models/demo")["instances"] == []
    (new_instance,) = destination.get("/admin/models/demo")["instances"]
    wait_until(lambda: holders(destination) == [new_instance["id"]], 5, "d's one instance", pair)
    assert new_instance["in_flight"] == 0 and new_instance["num_tokens"] == 0


def test_admin_migrate_errors(pair):
    source, destination = pair
    moved_id = instance_id(source)
    cases = [
        (source, "/admin/instances/nope/migrate", {"to": "d"}, 404, "instance_not_found"),
        (destination, "/admin/instances/nope/migrate", {"to": "d"}, 404, "instance_not_found"),
        (source, f"/admin/instances/{moved_id}/migrate", {"to": "x"}, 400, "unknown_node"),
        (source, f"/admin/instances/{moved_id}/migrate", {}, 400, None),
        (source, f"/admin/instances/{moved_id}/migrate", {"to": "d", "now": True}, 400, None),
        (destination, f"/admin/instances/{moved_id}/migrate", {"to": "s"}, 400, "same_node"),
    ]
    for member, path, body, status, code in cases:
        reply = member.post(path, body)
        assert reply.status_code == status, (path, body, reply.text)
        error = reply.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        assert code is None or error["code"] == code, error


def test_destination_dying_before_the_cut_over_leaves_the_requests_on_the_source(pair):
    source, destination = pair
    expected, _ = run(source, 150)
    moved_id = instance_id(source)

    def migrate_to_a_dying_node() -> httpx.Response:
        assert destination.process is not None
        destination.process.send_signal(19)  # SIGSTOP: it answers nothing from here on
        reply = source.post(f"/admin/instances/{moved_id}/migrate", {"to": "d"}, timeout_s=60)
        destination.kill()
        return reply

    got, reply = run(source, 150, migrate_to_a_dying_node)
    assert reply.status_code == 200, reply.text
    assert reply.json()["outcome"] == "aborted" and "silent" in reply.json()["reason"]
    for events, reference in zip(got, expected, strict=True):
        assert events[-1] == "[DONE]" and text_of(events) == text_of(reference)
    assert instance_id(source) == moved_id and holders(source) == [moved_id]
    assert source.get("/admin/models/demo")["instances"][0]["in_flight"] == 0


def test_source_dying_after_the_cut_over_frees_the_destination(pair):
    source, destination = pair
    moved_id = instance_id(source)
    requests = bodies(400)
    flags = [threading.Event() for _ in requests]
    with ThreadPoolExecutor(len(requests)) as pool:
        futures = [pool.submit(stream, source, b, f, 10) for b, f in zip(requests, flags, strict=True)]
        for flag in flags:
            flag.wait(60)
        reply = source.post(f"/admin/instances/{moved_id}/migrate", {"to": "d"}, timeout_s=60)
        assert reply.json()["outcome"] == "moved", reply.text
        wait_until(lambda: destination.get("/admin/models/demo")["instances"][0]["in_flight"] == 4, 5,
                   "the moved requests on d", pair)
        source.kill()
        for future in futures:
            with pytest.raises(httpx.HTTPError):  # the client's connection was to the dead node
                future.result()
    began = time.monotonic()
    wait_until(lambda: destination.get("/admin/models/demo")["instances"][0]["in_flight"] == 0, 10,
               "d dropping the orphaned requests", [destination])
    print(f"d dropped the requests {time.monotonic() - began:.2f}s after s died")
    (instance,) = destination.get("/admin/models/demo")["instances"]
    assert holders(destination) == [instance["id"]]
