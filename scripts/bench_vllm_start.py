"""vLLM engine-ready time: sllmd's loader from SSD and from the page cache (DRAM) vs vLLM's own safetensors load.

Weights come through sllmd's loader (load format "sllmd"); the page cache is vLLM's DRAM tier.

    .venv-vllm/bin/python scripts/bench_vllm_start.py --json [--runs 3] [--layers 8] [--warm]

Builds (once, cached under data/bench_vllm/) a random float32 Llama of a realistic shape (hidden 1024, head_dim
64, vocab 32000; `--layers` sets the size: 8 layers is ~0.7 GB) as a Hugging Face directory
(`model.safetensors`) and as an sllmd v1 checkpoint (`convert`). Then, rotating the methods so drift hits all
alike, `--runs` times each: evict every checkpoint's pages (as bench_loader.py: fadvise, plus drop_caches as
root; `--warm` skips it), for "sllmd_dram" then read the v1 checkpoint into the page cache as DRAM warming
does, `VllmEngine.start()` (process-level: the call until vLLM serves, spawning its processes included), one
greedy token to show it serves, `stop()`. Methods: "sllmd" (v1 checkpoint, evicted: tier "ssd"), "sllmd_dram"
(v1 checkpoint, resident: tier "dram"), "vllm" (vLLM's own loader on the Hugging Face directory). Reported per
method: the medians of `ready_s` (start's wall time) and `load_s` (checkpoint bytes to the model's parameters,
measured in vLLM's worker), and the tiers the load reported. A table goes to stderr; the LAST stdout line is JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from scripts.bench_loader import evict  # noqa: E402
from sllmd.checkpoint.convert import convert  # noqa: E402
from sllmd.engine.base import SamplingParams  # noqa: E402
from sllmd.engine.vllm import VllmEngine  # noqa: E402
from sllmd.worker.warming import read_into_page_cache  # noqa: E402

KV_CACHE_BYTES = 256 << 20


def build_model(root: Path, num_layers: int) -> tuple[Path, Path]:
    """(Hugging Face directory, sllmd v1 checkpoint) of the benchmark model, built once per shape."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_dir, sllmd_dir = root / f"llama-{num_layers}l-hf", root / f"llama-{num_layers}l-sllmd"
    if not (hf_dir / "config.json").is_file():
        config = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=num_layers,
                             num_attention_heads=16, num_key_value_heads=16, head_dim=64, max_position_embeddings=2048,
                             tie_word_embeddings=False, dtype="float32")
        torch.manual_seed(0)
        LlamaForCausalLM(config).to(torch.float32).save_pretrained(hf_dir)
    if not (sllmd_dir / "manifest.json").is_file():
        convert(hf_dir, sllmd_dir)
    return hf_dir, sllmd_dir


async def start_once(checkpoint_dir: Path) -> dict:
    engine = VllmEngine(checkpoint_dir, kv_cache_bytes=KV_CACHE_BYTES)
    t0 = time.perf_counter()
    report = await engine.start()
    ready_s = time.perf_counter() - t0
    try:
        tokens = [t async for t in engine.generate([1, 2, 3, 4], SamplingParams(max_tokens=1, temperature=0.0))]
        assert len(tokens) == 1
    finally:
        await engine.stop()
    return {"ready_s": ready_s, "load_s": report.load_s, "tier": report.source_tier, "num_bytes": report.num_bytes}


async def run(args: argparse.Namespace) -> dict:
    hf_dir, sllmd_dir = build_model(REPO / "data" / "bench_vllm", args.layers)
    files = [*hf_dir.glob("*.safetensors"), *sllmd_dir.glob("data-*.bin")]
    methods = {"sllmd": sllmd_dir, "sllmd_dram": sllmd_dir, "vllm": hf_dir}
    results: dict[str, list[dict]] = {name: [] for name in methods}
    eviction = "none"
    for _ in range(args.runs):
        for name, path in methods.items():
            if not args.warm:
                eviction = evict(files)
            if name == "sllmd_dram":
                read_into_page_cache(path)
            results[name].append(await start_once(path))
            print(f"{name:10s} ready {results[name][-1]['ready_s']:6.2f} s  load {results[name][-1]['load_s']:6.3f} s"
                  f"  from {results[name][-1]['tier']}", file=sys.stderr, flush=True)
    summary: dict = {"model_bytes": results["sllmd"][0]["num_bytes"], "num_layers": args.layers, "runs": args.runs,
                     "eviction": eviction}
    for name, runs in results.items():
        summary[name] = {
            "ready_s_median": statistics.median(r["ready_s"] for r in runs),
            "load_s_median": statistics.median(r["load_s"] for r in runs),
            "tiers": sorted({r["tier"] for r in runs}),
            "ready_s": [round(r["ready_s"], 3) for r in runs],
            "load_s": [round(r["load_s"], 4) for r in runs],
        }
    summary["load_speedup"] = summary["vllm"]["load_s_median"] / summary["sllmd"]["load_s_median"]
    summary["ready_s_saved"] = summary["vllm"]["ready_s_median"] - summary["sllmd"]["ready_s_median"]
    summary["dram_load_speedup"] = summary["sllmd"]["load_s_median"] / summary["sllmd_dram"]["load_s_median"]
    summary["dram_ready_s_saved"] = summary["sllmd"]["ready_s_median"] - summary["sllmd_dram"]["ready_s_median"]
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--warm", action="store_true", help="leave the page cache as it is")
    parser.add_argument("--json", action="store_true", help="end with the JSON line (always printed)")
    args = parser.parse_args()
    summary = asyncio.run(run(args))
    for name in ("sllmd", "sllmd_dram", "vllm"):
        medians = summary[name]
        print(f"{name:10s} median ready {medians['ready_s_median']:.2f} s, load {medians['load_s_median']:.3f} s",
              file=sys.stderr)
    print(json.dumps(summary))


if __name__ == "__main__":  # vLLM spawns processes that re-import this module
    main()
