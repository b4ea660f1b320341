"""The start-time probe loads a real synthetic checkpoint with the node's own loader, from disk then DRAM."""

from __future__ import annotations

import shutil
import subprocess
import sys

from sllmd.scheduler.estimate import Calibration
from sllmd.types import Tier
from sllmd.worker.probe import PROBE_DIR, TENSOR_BYTES, probe_bytes, probe_calibration


def test_probe_measures_ssd_and_dram_and_keeps_the_rest_of_the_calibration(tmp_path):
    base = Calibration.defaults()
    probed = probe_calibration(tmp_path, "cpu", 32 << 20, base)
    assert probed.load_gbps[Tier.SSD] != base.load_gbps[Tier.SSD]
    assert probed.load_gbps[Tier.DRAM] != base.load_gbps[Tier.DRAM]
    # A CPU DRAM hit hands over the cached buffer: far faster than reading the disk.
    assert probed.load_gbps[Tier.DRAM] > probed.load_gbps[Tier.SSD]
    assert (probed.fetch_gbps, probed.init, probed.migration) == (base.fetch_gbps, base.init, base.migration)


def test_the_probe_checkpoint_is_built_once_and_rebuilt_when_the_size_changes(tmp_path):
    base = Calibration.defaults()
    probe_calibration(tmp_path, "cpu", 16 << 20, base)
    manifest = tmp_path / PROBE_DIR / "manifest.json"
    built = manifest.stat().st_mtime_ns
    probe_calibration(tmp_path, "cpu", 16 << 20, base)
    assert manifest.stat().st_mtime_ns == built
    probe_calibration(tmp_path, "cpu", 32 << 20, base)
    assert (tmp_path / PROBE_DIR / "size").read_text() == str(32 << 20)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no work dir left behind


def test_the_probe_fits_the_disk_it_runs_on(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    assert probe_bytes(tmp_path, 32 << 20) == (32 << 20 if free >= 128 << 20 else probe_bytes(tmp_path, free))
    shrunk = probe_bytes(tmp_path, 1 << 60)  # asked for more than the disk has: a quarter of it, whole tensors
    assert 0 <= shrunk <= free // 4 and shrunk % TENSOR_BYTES == 0
    assert probe_bytes(tmp_path, TENSOR_BYTES - 1) == 0  # not one tensor: no probe


def test_a_probe_that_fails_to_build_leaves_nothing_behind(tmp_path):
    # A file-size limit makes the build's writes fail part way, as a full disk does (for root too).
    script = f"""
import resource, signal, sys
from sllmd.scheduler.estimate import Calibration
from sllmd.worker.probe import probe_calibration
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    probe_calibration({str(tmp_path)!r}, "cpu", 16 << 20, Calibration.defaults())
except OSError as exc:
    sys.exit(f"failed: {{exc}}")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.startswith("failed: ") and "File too large" in result.stderr  # an OSError, not a crash
    assert list(tmp_path.iterdir()) == []  # neither a half-built probe nor its work dir
