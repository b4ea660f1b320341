"""Fetching checkpoints from the model repository: a Hugging Face directory (converted), a v1 directory
(copied and verified), and a v1 checkpoint behind a real HTTP server on 127.0.0.1 read with Range
requests — resumed after dropped connections, corrupt chunks fetched again once, clear errors — and
deployments from all three through the admin API, served by the transformers engine."""

from __future__ import annotations

import asyncio
import filecmp
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from sllmd.checkpoint.convert import convert
from sllmd.checkpoint.errors import ChecksumMismatch
from sllmd.checkpoint.fetch import SourceKind, describe, fetch
from sllmd.checkpoint.reader import read_manifest, verify
from sllmd.checkpoint.store import checkpoint_id
from sllmd.checkpoint.url_fetch import FetchSettings, RepositoryNotFound, RepositoryUnreachable
from tests.nodes import free_port, running_node

CHUNK = 16 << 10
FAST = FetchSettings(connections=3, request_bytes=4 * CHUNK, timeout_s=5.0, retries=3, backoff_s=0.01)
SERIAL = FetchSettings(connections=1, request_bytes=1 << 30, timeout_s=5.0, retries=3, backoff_s=0.01)


@dataclass
class Repository:
    """Files under `root` served at `url`/..., with Range support (`web.FileResponse`), a request log,
    and faults: `cut[name] = [nbytes, times]` drops the connection after nbytes of the next `times`
    responses; `corrupt[name] = [offset, times]` flips that byte in the next `times` responses holding it."""

    root: Path
    url: str = ""
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    cut: dict[str, list[int]] = field(default_factory=dict)
    corrupt: dict[str, list[int]] = field(default_factory=dict)

    def reset(self) -> None:
        self.requests.clear()
        self.cut.clear()
        self.corrupt.clear()

    def ranges(self, name: str) -> list[str | None]:
        return [r for path, r in self.requests if path.endswith("/" + name)]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        rel = request.match_info["path"]
        self.requests.append((rel, request.headers.get("Range")))
        path = self.root / rel
        if ".." in Path(rel).parts or not path.is_file():
            raise web.HTTPNotFound()
        if path.name not in self.cut and path.name not in self.corrupt:
            return web.FileResponse(path)
        data = path.read_bytes()
        lo, hi = 0, len(data) - 1
        if match := re.fullmatch(r"bytes=(\d+)-(\d+)", request.headers.get("Range", "")):
            lo, hi = int(match[1]), min(int(match[2]), len(data) - 1)
        body = bytearray(data[lo : hi + 1])
        corrupt = self.corrupt.get(path.name)
        if corrupt and corrupt[1] > 0 and lo <= corrupt[0] <= hi:
            corrupt[1] -= 1
            body[corrupt[0] - lo] ^= 0xFF
        response = web.StreamResponse(status=206, headers={"Content-Range": f"bytes {lo}-{hi}/{len(data)}"})
        response.content_length = len(body)
        await response.prepare(request)
        cut = self.cut.get(path.name)
        if cut and cut[1] > 0:
            cut[1] -= 1
            await response.write(bytes(body[: cut[0]]))
            await asyncio.sleep(0.1)  # let the client read what was sent: a close drops unread data
            assert request.transport is not None
            request.transport.close()  # the client sees the body end early
            return response
        await response.write(bytes(body))
        await response.write_eof()
        return response


@pytest.fixture(scope="module")
def v1_dir(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model as a v1 checkpoint of several partitions of 16 KiB chunks."""
    dst = tmp_path_factory.mktemp("v1") / "demo-v1"
    convert(demo_model_dir, dst, partition_max_bytes=512 << 10, chunk_bytes=CHUNK)
    return dst


@pytest_asyncio.fixture(scope="module")
async def repo(v1_dir: Path) -> Repository:
    repository = Repository(v1_dir.parent)
    app = web.Application()
    app.router.add_get("/{path:.+}", repository.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    repository.url = f"http://127.0.0.1:{port}"
    try:
        yield repository
    finally:
        await runner.cleanup()


@pytest.fixture
def fresh(repo: Repository) -> Repository:
    repo.reset()
    return repo


def assert_same_checkpoint(src: Path, dst: Path) -> None:
    names = {f.name for f in src.iterdir()}
    assert names == {f.name for f in dst.iterdir()}
    mismatch = filecmp.cmpfiles(src, dst, sorted(names), shallow=False)[1:]
    assert mismatch == ([], []), mismatch


# -- local paths ----------------------------------------------------------------------------------


async def test_fetch_hf_dir_converts_and_keeps_the_tokenizer(demo_model_dir, tmp_path):
    report = await fetch(str(demo_model_dir), tmp_path / "ckpt", work_dir=tmp_path / ".work")
    assert report.kind is SourceKind.HF_DIR and report.num_bytes > 0
    assert verify(tmp_path / "ckpt").num_bytes == read_manifest(tmp_path / "ckpt").total_bytes
    for name in ("config.json", "tokenizer.json", "generation_config.json"):
        assert filecmp.cmp(demo_model_dir / name, tmp_path / "ckpt" / name, shallow=False)


async def test_fetch_v1_dir_copies_and_verifies(v1_dir, tmp_path):
    report = await fetch(str(v1_dir), tmp_path / "ckpt", work_dir=tmp_path / ".work")
    assert report.kind is SourceKind.V1_DIR
    assert_same_checkpoint(v1_dir, tmp_path / "ckpt")
    assert not (tmp_path / ".work").exists()


async def test_a_corrupt_v1_dir_is_refused_and_leaves_nothing(v1_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(v1_dir, bad)
    with open(bad / "data-00001.bin", "r+b") as f:
        f.seek(CHUNK + 5)
        byte = f.read(1)
        f.seek(CHUNK + 5)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(ChecksumMismatch, match=rf"data-00001.bin bytes \[{CHUNK}, {2 * CHUNK}\)"):
        await fetch(str(bad), tmp_path / "ckpt", work_dir=tmp_path / ".work")
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / ".work").exists()


# -- HTTP -----------------------------------------------------------------------------------------


async def test_fetch_url_with_parallel_range_requests(fresh, v1_dir, tmp_path):
    report = await fetch(f"{fresh.url}/demo-v1/", tmp_path / "ckpt", work_dir=tmp_path / ".work", settings=FAST)
    assert_same_checkpoint(v1_dir, tmp_path / "ckpt")
    assert not (tmp_path / ".work").exists()
    assert report.kind is SourceKind.URL and report.num_retries == 0 and report.gb_per_s > 0
    assert report.num_bytes == sum(f.stat().st_size for f in v1_dir.iterdir())
    ranges = [r for path, r in fresh.requests if path.endswith(".bin")]
    assert ranges and all(r is not None for r in ranges)
    sizes = [int(b) - int(a) + 1 for a, b in (re.fullmatch(r"bytes=(\d+)-(\d+)", r).groups() for r in ranges)]
    assert max(sizes) <= FAST.request_bytes  # several requests per partition
    assert ("demo-v1/merges.txt", None) in fresh.requests  # optional files that 404 are skipped


async def test_describe_url_reads_only_the_manifest_and_config(fresh, v1_dir):
    info = await describe(f"{fresh.url}/demo-v1", FAST)
    assert info.num_bytes == read_manifest(v1_dir).total_bytes
    assert info.config["max_position_embeddings"] == 1024
    assert {path for path, _ in fresh.requests} == {"demo-v1/manifest.json", "demo-v1/config.json"}


async def test_a_dropped_connection_resumes_at_the_first_unverified_chunk(fresh, v1_dir, tmp_path):
    fresh.cut["data-00000.bin"] = [3 * CHUNK + 100, 1]
    report = await fetch(f"{fresh.url}/demo-v1", tmp_path / "ckpt", work_dir=tmp_path / ".work", settings=SERIAL)
    assert_same_checkpoint(v1_dir, tmp_path / "ckpt")
    assert report.num_retries == 1
    first, retry = fresh.ranges("data-00000.bin")
    assert first.startswith("bytes=0-") and retry.startswith(f"bytes={3 * CHUNK}-")


async def test_a_later_attempt_keeps_the_chunks_already_verified(fresh, v1_dir, tmp_path):
    fresh.cut["data-00000.bin"] = [5 * CHUNK + 7, 1]
    no_retries = FetchSettings(connections=1, request_bytes=1 << 30, retries=0)
    with pytest.raises(RepositoryUnreachable, match="gave up after 0 retries"):
        await fetch(f"{fresh.url}/demo-v1", tmp_path / "ckpt", work_dir=tmp_path / ".work", settings=no_retries)
    assert not (tmp_path / "ckpt").exists()
    assert (tmp_path / ".work" / "data-00000.bin").exists()  # kept for the next attempt
    fresh.requests.clear()
    await fetch(f"{fresh.url}/demo-v1", tmp_path / "ckpt", work_dir=tmp_path / ".work", settings=SERIAL)
    assert_same_checkpoint(v1_dir, tmp_path / "ckpt")
    assert fresh.ranges("data-00000.bin") == [f"bytes={5 * CHUNK}-{(v1_dir / 'data-00000.bin').stat().st_size - 1}"]


async def test_a_corrupt_chunk_is_fetched_again_once(fresh, v1_dir, tmp_path):
    fresh.corrupt["data-00001.bin"] = [2 * CHUNK + 9, 1]
    report = await fetch(f"{fresh.url}/demo-v1", tmp_path / "ckpt", work_dir=tmp_path / ".work", settings=FAST)
    assert report.num_refetched_chunks == 1
    assert_same_checkpoint(v1_dir, tmp_path / "ckpt")


async def test_a_chunk_corrupt_every_time_fails_with_checksum_mismatch(fresh, tmp_path):
    fresh.corrupt["data-00001.bin"] = [2 * CHUNK + 9, 99]
    with pytest.raises(ChecksumMismatch, match=rf"data-00001.bin bytes \[{2 * CHUNK}, {3 * CHUNK}\)"):
        await fetch(f"{fresh.url}/demo-v1", tmp_path / "ckpt", work_dir=tmp_path / ".work", settings=FAST)
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / ".work").exists()
    assert fresh.corrupt["data-00001.bin"][1] == 97  # sent corrupt twice: the first fetch and one refetch


async def test_missing_checkpoint_is_a_clear_404(fresh, tmp_path):
    with pytest.raises(RepositoryNotFound, match=r"manifest.json not found in repository \(HTTP 404\)"):
        await fetch(f"{fresh.url}/nothing-here", tmp_path / "ckpt", work_dir=tmp_path / ".work", settings=FAST)
    assert not (tmp_path / "ckpt").exists()


async def test_an_unreachable_repository_gives_up_after_the_retries(tmp_path):
    settings = FetchSettings(retries=2, backoff_s=0.01, timeout_s=2.0)
    with pytest.raises(RepositoryUnreachable, match="gave up after 2 retries"):
        await describe(f"http://127.0.0.1:{free_port()}/m", settings)


# -- deployments ----------------------------------------------------------------------------------


def cold_starts(metrics: str, model: str) -> dict[str, float]:
    found = re.findall(rf'sllmd_cold_starts_total{{model="{model}",tier="(\w+)"}} ([\d.]+)', metrics)
    return {tier: float(count) for tier, count in found}


async def test_deploy_from_hf_dir_v1_dir_and_url_then_serve(fresh, demo_model_dir, v1_dir, tmp_path):
    async with running_node(tmp_path / "node", devices__cpu_slots=1, store__fetch_retries=1) as node:
        url = f"{fresh.url}/demo-v1"
        for name, source in (("hf", demo_model_dir), ("v1", v1_dir), ("url", url)):
            body = {"name": name, "checkpoint": str(source), "autoscaling": {"keep_alive_s": 0.05}}
            async with node.http.post(f"{node.url}/admin/models", json=body) as response:
                assert response.status == 201, await response.text()
                view = await response.json()
            assert view["checkpoint"] == str(source) and view["context_length"] == 1024
            assert view["checkpoint_bytes"] == read_manifest(v1_dir).total_bytes or name == "hf"
        store = node.node.worker.store
        assert store.contains(checkpoint_id(url)) and store.contains(checkpoint_id(str(demo_model_dir)))
        texts = set()
        for name in ("hf", "v1", "url"):
            status, reply = await node.complete(name, max_tokens=6)
            assert status == 200, reply
            texts.add(reply["choices"][0]["text"])
        assert len(texts) == 1  # the same weights, whichever way they came
        metrics = node.node.metrics.render().decode()
        for name in ("hf", "v1", "url"):
            assert cold_starts(metrics, name) == {"ssd": 1.0}, metrics  # fetched at deploy: the start read SSD

        # Evicted since deploy: the next cold start fetches again, and says so.
        runtime = node.node.worker.runtimes["url"]
        for _ in range(500):
            if not runtime.instances and not store.is_pinned(checkpoint_id(url)):
                break
            await asyncio.sleep(0.01)
        assert await store.remove(checkpoint_id(url))
        status, reply = await node.complete("url", max_tokens=6)
        assert status == 200 and reply["choices"][0]["text"] in texts
        assert cold_starts(node.node.metrics.render().decode(), "url") == {"ssd": 1.0, "repository": 1.0}


@pytest.mark.parametrize(("suffix", "fragment"), [
    ("/missing", "not found in repository"),
    ("/demo-v1/data-00000.bin", "not found in repository"),
])
async def test_a_bad_url_is_a_400_and_an_unreachable_one_a_503_with_the_reason(fresh, tmp_path, suffix, fragment):
    async with running_node(tmp_path / "node", store__fetch_retries=0) as node:
        body = {"name": "m", "checkpoint": fresh.url + suffix}
        async with node.http.post(f"{node.url}/admin/models", json=body) as response:
            reply = await response.json()
        assert response.status == 400 and reply["error"]["param"] == "checkpoint"
        assert fragment in reply["error"]["message"]
        body = {"name": "m", "checkpoint": f"http://127.0.0.1:{free_port()}/m"}
        async with node.http.post(f"{node.url}/admin/models", json=body) as response:
            reply = await response.json()
        # Unreachable is no fault of the request: a 503 (Retry-After) that a later attempt may get past.
        assert response.status == 503 and "gave up" in reply["error"]["message"]
        assert reply["error"]["code"] == "repository_unreachable" and response.headers["Retry-After"] == "10"


async def test_deploying_a_corrupt_v1_dir_is_a_400(v1_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(v1_dir, bad)
    with open(bad / "data-00000.bin", "r+b") as f:
        f.write(b"\xff" * 8)
    async with running_node(tmp_path / "node") as node, aiohttp.ClientSession() as http:
        body = {"name": "m", "checkpoint": str(bad)}
        async with http.post(f"{node.url}/admin/models", json=body) as response:
            reply = await response.json()
        assert response.status == 400 and "checksum mismatch in data-00000.bin" in reply["error"]["message"]
        assert node.node.worker.store.entries() == []
