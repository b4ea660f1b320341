"""Running a Python script with its data on a small disk: a tmpfs mounted in a private user and mount
namespace (`unshare`), so no root and no cleanup are needed."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run_on_small_disk(script: str, disk: Path, *args: str, size: str = "16m",
                      timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    """Run `script` (`python -c`, from the repository root, argv: `disk` then `args`) with a `size` tmpfs
    mounted on the existing directory `disk`. Skips the test where unshare(1) or such a mount is not
    available; a script that fails otherwise is the caller's to assert on."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1)")
    command = (f"mount -t tmpfs -o size={size} tmpfs {disk} && cd {REPO} && "
               f"{sys.executable} -c '{script}' {disk} {' '.join(args)}")
    result = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", command],
                            capture_output=True, text=True, timeout=timeout_s)
    if result.returncode != 0 and "mount" in result.stderr and not result.stdout:
        pytest.skip(f"no private tmpfs mount here: {result.stderr.strip()[-200:]}")
    return result
