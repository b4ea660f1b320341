"""The start-time probe loads a real synthetic checkpoint with the node's own loader, from disk then DRAM."""

from __future__ import annotations

from sllmd.scheduler.estimate import Calibration
from sllmd.types import Tier
from sllmd.worker.probe import PROBE_DIR, probe_calibration


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
