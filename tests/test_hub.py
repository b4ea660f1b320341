"""The Hugging Face Hub client (sllmd/checkpoint/hub.py) against a real local Hub stand-in
(tests/hub_server.py) through huggingface_hub's own code: parsing Hub ids, resolving revisions, error
mapping, snapshot and single-file downloads into the HF cache, progress, resuming cut transfers, tokens."""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import pytest_asyncio
from huggingface_hub import HfApi, RepoFile, RepoFolder, constants
from safetensors.numpy import save as save_safetensors

from sllmd.checkpoint.hub import download, list_files, read_file, resolve, select_model_files
from sllmd.checkpoint.hub_ref import HubRef, parse_hub_ref
from sllmd.checkpoint.url_fetch import FetchError, RepositoryNotFound, RepositoryUnreachable
from tests.hub_server import HubServer, private_hf_home
from tests.nodes import free_port

REPO = "sllmd-test/tiny-model"
WEIGHTS = "model.safetensors"
MODEL_FILES = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "chat_template.jinja", "merges.txt", WEIGHTS}
CUT = 1 << 20


@pytest.fixture(scope="module")
def model_files() -> dict[str, bytes]:
    """A small fake model repo: a ~4 MB safetensors, a pickled copy that must not be fetched, tokenizer and
    chat template files, and files a causal LM does not need (README, a sub-folder)."""
    rng = np.random.default_rng(0)
    weights = save_safetensors({"embed.weight": rng.standard_normal((1024, 512), dtype=np.float32),
                                "lm_head.weight": rng.standard_normal((512, 256), dtype=np.float32)})
    return {
        "config.json": json.dumps({"model_type": "llama", "hidden_size": 512}).encode(),
        "generation_config.json": b'{"eos_token_id": 2}',
        "tokenizer.json": json.dumps({"version": "1.0", "model": {"type": "BPE"}}).encode(),
        "tokenizer_config.json": b'{"model_max_length": 2048}',
        "chat_template.jinja": b"{% for m in messages %}{{ m.content }}{% endfor %}",
        "merges.txt": b"#version: 0.2\na b\n",
        WEIGHTS: weights,
        "pytorch_model.bin": b"\x80\x02pickled weights",
        "README.md": b"# tiny model\n",
        "onnx/model.onnx": b"onnx bytes",
        "onnx/config.json": b"{}",
    }


@pytest.fixture(autouse=True)
def hf_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return private_hf_home(tmp_path / "hf-home", monkeypatch)


@pytest_asyncio.fixture
async def hub(model_files: dict[str, bytes]) -> AsyncIterator[HubServer]:
    async with HubServer() as server:
        server.add_repo(REPO, model_files)
        yield server


def weight_gets(hub: HubServer, name: str = WEIGHTS) -> list[str | None]:
    return hub.ranges(name)


def range_start(header: str | None) -> int:
    assert header is not None and header.startswith("bytes=") and header.endswith("-"), header
    return int(header[len("bytes=") : -1])


# ---- parsing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "ref"), [
    ("Qwen/Qwen2.5-0.5B-Instruct", HubRef("Qwen/Qwen2.5-0.5B-Instruct")),
    ("Qwen/Qwen2.5-0.5B-Instruct@v1.0", HubRef("Qwen/Qwen2.5-0.5B-Instruct", "v1.0")),
    ("  org/name@0123456789abcdef0123456789abcdef01234567 ",
     HubRef("org/name", "0123456789abcdef0123456789abcdef01234567")),
    ("org/name/model-Q4_K_M.gguf", HubRef("org/name", None, "model-Q4_K_M.gguf")),
    ("org/name/model-Q4_K_M.gguf@main", HubRef("org/name", "main", "model-Q4_K_M.gguf")),
    ("hf://gpt2", HubRef("gpt2")),
    ("hf://gpt2@main", HubRef("gpt2", "main")),
    ("hf://org/name", HubRef("org/name")),
    ("hf://org/name@refs/pr/3", HubRef("org/name", "refs/pr/3")),
    ("hf://org/name/sub/dir/model.Q8_0.gguf@v2", HubRef("org/name", "v2", "sub/dir/model.Q8_0.gguf")),
    ("hf://org/name/config.json", HubRef("org/name", None, "config.json")),
])
def test_parse_hub_ref_forms_and_round_trip(text: str, ref: HubRef) -> None:
    assert parse_hub_ref(text) == ref
    assert parse_hub_ref(ref.source) == ref
    assert ref.source.startswith("hf://") and str(ref) == ref.source


def test_source_spelling() -> None:
    assert HubRef("org/name").source == "hf://org/name"
    assert HubRef("org/name", "main").source == "hf://org/name@main"
    assert HubRef("org/name", "abc", "q/m.gguf").source == "hf://org/name/q/m.gguf@abc"


@pytest.mark.parametrize("text", [
    "", "gpt2", "/abs/org/name", "./org/name", "../org/name", "~/org/name", "\\\\host\\share/x",
    "https://huggingface.co/org/name", "s3://bucket/org/name", "file:///x/y",
    "org/name/config.json", "org/name/sub/model.gguf", "org//name", "org/",
])
def test_not_hub_shaped_is_none(text: str) -> None:
    assert parse_hub_ref(text) is None


@pytest.mark.parametrize(("text", "reason"), [
    ("hf://", "hf://ORG/NAME"),
    ("hf://org/name/", "hf://ORG/NAME"),
    ("hf://org//name", "hf://ORG/NAME"),
    ("hf://org/name@", "empty revision"),
    ("org/name@", "empty revision"),
    ("hf://org/name@a branch", "without spaces"),
    ("org/na me", "invalid Hub repo id"),
    ("org--x/name", "invalid Hub repo id"),
    ("org/name.git", "invalid Hub repo id"),
    ("hf://org/name/../x.gguf", "invalid file path"),
    ("hf://org/name/./x.gguf", "invalid file path"),
])
def test_invalid_hub_text_raises_one_line(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason) as info:
        parse_hub_ref(text)
    assert "\n" not in str(info.value)


def test_hub_ref_validates_itself() -> None:
    with pytest.raises(ValueError, match="ORG/NAME"):
        HubRef("gpt2", None, "x.gguf")  # would read back as the repo gpt2/x.gguf
    with pytest.raises(ValueError, match="revision"):
        HubRef("org/name", "")
    with pytest.raises(ValueError, match="file path"):
        HubRef("org/name", None, "a@b.gguf")  # '@' starts the revision


def test_select_model_files() -> None:
    files = ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
             "model.safetensors.index.json", "pytorch_model.bin", "README.md", "onnx/model.onnx",
             "tokenizer.model", "qwen.tiktoken", "original/params.json"]
    assert select_model_files(files) == ["config.json", "model-00001-of-00002.safetensors",
                                         "model-00002-of-00002.safetensors", "model.safetensors.index.json",
                                         "qwen.tiktoken", "tokenizer.model"]
    assert select_model_files({"config.json": 2, "pytorch_model.bin": 9, "training_args.json": 1}) == [
        "config.json", "pytorch_model.bin", "training_args.json"]


# ---- resolving and errors --------------------------------------------------------------------------


async def test_resolve_branches_and_shas(hub: HubServer, model_files: dict[str, bytes]) -> None:
    main = hub.add_repo(REPO, model_files)  # a second commit on main
    pr = hub.add_repo(REPO, {**model_files, "config.json": b"{}"}, branch="refs/pr/1")
    assert main != pr and len(main) == 40
    assert await asyncio.to_thread(resolve, HubRef(REPO), endpoint=hub.endpoint) == HubRef(REPO, main)
    assert await asyncio.to_thread(resolve, HubRef(REPO, "main"), endpoint=hub.endpoint) == HubRef(REPO, main)
    assert (await asyncio.to_thread(resolve, HubRef(REPO, "refs/pr/1"), endpoint=hub.endpoint)).revision == pr
    assert (await asyncio.to_thread(resolve, HubRef(REPO, pr), endpoint=hub.endpoint)).revision == pr
    file_ref = HubRef(REPO, "main", "config.json")
    assert await asyncio.to_thread(resolve, file_ref, endpoint=hub.endpoint) == HubRef(REPO, main, "config.json")
    assert await asyncio.to_thread(read_file, HubRef(REPO, "refs/pr/1"), "config.json", endpoint=hub.endpoint) \
        == b"{}"


async def test_wrong_revision_is_not_found_naming_it(hub: HubServer) -> None:
    with pytest.raises(RepositoryNotFound, match=f"revision 'no-such-branch' not found in repo {REPO}"):
        await asyncio.to_thread(resolve, HubRef(REPO, "no-such-branch"), endpoint=hub.endpoint)
    with pytest.raises(RepositoryNotFound, match="revision 'v9' not found"):
        await asyncio.to_thread(download, HubRef(REPO, "v9"), endpoint=hub.endpoint)


async def test_unknown_repo_and_file_are_not_found(hub: HubServer) -> None:
    with pytest.raises(RepositoryNotFound, match="repo sllmd-test/nothing not found") as info:
        await asyncio.to_thread(resolve, HubRef("sllmd-test/nothing"), endpoint=hub.endpoint)
    assert "\n" not in str(info.value)
    with pytest.raises(RepositoryNotFound, match=r"file 'missing\.gguf' not found in repo"):
        await asyncio.to_thread(resolve, HubRef(REPO, None, "missing.gguf"), endpoint=hub.endpoint)
    with pytest.raises(RepositoryNotFound, match=r"file 'missing\.json' not found"):
        await asyncio.to_thread(read_file, HubRef(REPO), "missing.json", endpoint=hub.endpoint)


async def test_unreachable_hub(hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(RepositoryUnreachable, match="unreachable"):
        await asyncio.to_thread(resolve, HubRef(REPO), endpoint=f"http://127.0.0.1:{free_port()}")
    await hub.close()
    with pytest.raises(RepositoryUnreachable, match="unreachable") as info:
        await asyncio.to_thread(download, HubRef(REPO), endpoint=hub.endpoint)
    assert "\n" not in str(info.value)
    await hub.start()  # the same port again
    with monkeypatch.context() as offline:
        offline.setattr(constants, "HF_HUB_OFFLINE", True)
        with pytest.raises(RepositoryUnreachable, match="HF_HUB_OFFLINE"):
            await asyncio.to_thread(resolve, HubRef(REPO), endpoint=hub.endpoint)
    hub.fail(503)
    with pytest.raises(RepositoryUnreachable, match="HTTP 503"):
        await asyncio.to_thread(resolve, HubRef(REPO), endpoint=hub.endpoint)
    hub.fail(400)
    with pytest.raises(FetchError) as info:
        await asyncio.to_thread(resolve, HubRef(REPO), endpoint=hub.endpoint)
    assert type(info.value) is FetchError
    hub.recover()
    assert (await asyncio.to_thread(resolve, HubRef(REPO), endpoint=hub.endpoint)).revision


async def test_list_and_read_files(hub: HubServer, model_files: dict[str, bytes]) -> None:
    assert await asyncio.to_thread(list_files, HubRef(REPO), endpoint=hub.endpoint) == {
        name: len(data) for name, data in model_files.items()}
    assert await asyncio.to_thread(read_file, HubRef(REPO), "config.json", endpoint=hub.endpoint) \
        == model_files["config.json"]
    with pytest.raises(FetchError, match="over the 4-byte limit"):
        await asyncio.to_thread(read_file, HubRef(REPO), "tokenizer.json", endpoint=hub.endpoint, max_bytes=4)


# ---- downloads -------------------------------------------------------------------------------------


async def test_snapshot_download(hub: HubServer, model_files: dict[str, bytes], hf_env: Path) -> None:
    calls: list[tuple[int, int]] = []
    ref = HubRef(REPO)
    path = await asyncio.to_thread(download, ref, endpoint=hub.endpoint, progress=lambda *a: calls.append(a))
    sha = (await asyncio.to_thread(resolve, ref, endpoint=hub.endpoint)).revision
    assert path == hf_env / "models--sllmd-test--tiny-model" / "snapshots" / sha  # huggingface_hub's cache layout
    assert {p.name for p in path.iterdir()} == MODEL_FILES
    for name in MODEL_FILES:
        assert (path / name).read_bytes() == model_files[name], name
    for name in ("pytorch_model.bin", "README.md", "onnx/model.onnx", "onnx/config.json"):
        assert hub.ranges(name) == [] and hub.ranges(name, "HEAD") == [], name
    total = sum(len(model_files[name]) for name in MODEL_FILES)
    assert calls[0] == (0, total) and calls[-1] == (total, total)
    assert all(b[0] > a[0] and b[1] == total for a, b in itertools.pairwise(calls)), calls
    assert len(calls) > 4  # bytes reported as they land, not once at the end

    # a second call finds everything in the cache: no file is fetched again
    hub.requests.clear()
    calls.clear()
    again = await asyncio.to_thread(download, ref, endpoint=hub.endpoint, progress=lambda *a: calls.append(a))
    assert again == path and calls == [(total, total)]
    assert [r for r in hub.requests if "/resolve/" in r[1]] == []


async def test_bin_weights_only_without_safetensors_and_index_narrows(hub: HubServer) -> None:
    hub.add_repo("org/old", {"config.json": b"{}", "pytorch_model.bin": b"pickle", "training_args.bin": b"x"})
    path = await asyncio.to_thread(download, HubRef("org/old"), endpoint=hub.endpoint)
    assert {p.name for p in path.iterdir()} == {"config.json", "pytorch_model.bin", "training_args.bin"}

    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                            "b": "model-00002-of-00002.safetensors"}}
    hub.add_repo("org/sharded", {"config.json": b"{}", "model.safetensors.index.json": json.dumps(index).encode(),
                                 "model-00001-of-00002.safetensors": b"1" * 100,
                                 "model-00002-of-00002.safetensors": b"2" * 100,
                                 "consolidated.safetensors": b"3" * 200, "pytorch_model.bin": b"4"})
    path = await asyncio.to_thread(download, HubRef("org/sharded"), endpoint=hub.endpoint)
    assert {p.name for p in path.iterdir()} == {"config.json", "model.safetensors.index.json",
                                                "model-00001-of-00002.safetensors",
                                                "model-00002-of-00002.safetensors"}


async def test_serves_a_directory(hub: HubServer, model_files: dict[str, bytes], tmp_path: Path) -> None:
    src = tmp_path / "model"
    for name, data in model_files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    sha = hub.add_repo("org/from-dir", src, branch="v1")
    ref = HubRef("org/from-dir", "v1")
    assert await asyncio.to_thread(list_files, ref, endpoint=hub.endpoint) == {
        name: len(data) for name, data in model_files.items()}
    path = await asyncio.to_thread(download, ref, endpoint=hub.endpoint)
    assert path.name == sha and {p.name for p in path.iterdir()} == MODEL_FILES
    assert (path / WEIGHTS).read_bytes() == model_files[WEIGHTS]


async def test_snapshot_of_a_gguf_repo_names_a_file(hub: HubServer) -> None:
    hub.add_repo("org/m-GGUF", {"README.md": b"", "m-Q4_K_M.gguf": b"GGUF", "m-Q8_0.gguf": b"GGUF"})
    with pytest.raises(FetchError, match=r"no \*\.safetensors.*hf://org/m-GGUF/m-Q4_K_M\.gguf@"):
        await asyncio.to_thread(download, HubRef("org/m-GGUF"), endpoint=hub.endpoint)


async def test_gguf_file_ref_downloads_just_that_file(hub: HubServer, hf_env: Path) -> None:
    gguf = b"GGUF" + bytes(range(256)) * 8000
    hub.add_repo("org/m-GGUF", {"README.md": b"", "config.json": b"{}", "m-Q4_K_M.gguf": gguf,
                                "m-Q8_0.gguf": b"GGUF" + b"\0" * 100})
    ref = parse_hub_ref("org/m-GGUF/m-Q4_K_M.gguf")
    assert ref is not None
    calls: list[tuple[int, int]] = []
    path = await asyncio.to_thread(download, ref, endpoint=hub.endpoint, progress=lambda *a: calls.append(a))
    assert path.name == "m-Q4_K_M.gguf" and path.read_bytes() == gguf
    assert path.is_relative_to(hf_env)
    assert calls[0] == (0, len(gguf)) and calls[-1] == (len(gguf), len(gguf))
    assert [r[1].rsplit("/", 1)[1] for r in hub.requests if r[0] == "GET" and "/resolve/" in r[1]] \
        == ["m-Q4_K_M.gguf"]


async def test_cut_transfer_resumes_within_one_call(hub: HubServer, model_files: dict[str, bytes]) -> None:
    hub.cut_after(WEIGHTS, CUT)
    calls: list[tuple[int, int]] = []
    path = await asyncio.to_thread(download, HubRef(REPO), endpoint=hub.endpoint,
                                   progress=lambda *a: calls.append(a))
    assert (path / WEIGHTS).read_bytes() == model_files[WEIGHTS]
    first, second = weight_gets(hub)
    assert first is None and 0 < range_start(second) <= CUT
    assert all(b[0] > a[0] for a, b in itertools.pairwise(calls)) and calls[-1][0] == calls[-1][1]


async def test_failed_call_keeps_finished_files_and_next_call_completes(
        hub: HubServer, model_files: dict[str, bytes], hf_env: Path) -> None:
    """A cut transfer whose retry gets a 503 fails the call (huggingface_hub does not retry a 5xx on a
    download GET). huggingface_hub 2.4 deletes the partial file then (its temporary name is unique to the
    call), so the next call restarts that file from byte 0; the files the first call finished are kept."""
    ref = HubRef(REPO)
    hub.cut_after(WEIGHTS, CUT, then_fail=503)
    with pytest.raises(RepositoryUnreachable, match="503"):
        await asyncio.to_thread(download, ref, endpoint=hub.endpoint)
    snapshot = next((hf_env / "models--sllmd-test--tiny-model" / "snapshots").iterdir())
    assert (snapshot / "config.json").read_bytes() == model_files["config.json"]
    assert not (snapshot / WEIGHTS).exists()
    assert list(hf_env.rglob("*.incomplete")) == []
    assert [r is not None and range_start(r) > 0 for r in weight_gets(hub)] == [False, True]

    hub.recover()
    hub.requests.clear()
    path = await asyncio.to_thread(download, ref, endpoint=hub.endpoint)
    assert (path / WEIGHTS).read_bytes() == model_files[WEIGHTS]
    assert weight_gets(hub) == [None]  # from byte 0 again: huggingface_hub 2.4 does not resume across calls
    assert hub.ranges("config.json") == [] and hub.ranges("config.json", "HEAD") == []  # kept from the first call


async def test_token(model_files: dict[str, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    async with HubServer(token="s3cret") as hub:
        hub.add_repo(REPO, {"config.json": b"{}", WEIGHTS: model_files[WEIGHTS]})
        with pytest.raises(RepositoryNotFound, match="HTTP 401"):
            await asyncio.to_thread(resolve, HubRef(REPO), endpoint=hub.endpoint)
        with pytest.raises(RepositoryNotFound, match="HTTP 401"):
            await asyncio.to_thread(download, HubRef(REPO), endpoint=hub.endpoint, token="wrong")
        path = await asyncio.to_thread(download, HubRef(REPO), endpoint=hub.endpoint, token="s3cret")
        assert (path / WEIGHTS).read_bytes() == model_files[WEIGHTS]
        monkeypatch.setenv("HF_TOKEN", "s3cret")  # huggingface_hub reads HF_TOKEN on every call
        assert await asyncio.to_thread(read_file, HubRef(REPO), "config.json", endpoint=hub.endpoint) == b"{}"


async def test_bars_only_with_show_bar(hub: HubServer, capfd: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TQDM_POSITION", "-1")  # huggingface_hub draws its bars even without a TTY
    # and whatever earlier tests did to its process-wide switch (transformers' disable_progress_bar() turns
    # off huggingface_hub's bars too, as sllmd's engines do) is undone
    hf_bars = sys.modules["huggingface_hub.utils.tqdm"]
    monkeypatch.setattr(hf_bars, "progress_bar_states", {})
    monkeypatch.setattr(hf_bars, "HF_HUB_DISABLE_PROGRESS_BARS", None)
    await asyncio.to_thread(download, HubRef(REPO), endpoint=hub.endpoint)
    assert "Fetching" not in capfd.readouterr().err
    hub.add_repo(REPO, {"config.json": b"{}", WEIGHTS: b"\0" * 1000})
    await asyncio.to_thread(download, HubRef(REPO), endpoint=hub.endpoint, show_bar=True)
    assert "Fetching 2 files" in capfd.readouterr().err


# ---- the server itself -----------------------------------------------------------------------------


async def test_server_ranges_errors_and_tree_pages(hub: HubServer, model_files: dict[str, bytes]) -> None:
    sha = hub.add_repo(REPO, model_files)
    base = f"{hub.endpoint}/{REPO}/resolve"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/main/config.json", headers={"Range": "bytes=2-5"}) as r:
            assert r.status == 206 and await r.read() == model_files["config.json"][2:6]
            assert r.headers["Content-Range"] == f"bytes 2-5/{len(model_files['config.json'])}"
            assert r.headers["X-Repo-Commit"] == sha
        async with http.get(f"{base}/{sha}/config.json", headers={"Range": "bytes=-3"}) as r:
            assert r.status == 206 and await r.read() == model_files["config.json"][-3:]
        async with http.get(f"{base}/main/config.json", headers={"Range": "bytes=9999-"}) as r:
            assert r.status == 416
        async with http.head(f"{base}/main/{WEIGHTS}") as r:
            assert r.status == 200 and int(r.headers["Content-Length"]) == len(model_files[WEIGHTS])
            assert len(r.headers["ETag"].strip('"')) == 64  # an LFS file: its sha256
        for url, code in ((f"{base}/main/nothing", "EntryNotFound"), (f"{base}/nope/config.json", "RevisionNotFound"),
                          (f"{hub.endpoint}/org/none/resolve/main/config.json", "RepoNotFound")):
            async with http.head(url) as r:
                assert (r.status, r.headers["X-Error-Code"]) == (404, code)

    hub.page_size = 2
    api = HfApi(endpoint=hub.endpoint)
    tree = await asyncio.to_thread(lambda: list(api.list_repo_tree(REPO, recursive=True, revision=sha)))
    assert {e.path for e in tree if isinstance(e, RepoFile)} == set(model_files)
    assert [e.path for e in tree if isinstance(e, RepoFolder)] == ["onnx"]
    top = await asyncio.to_thread(lambda: list(api.list_repo_tree(REPO)))
    assert {e.path for e in top} == {name for name in model_files if "/" not in name} | {"onnx"}
    sub = await asyncio.to_thread(lambda: list(api.list_repo_tree(REPO, "onnx")))
    assert {e.path for e in sub} == {"onnx/model.onnx", "onnx/config.json"}
    info = await asyncio.to_thread(api.model_info, REPO, files_metadata=True)
    assert info.sha == sha and {s.rfilename: s.size for s in info.siblings or []} == {
        name: len(data) for name, data in model_files.items()}
