"""Admin API validation, conflicts, bearer keys and body limits."""

from __future__ import annotations

import gzip
import json
import zlib

import aiohttp
import pytest
import pytest_asyncio

from tests.nodes import RunningNode, running_node

KEY = "s3cret-key"


@pytest_asyncio.fixture(scope="module")
async def served(demo_model_dir, tmp_path_factory) -> RunningNode:
    async with running_node(tmp_path_factory.mktemp("admin"), server__api_keys=KEY,
                            server__max_body_bytes=4096) as running:
        running.http.headers["Authorization"] = f"Bearer {KEY}"
        await running.deploy("demo", demo_model_dir, backend="dummy")
        yield running


async def post(served: RunningNode, path: str, body, method: str = "POST") -> tuple[int, dict]:
    async with served.http.request(method, f"{served.url}{path}", json=body) as response:
        return response.status, await response.json()


@pytest.mark.parametrize(("body", "param"), [
    ({"checkpoint": "/x"}, "name"),
    ({"name": "m"}, "checkpoint"),
    ({"name": "m", "checkpoint": "./relative/dir"}, "checkpoint"),
    ({"name": "m", "checkpoint": "org/bad name"}, "checkpoint"),  # Hub-shaped, but no valid repo id
    ({"name": "m", "checkpoint": "/tmp", "dtype": "float8"}, "dtype"),
    ({"name": "m", "checkpoint": "/tmp", "max_model_len": 1}, "max_model_len"),
    ({"name": "m", "checkpoint": "/tmp", "max_model_len": "4k"}, "max_model_len"),
    ({"name": "m", "checkpoint": "/does/not/exist"}, "checkpoint"),
    ({"name": "m", "checkpoint": "/tmp", "backend": "tensorrt"}, "backend"),
    ({"name": "m", "checkpoint": "/tmp", "autoscaling": {"max_instances": 0}}, "autoscaling.max_instances"),
    ({"name": "m", "checkpoint": "/tmp", "autoscaling": {"min_instances": 3, "max_instances": 2}},
     "autoscaling.min_instances"),
    ({"name": "m", "checkpoint": "/tmp", "autoscaling": {"keep_alive_s": "1"}}, "autoscaling.keep_alive_s"),
    ({"name": "m", "checkpoint": "/tmp", "autoscaling": {"warm": True}}, "autoscaling.warm"),
    ({"name": "m", "checkpoint": "/tmp", "replicas": 3}, "replicas"),
    ({"name": "m", "checkpoint": "/tmp", "autoscaling": {"max_instances": 1e9}}, "autoscaling.max_instances"),
    ({"name": "m", "checkpoint": "/tmp", "autoscaling": {"keep_alive_s": 1e308}}, "autoscaling.keep_alive_s"),
    ({"name": "m", "checkpoint": "/tmp", "autoscaling": {"target_concurrency": 1 << 40}},
     "autoscaling.target_concurrency"),
    ({"name": "a/b", "checkpoint": "/tmp"}, "name"),
    ({"name": "..", "checkpoint": "/tmp"}, "name"),
    ({"name": ".", "checkpoint": "/tmp"}, "name"),
    ({"name": "a\u0000b", "checkpoint": "/tmp"}, "name"),
    ({"name": "line\nbreak", "checkpoint": "/tmp"}, "name"),
    ({"name": " padded", "checkpoint": "/tmp"}, "name"),
    ({"name": "x" * 129, "checkpoint": "/tmp"}, "name"),
])
async def test_bad_deployments_are_400_naming_the_field(served, body, param):
    status, reply = await post(served, "/admin/models", body)
    assert status == 400, reply
    assert reply["error"]["param"] == param


async def test_a_directory_that_is_not_a_model_is_rejected(served, tmp_path):
    (tmp_path / "config.json").write_text("{oops")
    status, reply = await post(served, "/admin/models", {"name": "m", "checkpoint": str(tmp_path)})
    assert status == 400 and "config.json" in reply["error"]["message"]


async def test_duplicate_deploy_is_409_and_unknown_model_404(served, demo_model_dir):
    status, reply = await post(served, "/admin/models", {"name": "demo", "checkpoint": str(demo_model_dir)})
    assert status == 409 and reply["error"]["code"] == "model_exists"
    for method in ("GET", "PATCH", "DELETE"):
        status, reply = await post(served, "/admin/models/nope", {}, method=method)
        assert status == 404 and reply["error"]["code"] == "model_not_found"


async def test_patch_changes_only_autoscaling(served):
    status, reply = await post(served, "/admin/models/demo", {"checkpoint": "/elsewhere"}, method="PATCH")
    assert status == 400 and reply["error"]["param"] == "checkpoint"
    status, reply = await post(served, "/admin/models/demo", {"autoscaling": {"max_instances": 2}}, method="PATCH")
    assert status == 200 and reply["autoscaling"]["max_instances"] == 2
    assert reply["autoscaling"]["keep_alive_s"] == 60.0  # untouched fields keep their value


async def test_deploy_list_get_delete_round_trip(served, demo_model_dir):
    status, created = await post(served, "/admin/models", {"name": "temp", "checkpoint": str(demo_model_dir)})
    assert status == 201 and created["backend"] == "transformers" and created["context_length"] == 1024
    async with served.http.get(f"{served.url}/admin/models") as response:
        names = {m["name"] for m in (await response.json())["models"]}
    assert {"demo", "temp"} <= names
    status, reply = await post(served, "/admin/models/temp", None, method="DELETE")
    assert status == 200 and reply == {"deleted": "temp"}
    async with served.http.get(f"{served.url}/v1/models") as response:
        assert "temp" not in {m["id"] for m in (await response.json())["data"]}


async def test_cluster_view(served):
    async with served.http.get(f"{served.url}/admin/cluster") as response:
        cluster = await response.json()
    (node,) = cluster["nodes"]
    assert cluster["leader"] == node["id"] and node["role"] == "leader" and node["alive"]
    assert [(device["name"], device["budget_bytes"]) for device in node["devices"]] == [("cpu", 4 << 30)] * 2


async def test_api_keys_guard_everything_but_health_and_metrics(served):
    async with aiohttp.ClientSession() as http:  # without the fixture session's key
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            async with http.get(f"{served.url}/v1/models", headers=headers) as response:
                assert response.status == 401
                assert (await response.json())["error"]["type"] == "authentication_error"
        async with http.get(f"{served.url}/v1/models", headers={"Authorization": "bearer " + KEY}) as response:
            assert response.status == 200
        for path in ("/health", "/metrics"):
            async with http.get(f"{served.url}{path}") as response:
                assert response.status == 200


async def test_oversized_body_is_413_with_an_error_body(served):
    status, reply = await post(served, "/v1/completions", {"model": "demo", "prompt": "x" * 10_000})
    assert status == 413 and reply["error"]["code"] == "body_too_large"
    status, _ = await post(served, "/v1/completions", {"model": "demo", "prompt": "x", "max_tokens": 2})
    assert status == 200


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_body_that_cannot_be_decoded_is_400(served, encoding):
    async def post_raw(path: str, data: bytes, headers: dict[str, str]) -> tuple[int, dict]:
        # A fresh connection each: the server closes one whose body it could not read.
        async with aiohttp.ClientSession(headers=served.http.headers) as http, http.post(
                f"{served.url}{path}", data=data, headers={"Content-Type": "application/json", **headers}) as response:
            return response.status, await response.json()

    for path in ("/v1/completions", "/admin/models"):
        status, reply = await post_raw(path, b'{"model": "demo"} not compressed', {"Content-Encoding": encoding})
        assert status == 400, reply
        assert reply["error"]["code"] == "undecodable_body" and reply["error"]["type"] == "invalid_request_error"
    body = json.dumps({"model": "demo", "prompt": "x", "max_tokens": 2}).encode()
    compressed = gzip.compress(body) if encoding == "gzip" else zlib.compress(body)
    status, reply = await post_raw("/v1/completions", compressed, {"Content-Encoding": encoding})
    assert status == 200, reply  # a body that is what it says decodes as before
