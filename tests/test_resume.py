"""Resuming a relayed request when its serving node dies (`serving.resume_on_node_failure`), between three real
`sllmd` processes serving the demo model (transformers, CPU, fp32): `kill -9` of the serving node in the middle
of relayed streams (greedy and seeded sampling) leaves each client with one uninterrupted SSE stream whose text,
usage and finish reason equal an unkilled run. The serving node's internal answer (token ids, no text) is
checked on the way. With resuming off (the default), tests/test_routing.py shows the stream ending with an
error event instead. Last, in process: the resumed relay body and the setting itself."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from sllmd.config import ConfigError, load_config
from sllmd.errors import InvalidRequest
from sllmd.serving.request import TokenRequest
from sllmd.types import SamplingParams
from tests.nodes import generate_here
from tests.test_cluster import Member, running_cluster, wait_until
from tests.test_migration import stream
from tests.test_routing import serving_node, wait_known_everywhere

ONE_INSTANCE = {"max_instances": 1, "keep_alive_s": 300}
MAX_TOKENS = 120
SETTINGS = {"SLLMD_SERVING_RESUME_ON_NODE_FAILURE": "true", "SLLMD_SERVING_TORCH_THREADS": "1"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path) -> Iterator[list[Member]]:
    with running_cluster(tmp_path_factory.mktemp("resume"), ["r1", "r2", "r3"], env=SETTINGS) as members:
        body = {"name": "demo", "checkpoint": str(demo_model_dir), "backend": "transformers",
                "autoscaling": ONE_INSTANCE}
        reply = members[0].post("/admin/models", body)
        assert reply.status_code == 201, reply.text
        wait_until(lambda: all("demo" in m.models() for m in members), 5, "the model everywhere", members)
        yield members


def bodies() -> list[dict[str, Any]]:
    common = {"model": "demo", "max_tokens": MAX_TOKENS, "stream": True, "stream_options": {"include_usage": True}}
    return [{**common, "prompt": "Once upon", "temperature": 0},
            {**common, "prompt": "The sea", "temperature": 0.9, "seed": 11}]


def run_all(entry: Member, during=None, after: int = 8) -> list[list[Any]]:
    """Stream every body at once through `entry`; call `during()` once each has `after` payloads."""
    requests = bodies()
    flags = [threading.Event() for _ in requests]
    with ThreadPoolExecutor(len(requests)) as pool:
        futures = [pool.submit(stream, entry, b, f, after) for b, f in zip(requests, flags, strict=True)]
        for flag in flags:
            assert flag.wait(60)
        if during is not None:
            during()
        return [f.result() for f in futures]


def outcome(events: list[Any]) -> tuple[str, str | None, dict[str, int]]:
    """(text, finish reason, usage) of one completed stream; asserts it ended cleanly."""
    assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1]), events[-3:]
    choices = [c for e in events[:-1] for c in e["choices"]]
    return "".join(c["text"] for c in choices), choices[-1]["finish_reason"], events[-2]["usage"]


@pytest.fixture(scope="module")
def relayed_answer(cluster: list[Member]) -> list[int]:
    """A request "relayed" to the second node: it serves it itself, starting the model's one instance there."""
    return generate_here(cluster[1].url, "demo", [1, 5, 9], 5, temperature=0.0)


def test_the_serving_node_answers_a_relayed_request_with_token_ids(cluster, relayed_answer):
    assert 1 <= len(relayed_answer) <= 5 and all(type(i) is int for i in relayed_answer)
    assert serving_node(cluster, "demo") is cluster[1]


def test_kill_of_the_serving_node_mid_stream_resumes_relayed_streams_with_identical_output(cluster, relayed_answer):
    serving, entry = cluster[1], cluster[2]
    wait_known_everywhere(cluster, "demo", serving)
    expected = [outcome(events) for events in run_all(entry)]  # relayed to the serving node, unkilled
    assert serving_node(cluster, "demo") is serving
    assert all(usage["completion_tokens"] > 20 for _, _, usage in expected), expected

    got = run_all(entry, serving.kill)
    for events, reference in zip(got, expected, strict=True):
        assert outcome(events) == reference
    resumed = [line for line in Path(entry.log_path).read_text().splitlines() if "resuming it elsewhere" in line]
    assert len(resumed) == 2, resumed  # each request was cut off mid-stream, then continued elsewhere
    survivors = [m for m in cluster if m is not serving]
    assert serving_node(survivors, "demo") in survivors


# ------------------------------------------------------------------------------------------ in process


def test_a_resumed_request_asks_for_the_rest_from_prompt_and_tokens_so_far():
    params = SamplingParams(max_tokens=10, temperature=0.7, top_p=0.9, seed=42, stop_token_ids=frozenset({2}))
    resumed = TokenRequest("m", (1, 2), params, generated=(7, 8, 9))
    assert resumed.sequence() == [1, 2, 7, 8, 9]
    assert resumed.remaining_params() == SamplingParams(max_tokens=7, temperature=0.7, top_p=0.9, seed=42,
                                                        stop_token_ids=frozenset({2}))
    assert resumed.to_wire() == {"model": "m", "prompt_ids": [1, 2], "generated": [7, 8, 9], "max_tokens": 10,
                                 "temperature": 0.7, "top_p": 0.9, "seed": 42, "stop_token_ids": [2]}
    assert TokenRequest.from_wire(resumed.to_wire()) == resumed


@pytest.mark.parametrize(("change", "param"), [
    ({"prompt_ids": []}, "prompt_ids"), ({"prompt_ids": [1, -2]}, "prompt_ids"), ({"generated": "x"}, "generated"),
    ({"max_tokens": 3}, "max_tokens"), ({"max_tokens": True}, "max_tokens"), ({"seed": 1.5}, "seed"),
    ({"temperature": "hot"}, "temperature"), ({"top_p": 0}, "temperature"), ({"extra": 1}, "extra"),
    ({"model": ""}, "model"),
])
def test_a_malformed_internal_request_is_refused_naming_its_field(change, param):
    wire = {**TokenRequest("m", (1, 2), SamplingParams(max_tokens=10), generated=(7, 8, 9)).to_wire(), **change}
    with pytest.raises(InvalidRequest) as refused:
        TokenRequest.from_wire(wire)
    assert refused.value.param == param


def test_resume_on_node_failure_setting():
    assert load_config(env={}).serving.resume_on_node_failure is False
    env = {"SLLMD_SERVING_RESUME_ON_NODE_FAILURE": "yes"}
    assert load_config(env=env).serving.resume_on_node_failure is True
    with pytest.raises(ConfigError, match=r"serving\.resume_on_node_failure must be of type bool"):
        load_config(env={"SLLMD_SERVING_RESUME_ON_NODE_FAILURE": "maybe"})
