"""Checkpoint loading, measured: sllmd's loader against the disk's limit, memcpy, safetensors and torch.load.

    .venv/bin/python scripts/bench_loader.py --size-gb 2 --json [--device cpu|cuda] [--runs 3] [--sweep]

Builds (once, cached under data/bench_loader/, on the repository's filesystem, never tmpfs) a synthetic fp16
checkpoint shaped like a Llama model scaled to `--size-gb` (big projection matrices, a large embedding and
LM head, small norm vectors) as `model.safetensors`, as an sllmd v1 checkpoint (`convert`) and as a
`torch.save` file. Then, in one process and interleaved round by round so drift hits every method alike,
each method runs `--runs` times and the median is reported:

* disk_direct: O_DIRECT reads (4 threads, 64 MiB) of the sllmd data files into a pre-faulted buffer: the
  storage limit. memcpy: a copy between two pre-faulted buffers of the same size (CUDA: pinned host memory
  to the device, the PCIe limit).
* (CPU only) sllmd_cold_prefaulted / sllmd_staged_cold_prefaulted: the direct and the staged (pool) pipeline
  into that same pre-faulted buffer: the loader's own efficiency without the cost of faulting in fresh
  destination memory (the staged one is the CUDA pipeline with a CPU copy in place of the device copy).
* sllmd cold / warm: `load_checkpoint` with the page cache evicted / hot; sllmd_dram_hit_s: the second
  load through a `DramCache` (on CPU a hit copies nothing, on CUDA it is one host-to-device pass).
* safetensors `load_file`, `torch.load` (weights_only) without and with `mmap=True`, cold and warm.

"Cold" evicts every file's pages first: `posix_fadvise(POSIX_FADV_DONTNEED)`, plus `sync; echo 3 >
/proc/sys/vm/drop_caches` when running as root (the JSON says which). Every method ends with every byte
in target memory: on CPU, one byte of every 4 KiB page of every resulting tensor is summed (which forces
an mmap'd result to fault in every page from the file); on CUDA the tensors are on the device and the
device is synchronised. Times include allocating the result. A table goes to stderr; the LAST stdout line
is the JSON (`*_gbps` = bytes / median seconds; `a_vs_b` ratios: for two speeds of the same bytes the
fraction a/b, for two loaders the speedup = b's seconds / a's seconds).

`--sweep` instead measures the loader's knobs (readers, chunk size, io_mode; staged pool chunk size) cold
and warm: how its defaults were chosen.
"""

from __future__ import annotations

import argparse
import gc
import json
import mmap
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sllmd.checkpoint import loader as sllmd_loader  # noqa: E402
from sllmd.checkpoint.convert import convert  # noqa: E402
from sllmd.checkpoint.dram import DramCache  # noqa: E402
from sllmd.checkpoint.pool import BufferPool, HostMemoryPool, default_pool  # noqa: E402
from sllmd.checkpoint.reader import read_manifest  # noqa: E402

PAGE = 4096
MIB = 1 << 20


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- the synthetic model ---------------------------------------------------------------------------


def llama_shapes(size_bytes: int) -> tuple[dict, list[tuple[str, tuple[int, ...]]]]:
    """Llama-3.2-1B layer shapes (hidden 2048, MLP 8192, 8 KV heads of 64), with the vocabulary sized so
    embedding + LM head take ~25% of the bytes and as many layers as fill the rest (fp16)."""
    hidden, inter, kv = 2048, 8192, 512
    vocab = max(1024, min(128256, int(size_bytes * 0.25) // (2 * hidden * 2)) // 64 * 64)
    layer = 2 * (2 * hidden * hidden + 2 * kv * hidden + 3 * hidden * inter + 2 * hidden)
    num_layers = max(1, round((size_bytes - 2 * vocab * hidden * 2) / layer))
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(num_layers):
        p = f"model.layers.{i}."
        shapes += [(p + "input_layernorm.weight", (hidden,)),
                   (p + "self_attn.q_proj.weight", (hidden, hidden)), (p + "self_attn.k_proj.weight", (kv, hidden)),
                   (p + "self_attn.v_proj.weight", (kv, hidden)), (p + "self_attn.o_proj.weight", (hidden, hidden)),
                   (p + "post_attention_layernorm.weight", (hidden,)),
                   (p + "mlp.gate_proj.weight", (inter, hidden)), (p + "mlp.up_proj.weight", (inter, hidden)),
                   (p + "mlp.down_proj.weight", (hidden, inter))]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": inter, "num_hidden_layers": num_layers, "num_attention_heads": hidden // 64,
              "num_key_value_heads": kv // 64, "head_dim": 64, "vocab_size": vocab, "torch_dtype": "float16",
              "max_position_embeddings": 4096, "tie_word_embeddings": False, "rms_norm_eps": 1e-5}
    return config, shapes


def build_model(root: Path, size_gb: float) -> dict[str, Path]:
    """The three formats of one synthetic model under `root` (reused when already complete)."""
    paths = {"safetensors": root / "hf" / "model.safetensors", "sllmd": root / "sllmd", "torch": root / "model.pt"}
    done = root / "complete"
    if done.is_file():
        return paths
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    config, shapes = llama_shapes(int(size_gb * 1e9))
    log(f"building a {size_gb} GB synthetic model ({len(shapes)} tensors, {config['num_hidden_layers']} layers, "
        f"vocab {config['vocab_size']}) in {root} ...")
    gen = torch.Generator().manual_seed(0)
    block = torch.randint(0, 256, (64 * MIB,), dtype=torch.uint8, generator=gen)
    state = {}
    for i, (name, shape) in enumerate(shapes):
        t = torch.empty(shape, dtype=torch.float16)
        flat = t.view(-1).view(torch.uint8)
        start = (i * 7919 * PAGE) % (32 * MIB)  # different bytes per tensor
        for off in range(0, flat.numel(), 32 * MIB):
            n = min(32 * MIB, flat.numel() - off)
            flat[off : off + n] = block[start : start + n]
        state[name] = t
    (root / "hf").mkdir(exist_ok=True)
    (root / "hf" / "config.json").write_text(json.dumps(config, indent=1))
    save_file(state, paths["safetensors"])
    torch.save(state, paths["torch"])
    del state
    gc.collect()
    if paths["sllmd"].exists():
        import shutil

        shutil.rmtree(paths["sllmd"])
    convert(root / "hf", paths["sllmd"])
    os.sync()
    done.write_text("ok\n")
    return paths


def filesystem_type(path: Path) -> str:
    """The type of the filesystem holding `path`, from the longest matching mount point in /proc/mounts."""
    best, kind, target = "", "unknown", str(path.resolve())
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            _, mount, fstype = line.split()[:3]
            if (target == mount or target.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
                best, kind = mount, fstype
    except OSError:
        pass
    return kind


def data_files(paths: dict[str, Path]) -> list[Path]:
    manifest = read_manifest(paths["sllmd"])
    return [paths["safetensors"], paths["torch"], *(paths["sllmd"] / p.file for p in manifest.partitions)]


# ---- cache control and materialisation -------------------------------------------------------------


def evict(files: list[Path]) -> str:
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    if os.geteuid() == 0:
        try:
            os.sync()
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
            return "fadvise+drop_caches"
        except OSError:
            pass
    return "fadvise"


def warm(files: list[Path]) -> None:
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.read(64 * MIB):
                pass


def materialise(tensors: dict[str, torch.Tensor] | list[torch.Tensor], device: torch.device) -> None:
    """Every byte in target memory: on CPU sum one byte per 4 KiB page of every tensor (faults in what an
    mmap left lazy); on CUDA synchronise (the tensors are device tensors)."""
    values = tensors.values() if isinstance(tensors, dict) else tensors
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return
    total = 0
    for t in values:
        if t.numel():
            total += int(t.reshape(-1).view(torch.uint8)[::PAGE].sum())
    del total


def prefaulted(nbytes: int) -> torch.Tensor:
    region = mmap.mmap(-1, max(nbytes, PAGE), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
    return torch.frombuffer(region, dtype=torch.uint8)[:nbytes]


# ---- methods ----------------------------------------------------------------------------------------


def disk_direct(files: list[Path], out: torch.Tensor, num_threads: int = 4, chunk: int = 64 * MIB) -> None:
    """O_DIRECT reads of `files` back to back into `out` (pre-faulted): what the storage can do."""
    view = memoryview(out.numpy())
    jobs, base = [], 0
    for path in files:
        size = path.stat().st_size
        jobs += [(path, off, min(chunk, size - off), base + off) for off in range(0, size, chunk)]
        base += size
    it, lock = iter(jobs), threading.Lock()
    fds = {path: os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0)) for path in files}

    def work() -> None:
        while True:
            with lock:
                job = next(it, None)
            if job is None:
                return
            path, off, n, dst = job
            done = 0
            while done < n:
                done += os.preadv(fds[path], [view[dst + done : dst + n]], off + done)

    threads = [threading.Thread(target=work) for _ in range(num_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for fd in fds.values():
        os.close(fd)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    start = time.perf_counter()
    result = fn()
    if result is not None:
        materialise(result, device)
    seconds = time.perf_counter() - start
    del result
    gc.collect()
    return seconds


def run_bench(args: argparse.Namespace, paths: dict[str, Path]) -> dict:
    from safetensors.torch import load_file

    device = torch.device(args.device)
    manifest = read_manifest(paths["sllmd"])
    sllmd_files = [paths["sllmd"] / p.file for p in manifest.partitions]
    all_files = data_files(paths)
    nbytes = {"sllmd": manifest.total_bytes, "safetensors": paths["safetensors"].stat().st_size,
              "torch": paths["torch"].stat().st_size}
    if device.type == "cuda":
        default_pool()  # allocated and pinned once per process, at start: not part of any load
    direct_out, copy_src, copy_dst = (prefaulted(nbytes["sllmd"]) for _ in range(3))

    def sllmd_load() -> dict[str, torch.Tensor]:
        return sllmd_loader.load_checkpoint(paths["sllmd"], device).tensors

    def torch_load(mm: bool) -> Callable[[], dict[str, torch.Tensor]]:
        def fn() -> dict[str, torch.Tensor]:
            state = torch.load(paths["torch"], map_location="cpu" if mm else device, weights_only=True, mmap=mm)
            return {k: v.to(device) for k, v in state.items()} if mm and device.type != "cpu" else state
        return fn

    pinned_src = torch.empty(nbytes["sllmd"], dtype=torch.uint8, pin_memory=True) if device.type == "cuda" else None

    def memcpy() -> None:
        """CPU: memory to memory. CUDA: pinned host memory to a fresh device allocation (the PCIe limit)."""
        if pinned_src is not None:
            dev = torch.empty(nbytes["sllmd"], dtype=torch.uint8, device=device)
            dev.copy_(pinned_src, non_blocking=True)
            torch.cuda.synchronize(device)
        else:
            copy_dst.copy_(copy_src)

    def dram_hit() -> float:
        cache = DramCache(2 * nbytes["sllmd"])
        first = sllmd_loader.load_checkpoint(paths["sllmd"], device, dram_cache=cache)
        first.release()
        del first
        start = time.perf_counter()
        hit = sllmd_loader.load_checkpoint(paths["sllmd"], device, dram_cache=cache)
        materialise(hit.tensors, device)
        seconds = time.perf_counter() - start
        assert hit.report.source_tier == "dram"
        hit.release()
        return seconds

    # name: (bytes, is_cold, fn); a None-returning fn times only itself.
    methods: dict[str, tuple[int, bool | None, Callable[[], object]]] = {
        "disk_direct": (nbytes["sllmd"], True, lambda: disk_direct(sllmd_files, direct_out)),
        "memcpy": (nbytes["sllmd"], None, memcpy),
        "sllmd_cold": (nbytes["sllmd"], True, sllmd_load),
        "sllmd_warm": (nbytes["sllmd"], False, sllmd_load),
        "safetensors_cold": (nbytes["safetensors"], True, lambda: load_file(paths["safetensors"], device=str(device))),
        "safetensors_warm": (nbytes["safetensors"], False, lambda: load_file(paths["safetensors"], device=str(device))),
        "torch_load_cold": (nbytes["torch"], True, torch_load(False)),
        "torch_load_warm": (nbytes["torch"], False, torch_load(False)),
        "torch_load_mmap_cold": (nbytes["torch"], True, torch_load(True)),
        "torch_load_mmap_warm": (nbytes["torch"], False, torch_load(True)),
    }
    if device.type == "cpu":
        # The loader's own efficiency, without the VM's cost of faulting in fresh destination memory: the direct
        # path, and the staged pool pipeline (a CPU copy standing in for the host-to-device copy), both into
        # the pre-faulted buffer disk_direct reads into. Fresh memory costs what sllmd_cold minus these shows.
        staging = BufferPool()
        methods["sllmd_cold_prefaulted"] = (nbytes["sllmd"], True, lambda: sllmd_loader.load_checkpoint(
            paths["sllmd"], device, out=direct_out).tensors)
        methods["sllmd_staged_cold_prefaulted"] = (nbytes["sllmd"], True, lambda: sllmd_loader.load_checkpoint(
            paths["sllmd"], device, out=direct_out, staged=True, pool=staging).tensors)
        # A serving node's steady state: the previous load's buffer went back to the pool when its tensors died.
        recycled = HostMemoryPool(nbytes["sllmd"] + MIB)
        timed(lambda: sllmd_loader.load_checkpoint(paths["sllmd"], device, host_pool=recycled).tensors, device)
        assert recycled.num_free == 1, "the priming load's buffer did not return to the pool"

        def recycled_load() -> dict[str, torch.Tensor]:
            fresh = recycled.num_fresh
            loaded = sllmd_loader.load_checkpoint(paths["sllmd"], device, host_pool=recycled)
            assert recycled.num_fresh == fresh, "a recycled load mapped fresh memory"
            return loaded.tensors

        methods["sllmd_cold_recycled"] = (nbytes["sllmd"], True, recycled_load)
    seconds: dict[str, list[float]] = {name: [] for name in [*methods, "sllmd_dram_hit"]}
    eviction = "fadvise"
    for run in range(args.runs):
        for name, (_, cold, fn) in methods.items():
            if cold:
                eviction = evict(all_files)
            elif cold is False:
                warm(all_files)
            seconds[name].append(timed(fn, device))
        seconds["sllmd_dram_hit"].append(dram_hit())
        log(f"run {run + 1}/{args.runs}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in seconds.items()))
    median = {name: statistics.median(v) for name, v in seconds.items()}
    gbps = {name: methods[name][0] / median[name] / 1e9 for name in methods}
    result: dict[str, object] = {
        "size_gb": args.size_gb, "num_bytes": nbytes["sllmd"], "device": str(device), "runs": args.runs,
        "eviction": eviction, "num_tensors": len(manifest.tensors), "filesystem": filesystem_type(paths["sllmd"]),
        "loader": {"num_readers": sllmd_loader.DEFAULT_NUM_READERS, "chunk_bytes": sllmd_loader.DEFAULT_CHUNK_BYTES,
                   "io_mode": "auto"},
    }
    for name in methods:
        result[f"{name}_gbps"] = round(gbps[name], 3)
        result[f"{name}_s"] = round(median[name], 4)
    result["sllmd_dram_hit_s"] = round(median["sllmd_dram_hit"], 5)
    speedup = {name: median[name] / median["sllmd_cold" if "cold" in name else "sllmd_warm"]
               for name in methods if name.startswith(("safetensors", "torch_load"))}
    result.update({
        "sllmd_cold_vs_disk": round(gbps["sllmd_cold"] / gbps["disk_direct"], 3),
        **{f"{name}_vs_disk": round(gbps[name] / gbps["disk_direct"], 3)
           for name in ("sllmd_cold_prefaulted", "sllmd_staged_cold_prefaulted", "sllmd_cold_recycled")
           if name in gbps},
        "sllmd_warm_vs_memcpy": round(gbps["sllmd_warm"] / gbps["memcpy"], 3),
        "safetensors_cold_vs_disk": round(gbps["safetensors_cold"] / gbps["disk_direct"], 3),
        **{f"sllmd_{'cold' if 'cold' in n else 'warm'}_vs_{n}": round(v, 2) for n, v in speedup.items()},
        "sllmd_dram_hit_vs_cold": round(median["sllmd_cold"] / max(median["sllmd_dram_hit"], 1e-9), 1),
    })
    log(f"\n{'method':30s} {'median s':>9s} {'GB/s':>7s}   (eviction: {eviction}; {nbytes['sllmd'] / 1e9:.2f} GB, "
        f"{args.runs} runs, device {device})")
    for name in methods:
        log(f"{name:30s} {median[name]:9.3f} {gbps[name]:7.2f}")
    log(f"{'sllmd_dram_hit':30s} {median['sllmd_dram_hit']:9.4f}")
    return result


def run_sweep(args: argparse.Namespace, paths: dict[str, Path]) -> dict:
    """The loader's knobs on `--device`, cold and warm, interleaved round by round (staged = the pool path)."""
    device = torch.device(args.device)
    manifest = read_manifest(paths["sllmd"])
    files = [paths["sllmd"] / p.file for p in manifest.partitions]
    total = manifest.total_bytes
    pools = {chunk: BufferPool(256 // chunk, chunk * MIB) for chunk in (4, 16, 64)}  # 256 MiB each
    configs: list[tuple[str, bool, dict]] = []
    for mode in ("auto", "direct", "buffered"):
        configs += [(f"{mode} readers={r} chunk=16MiB", True, {"io_mode": mode, "num_readers": r})
                    for r in (1, 2, 4, 8)]
    configs += [(f"auto readers=4 chunk={c}MiB", True, {"chunk_bytes": c * MIB}) for c in (4, 64)]
    configs += [(f"{mode} readers=4 chunk=16MiB", False, {"io_mode": mode}) for mode in ("auto", "direct", "buffered")]
    configs += [(f"staged pool={256 // c}x{c}MiB readers=4", True,
                 {"staged": True, "pool": pools[c], "chunk_bytes": c * MIB}) for c in (4, 16, 64)]
    configs += [("auto readers=4 chunk=16MiB verify", True, {"verify": True})]
    times: dict[str, list[float]] = {f"{label} {cold}": [] for label, cold, _ in configs}
    for run in range(args.runs):
        for label, cold, kw in configs:
            if cold:
                evict(files)
            else:
                warm(files)
            times[f"{label} {cold}"].append(
                timed(lambda kw=kw: sllmd_loader.load_checkpoint(paths["sllmd"], device, **kw).tensors, device))
        log(f"sweep round {run + 1}/{args.runs} done")
    rows = []
    for label, cold, _ in configs:
        s = statistics.median(times[f"{label} {cold}"])
        rows.append({"config": label, "cold": cold, "s": round(s, 4), "gbps": round(total / s / 1e9, 3)})
        log(f"{label:44s} {'cold' if cold else 'warm'} {total / s / 1e9:6.2f} GB/s  "
            f"(runs: {', '.join(f'{total / t / 1e9:.2f}' for t in times[f'{label} {cold}'])})")
    return {"sweep": rows, "num_bytes": total, "device": str(device), "runs": args.runs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-gb", type=float, default=2.0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print the result as JSON on the last stdout line")
    parser.add_argument("--sweep", action="store_true", help="measure the loader's knobs instead")
    parser.add_argument("--dir", type=Path, default=REPO / "data" / "bench_loader",
                        help="where the synthetic model is built and kept (same filesystem as the repo)")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    args.dir.mkdir(parents=True, exist_ok=True)
    if filesystem_type(args.dir) in ("tmpfs", "ramfs") or args.dir.stat().st_dev != REPO.stat().st_dev:
        log(f"warning: {args.dir} is not on the repository's filesystem ({filesystem_type(args.dir)}): "
            "cold reads will not measure the disk")
    paths = build_model(args.dir / f"llama-{args.size_gb:g}gb", args.size_gb)
    result = run_sweep(args, paths) if args.sweep else run_bench(args, paths)
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
