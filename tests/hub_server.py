"""A local stand-in for the Hugging Face Hub (a test helper, not a test module): a real aiohttp server on
127.0.0.1 that speaks the part of the Hub's HTTP API huggingface_hub 2.4 uses to resolve, list and download
model repos, so its real `HfApi.model_info` / `repo_info`, `list_repo_tree`, `snapshot_download` and
`hf_hub_download` run against it (pass `endpoint=hub.endpoint`, or set HF_ENDPOINT before importing it).

Routes (REPO is ORG/NAME or a single name; REV a branch or a commit sha, percent-encoded as the client does):
* `GET /api/models/REPO` and `GET /api/models/REPO/revision/REV[?blobs=true]`: the model info JSON (`id`,
  `sha`, `siblings` with `rfilename`, and with `blobs` also `size`, `blobId`, `lfs`);
* `GET /api/models/REPO/tree/REV[/PATH][?recursive=true]`: the tree entries (`type`, `oid`, `size`, `path`,
  `lfs`), `page_size` per page, the next page in a `Link: <url>; rel="next"` header;
* `HEAD` and `GET /REPO/resolve/REV/PATH`: the file, with `X-Repo-Commit`, `ETag` (the LFS sha256 for weight
  files, else the git blob id), `Content-Length`, `Accept-Ranges: bytes`; a `Range: bytes=a-b` / `a-` / `-n`
  gets 206 with `Content-Range`, an unsatisfiable one 416. No Xet headers and no CDN redirect, so
  huggingface_hub downloads with plain HTTP GETs from this server.
Errors carry the `X-Error-Code` header huggingface_hub's `hf_raise_for_status` reads: `RepoNotFound` (404, or
401 when a token is required and missing or wrong), `RevisionNotFound` (404), `EntryNotFound` (404, with
`X-Repo-Commit`), plus `X-Error-Message` and a JSON `{"error": ...}` body.

Fault injection: `cut_after` (send part of a file, then close the connection), `hold_after` (send part of a
file, then wait for a go-ahead), `fail` / `recover` (answer every request, or those for one file, with a
status), and `requests` to see what the client sent.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

import pytest
from aiohttp import web
from huggingface_hub import constants

# Files the Hub would keep in LFS: their ETag is the content's sha256, the tree lists an `lfs` entry.
LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".onnx", ".msgpack", ".h5", ".ckpt")
LFS_MIN_BYTES = 10 << 20
_PIECE = 1 << 20  # a response body is written this much at a time
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


@dataclass(frozen=True)
class _Blob:
    """One file's content, in memory or on disk, with the ids the Hub gives it."""

    size: int
    sha256: str
    git_oid: str  # git blob sha1 of the content, or of its LFS pointer
    lfs: bool
    data: bytes | None = None
    path: Path | None = None

    @classmethod
    def of(cls, name: str, data: bytes | None = None, path: Path | None = None) -> _Blob:
        sha256, size = hashlib.sha256(), 0
        if data is not None:
            sha256.update(data)
            size = len(data)
        else:
            assert path is not None
            with path.open("rb") as f:
                while piece := f.read(_PIECE):
                    sha256.update(piece)
                    size += len(piece)
        lfs = name.endswith(LFS_SUFFIXES) or size >= LFS_MIN_BYTES
        if lfs:
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256.hexdigest()}\nsize {size}\n"
            git_oid = _git_blob_oid(pointer.encode())
        elif data is not None:
            git_oid = _git_blob_oid(data)
        else:
            assert path is not None
            git_oid = _git_blob_oid(path.read_bytes())
        return cls(size, sha256.hexdigest(), git_oid, lfs, data, path)

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.git_oid

    @property
    def pointer_size(self) -> int:
        return len(f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {self.size}\n")

    def read(self, lo: int, hi: int) -> bytes:
        """Bytes [lo, hi) of the content."""
        if self.data is not None:
            return self.data[lo:hi]
        assert self.path is not None
        with self.path.open("rb") as f:
            f.seek(lo)
            return f.read(hi - lo)


def _git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class _Commit:
    sha: str
    files: dict[str, _Blob]


@dataclass
class _Repo:
    commits: dict[str, _Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)

    def commit(self, revision: str) -> _Commit | None:
        sha = self.branches.get(revision, revision)
        return self.commits.get(sha)


class _HubError(Exception):
    def __init__(self, status: int, code: str | None, message: str, commit: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.commit = status, code, message, commit


class HubServer:
    """The fake Hub. `async with HubServer() as hub:` serves on 127.0.0.1 at a free port until the block ends;
    `add_repo` works before or after the start. With `token`, every request needs `Authorization: Bearer
    <token>` (else 401 RepoNotFound, as the Hub answers for a private repo)."""

    def __init__(self, *, token: str | None = None, page_size: int = 1000) -> None:
        self.token = token
        self.page_size = page_size  # tree entries per page (the Hub: 1000)
        self.requests: list[tuple[str, str, str | None]] = []  # (method, decoded URL path, Range header)
        self._repos: dict[str, _Repo] = {}
        self._cuts: dict[str, list[int]] = {}  # file path → [bytes to send, times left, status to fail with after]
        self._fail_all: int | None = None
        self._fail_file: dict[str, int] = {}
        self._holds: dict[str, tuple[int, asyncio.Event]] = {}  # file path → (bytes to send first, go-ahead)
        self._runner: web.AppRunner | None = None
        self._port: int | None = None

    # ---- setup ----

    def add_repo(self, repo_id: str, files: dict[str, bytes] | Path, *, branch: str = "main") -> str:
        """Commit `files` (path in repo → content, or a directory whose files are read from disk when served)
        as the whole content of `branch` of `repo_id`, creating the repo if needed; return the commit sha.
        The sha is a function of the files and the branch's previous commit."""
        if isinstance(files, Path):
            blobs = {p.relative_to(files).as_posix(): _Blob.of(p.name, path=p)
                     for p in sorted(files.rglob("*")) if p.is_file()}
        else:
            blobs = {name: _Blob.of(name, data=data) for name, data in files.items()}
        repo = self._repos.setdefault(repo_id, _Repo())
        parent = repo.branches.get(branch, "")
        digest = hashlib.sha1(parent.encode())
        for name in sorted(blobs):
            digest.update(f"{name}\0{blobs[name].git_oid}\n".encode())
        sha = digest.hexdigest()
        repo.commits[sha] = _Commit(sha, blobs)
        repo.branches[branch] = sha
        return sha

    @property
    def endpoint(self) -> str:
        if self._port is None:
            raise RuntimeError("the hub server is not started")
        return f"http://127.0.0.1:{self._port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self._port or 0).start()
        self._port = self._runner.addresses[0][1]

    async def close(self) -> None:
        """Stop serving (connections are refused after this); `start` again serves on the same port."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> HubServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- fault injection ----

    def cut_after(self, path: str, num_bytes: int, times: int = 1, *, then_fail: int | None = None) -> None:
        """The next `times` GETs of file `path` (of any repo) send `num_bytes` of their body, then the
        connection closes: the client sees a truncated body. After the last cut, with `then_fail`, every
        request for that file answers that status (as `fail(then_fail, path=path)`)."""
        self._cuts[path] = [num_bytes, times, then_fail or 0]

    def hold_after(self, path: str, num_bytes: int) -> asyncio.Event:
        """The next GET of file `path` sends `num_bytes` of its body, then waits until the returned event is set
        before it sends the rest (a download caught midway, to look at its progress)."""
        gate = self._holds[path] = (num_bytes, asyncio.Event())
        return gate[1]

    def fail(self, status: int, *, path: str | None = None) -> None:
        """Answer every request (or every request for file `path`) with `status` until `recover`."""
        if path is None:
            self._fail_all = status
        else:
            self._fail_file[path] = status

    def recover(self) -> None:
        """Undo `fail` and pending `cut_after`s."""
        self._fail_all = None
        self._fail_file.clear()
        self._cuts.clear()

    def ranges(self, path: str, method: str = "GET") -> list[str | None]:
        """The Range headers of the `method` requests of file `path` seen so far, in order (None: no Range)."""
        return [rng for m, url, rng in self.requests if m == method and "/resolve/" in url and url.endswith("/" + path)]

    # ---- serving ----

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        segments = [unquote(s) for s in request.rel_url.raw_path.split("/")[1:]]
        self.requests.append((request.method, "/" + "/".join(segments), request.headers.get("Range")))
        try:
            self._check_auth(request)
            if self._fail_all is not None:
                raise _HubError(self._fail_all, None, "injected failure")
            if segments[:2] == ["api", "models"] and request.method in ("GET", "HEAD"):
                return self._api(request, segments[2:])
            if "resolve" in segments[1:3] and request.method in ("GET", "HEAD"):
                return await self._resolve(request, segments)
            raise _HubError(404, None, "Not Found")
        except _HubError as exc:
            headers = {"X-Error-Message": exc.message}
            if exc.code is not None:
                headers["X-Error-Code"] = exc.code
            if exc.commit is not None:
                headers["X-Repo-Commit"] = exc.commit
            return web.json_response({"error": exc.message}, status=exc.status, headers=headers)

    def _check_auth(self, request: web.Request) -> None:
        if self.token is None:
            return
        auth = request.headers.get("Authorization")
        if auth != f"Bearer {self.token}":
            message = "Invalid credentials in Authorization header" if auth else "Repository not found"
            raise _HubError(401, "RepoNotFound", message)

    def _repo(self, segments: list[str]) -> tuple[str, _Repo, list[str]]:
        """(repo id, repo, the segments after it) for segments starting with a repo id of 1 or 2 parts."""
        for n in (2, 1):
            repo_id = "/".join(segments[:n])
            if len(segments) >= n and repo_id in self._repos:
                return repo_id, self._repos[repo_id], segments[n:]
        raise _HubError(404, "RepoNotFound", "Repository not found")

    def _commit(self, repo_id: str, repo: _Repo, revision: str) -> _Commit:
        commit = repo.commit(revision)
        if commit is None:
            raise _HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return commit

    def _api(self, request: web.Request, segments: list[str]) -> web.Response:
        repo_id, repo, rest = self._repo(segments)
        if not rest or rest[0] == "revision":
            commit = self._commit(repo_id, repo, "/".join(rest[1:]) if rest else "main")
            return web.json_response(self._model_info(repo_id, commit, request.query.get("blobs") == "true"))
        if rest[0] == "tree" and len(rest) >= 2:
            commit = self._commit(repo_id, repo, rest[1])
            return self._tree(request, repo_id, commit, "/".join(rest[2:]))
        raise _HubError(404, None, "Not Found")

    @staticmethod
    def _model_info(repo_id: str, commit: _Commit, blobs: bool) -> dict[str, object]:
        siblings: list[dict[str, object]] = []
        for name, blob in sorted(commit.files.items()):
            sibling: dict[str, object] = {"rfilename": name}
            if blobs:
                sibling |= {"size": blob.size, "blobId": blob.git_oid}
                if blob.lfs:
                    sibling["lfs"] = {"sha256": blob.sha256, "size": blob.size, "pointerSize": blob.pointer_size}
            siblings.append(sibling)
        return {"_id": hashlib.md5(repo_id.encode()).hexdigest()[:24], "id": repo_id, "modelId": repo_id,
                "author": repo_id.split("/")[0] if "/" in repo_id else None, "sha": commit.sha,
                "lastModified": "2025-01-01T00:00:00.000Z", "private": False, "gated": False, "disabled": False,
                "downloads": 0, "likes": 0, "tags": [], "library_name": "transformers", "siblings": siblings}

    def _tree(self, request: web.Request, repo_id: str, commit: _Commit, path: str) -> web.Response:
        recursive = request.query.get("recursive", "false").lower() in ("true", "1")
        folders = {"/".join(name.split("/")[:k]) for name in commit.files for k in range(1, name.count("/") + 1)}
        if path and path not in folders:
            raise _HubError(404, "EntryNotFound", f"{path} does not exist on {commit.sha}", commit.sha)
        prefix = path + "/" if path else ""
        entries: dict[str, dict[str, object]] = {}

        def add_folder(folder: str) -> None:
            entries.setdefault(folder, {"type": "directory", "oid": _git_blob_oid(folder.encode()), "size": 0,
                                        "path": folder})

        for name, blob in sorted(commit.files.items()):
            if not name.startswith(prefix):
                continue
            parts = name[len(prefix) :].split("/")
            if len(parts) > 1 and not recursive:
                add_folder(prefix + parts[0])
                continue
            for k in range(1, len(parts)):
                add_folder(prefix + "/".join(parts[:k]))
            entry: dict[str, object] = {"type": "file", "oid": blob.git_oid, "size": blob.size, "path": name}
            if blob.lfs:
                entry["lfs"] = {"oid": blob.sha256, "size": blob.size, "pointerSize": blob.pointer_size}
            entries[name] = entry
        listing = list(entries.values())
        start = int(request.query.get("cursor", "0"))
        headers = {}
        if start + self.page_size < len(listing):
            query = {k: v for k, v in request.query.items() if k != "cursor"} | {"cursor": str(start + self.page_size)}
            headers["Link"] = f'<{request.url.with_query(query)}>; rel="next"'
        return web.json_response(listing[start : start + self.page_size], headers=headers)

    async def _resolve(self, request: web.Request, segments: list[str]) -> web.StreamResponse:
        repo_id, repo, rest = self._repo(segments)
        if len(rest) < 3 or rest[0] != "resolve":
            raise _HubError(404, None, "Not Found")
        commit = self._commit(repo_id, repo, rest[1])
        path = "/".join(rest[2:])
        if path in self._fail_file:
            raise _HubError(self._fail_file[path], None, "injected failure")
        blob = commit.files.get(path)
        if blob is None:
            raise _HubError(404, "EntryNotFound", f"{path} does not exist on {commit.sha}", commit.sha)
        lo, hi, status = 0, blob.size, 200
        headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{blob.etag}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if (range_header := request.headers.get("Range")) is not None:
            lo, hi = self._range(range_header, blob.size)
            status = 206
            headers["Content-Range"] = f"bytes {lo}-{hi - 1}/{blob.size}"
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = hi - lo
        await response.prepare(request)
        if request.method == "GET":
            cut = self._cuts.get(path)
            if cut is not None and cut[1] > 0:
                cut[1] -= 1
                if cut[1] == 0:
                    del self._cuts[path]
                    if cut[2]:
                        self._fail_file[path] = cut[2]
                await self._write(response, blob, lo, min(hi, lo + cut[0]))
                await asyncio.sleep(0.1)  # let the client read what was sent before the connection goes
                assert request.transport is not None
                request.transport.close()
                return response
            hold = self._holds.pop(path, None)
            if hold is not None:
                await self._write(response, blob, lo, min(hi, lo + hold[0]))
                await hold[1].wait()
                lo = min(hi, lo + hold[0])
            await self._write(response, blob, lo, hi)
        await response.write_eof()
        return response

    @staticmethod
    def _range(header: str, size: int) -> tuple[int, int]:
        """[lo, hi) of a single-range `Range` header; 416 if unsatisfiable."""
        match = _RANGE.fullmatch(header.strip())
        if match is None or match[1] == match[2] == "":
            raise _HubError(416, None, f"unsupported Range {header!r}")
        if match[1] == "":
            lo, hi = max(size - int(match[2]), 0), size
        else:
            lo = int(match[1])
            hi = min(int(match[2]) + 1, size) if match[2] else size
        if lo >= size or lo >= hi:
            raise _HubError(416, None, f"Range {header!r} not satisfiable for {size} bytes")
        return lo, hi

    @staticmethod
    async def _write(response: web.StreamResponse, blob: _Blob, lo: int, hi: int) -> None:
        for at in range(lo, hi, _PIECE):
            await response.write(blob.read(at, min(at + _PIECE, hi)))



def private_hf_home(home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Give this test its own HF home (returned: its hub cache) and no token or offline mode. huggingface_hub
    reads its environment when imported (transformers imports it before any test runs), so its constants are
    patched along with the variables. It writes a transfer in 10 MiB pieces and resumes a cut one after the
    last whole piece: 256 KiB pieces let a few-MB test file resume past byte 0."""
    values = {"HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TQDM_POSITION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 256 << 10)
    return home / "hub"
