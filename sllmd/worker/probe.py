"""The start-of-node probe: this node's load bandwidths, measured with its own loader on its own disk.

The scheduler's estimators need each node's bandwidths before its first real load. Rather than timing a
generic temp file (which says little about the loader's real path: O_DIRECT, reader threads, the
device copy), the probe loads a synthetic sllmd v1 checkpoint of `num_bytes` from `<data_dir>/probe`
onto the node's first device twice: cold from the SSD (its pages evicted first), then again from a
DRAM cache. The checkpoint is built once (atomically) and kept, so later starts only read it.

Blocking and slow-ish (a fraction of a second per 100 MB): run it off the event loop, before READY.

Every node also serves its probe checkpoint to its peers (`PROBE_PATH`), so once a peer is up a node
times a real peer→SSD copy of it with the store's own fetch path (`probe_peer_fetch`): the peer fetch
bandwidth. Engine init and the migration and repository figures cannot be probed without a model or a
repository; they keep their defaults until real loads, fetches and migrations correct them (`Worker`
observes every one).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import shutil
from pathlib import Path

import torch

from sllmd.checkpoint.convert import convert
from sllmd.checkpoint.dram import DramCache
from sllmd.checkpoint.fetch import FetchReport, fetch
from sllmd.checkpoint.loader import load_checkpoint
from sllmd.checkpoint.manifest import MANIFEST_FILE
from sllmd.checkpoint.reader import drop_from_page_cache
from sllmd.checkpoint.url_fetch import FetchSettings
from sllmd.fsutil import publish_dir
from sllmd.scheduler.estimate import BYTES_PER_GB, Calibration
from sllmd.types import Tier

log = logging.getLogger(__name__)

PROBE_DIR = "probe"
PROBE_PATH = "/internal/probe"  # + "/{file}": where a node serves its probe checkpoint to its peers
TENSOR_BYTES = 16 << 20  # several tensors, like a model, so the loader's per-tensor work is in the figure
MAX_PROBE_GBPS = 1000.0  # a CPU DRAM hit hands over a buffer without copying: cap the "bandwidth" it implies


def probe_bytes(data_dir: Path, num_bytes: int) -> int:
    """The probe checkpoint's size on this disk: `num_bytes`, or less where the disk's free space is short (at most
    a quarter of it, whole tensors); 0 when not even one tensor fits (no probe)."""
    size_file = Path(data_dir) / PROBE_DIR / "size"
    size = size_file.read_text() if size_file.is_file() else ""
    built = int(size) if size.isdigit() else 0  # the probe already built: its bytes count as free
    room = (shutil.disk_usage(data_dir).free + built) // 4
    return min(num_bytes, room) // TENSOR_BYTES * TENSOR_BYTES


def probe_calibration(data_dir: Path, device: str, num_bytes: int, base: Calibration) -> Calibration:
    """`base` with its DRAM and SSD load bandwidths replaced by ones measured now on `device` with a probe
    checkpoint of `num_bytes` (at least TENSOR_BYTES; see `probe_bytes`)."""
    path = _probe_checkpoint(Path(data_dir) / PROBE_DIR, num_bytes)
    total = sum(f.stat().st_size for f in path.iterdir() if f.name != MANIFEST_FILE)
    drop_from_page_cache(path)  # the first load reads the disk, not the page cache (which it would map)
    cache = DramCache(2 * total)
    rates = {}
    for expected in (Tier.SSD, Tier.DRAM):
        loaded = load_checkpoint(path, device, dram_cache=cache)
        report = loaded.report
        loaded.release()
        if report.source_tier != expected:  # e.g. the cache refused it: keep the default
            log.warning("probe load came from an unexpected tier", extra={"expected": expected,
                                                                          "tier": report.source_tier})
            continue
        rates[expected] = min(report.num_bytes / BYTES_PER_GB / max(report.load_s, 1e-9), MAX_PROBE_GBPS)
    log.info("probed load bandwidth", extra={"device": device, "bytes": total,
                                             **{f"{t}_gbps": round(g, 3) for t, g in rates.items()}})
    return dataclasses.replace(base, load_gbps={**base.load_gbps, **rates})


async def probe_peer_fetch(data_dir: Path, peer_http: str, settings: FetchSettings) -> FetchReport:
    """Copy the probe checkpoint of the peer at `peer_http` into `data_dir` the way the store fetches a
    checkpoint from a peer (parallel Range requests, every chunk verified, written to this disk), then
    delete the copy. The report's bandwidth is this node's peer→SSD figure."""
    dst, work = Path(data_dir) / ".probe-peer", Path(data_dir) / ".probe-peer.partial"
    for path in (dst, work):
        shutil.rmtree(path, ignore_errors=True)
    try:
        return await fetch(f"http://{peer_http}{PROBE_PATH}", dst, work_dir=work, settings=settings)
    finally:
        for path in (dst, work):
            await asyncio.to_thread(shutil.rmtree, path, ignore_errors=True)


def with_probed_fetch(calibration: Calibration, tier: Tier, report: FetchReport) -> Calibration:
    """`calibration` with `tier`'s fetch bandwidth replaced by the one `report` measured."""
    return dataclasses.replace(calibration, fetch_gbps={**calibration.fetch_gbps, tier: report.gb_per_s})


def _probe_checkpoint(path: Path, num_bytes: int) -> Path:
    """The probe checkpoint at `path`, built now unless a complete one of the same size is there."""
    if all((path / name).is_file() for name in (MANIFEST_FILE, "config.json", "size")) and (
            path / "size").read_text() == str(num_bytes):
        return path
    shutil.rmtree(path, ignore_errors=True)
    work = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(work, ignore_errors=True)
    try:
        (work / "hf").mkdir(parents=True)
        from safetensors import SafetensorError
        from safetensors.torch import save_file

        generator = torch.Generator().manual_seed(0)
        num_tensors = max(1, num_bytes // TENSOR_BYTES)
        tensors = {f"probe.{i}.weight": torch.randint(0, 256, (TENSOR_BYTES,), dtype=torch.uint8,
                                                      generator=generator) for i in range(num_tensors)}
        try:
            save_file(tensors, work / "hf" / "model.safetensors")
        except SafetensorError as exc:  # its I/O errors (a full disk) are no OSError
            raise OSError(f"cannot write the probe checkpoint: {exc}") from None
        convert(work / "hf", work / "v1")
        (work / "v1" / "config.json").write_text('{"model_type": "sllmd-probe"}')  # what a fetch requires
        (work / "v1" / "size").write_text(str(num_bytes))
        publish_dir(work / "v1", path)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # a failed build (a full disk) leaves nothing behind
    return path
