"""vLLM cold starts: a fresh engine (compile cache empty, then filled; compiled and eager) against an engine taken
from sllmd's pool of parked engines, as it is and after swapping in a second model of the same shape.

    .venv-vllm/bin/python scripts/bench_vllm_start.py [--layers 8] [--runs 1] [--vllm-own]

Builds (once, cached under data/bench_vllm/) two random float32 Llamas of one realistic shape (hidden 1024,
head_dim 64, vocab 32000; `--layers` sets the size: 8 layers is ~0.7 GB) as sllmd v1 checkpoints, A and B.
Every start is of a checkpoint in the page cache (the DRAM tier of vLLM engines) and is timed to its first
token: `VllmEngine.start()` (spawning vLLM's processes included, when it does), then one greedy token. Methods,
in this order, with the node's vLLM directory (shape directories, compile cache) in a fresh temporary dir:
  fresh          A on a new engine, the compile cache empty (what every cold start cost before sllmd kept engines)
  fresh_cached   A on a new engine again: torch.compile's artefacts now come from the cache
  eager          A on a new engine in start mode "eager" (no torch.compile)
  parked         A again, on the engine `fresh_cached` parked when it stopped (it still holds A's weights)
  swap           B, on that engine parked once more: B's weights swapped in place of A's
  (--vllm-own)   A's Hugging Face directory loaded by vLLM's own loader on a new engine, for reference
Each start's `LoadReport.phases` is printed (see sllmd.engine.vllm). Reported: TTFT, start and load seconds
and phases per method; `swap_over_load` is the swap's seconds over the same bytes' weight load in `fresh`
(the target: <= 2). A table goes to stderr; the LAST stdout line is JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sllmd.checkpoint.convert import convert  # noqa: E402
from sllmd.engine.vllm import VllmEngine  # noqa: E402
from sllmd.engine.vllm_pool import EnginePool  # noqa: E402
from sllmd.types import SamplingParams  # noqa: E402
from sllmd.worker.warming import read_into_page_cache  # noqa: E402

KV_CACHE_BYTES = 256 << 20
PROMPT = [1, 2, 3, 4]


def build_models(root: Path, num_layers: int) -> tuple[Path, Path, Path]:
    """(A's Hugging Face directory, A's v1 checkpoint, B's v1 checkpoint): one shape, other weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    paths = []
    for seed, name in ((0, "a"), (1, "b")):
        hf_dir, v1_dir = root / f"llama-{num_layers}l-{name}-hf", root / f"llama-{num_layers}l-{name}-sllmd"
        if not (hf_dir / "config.json").is_file():
            config = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                                 num_hidden_layers=num_layers, num_attention_heads=16, num_key_value_heads=16,
                                 head_dim=64, max_position_embeddings=2048, tie_word_embeddings=False, dtype="float32")
            torch.manual_seed(seed)
            LlamaForCausalLM(config).to(torch.float32).save_pretrained(hf_dir)
        if not (v1_dir / "manifest.json").is_file():
            convert(hf_dir, v1_dir)
        paths += [hf_dir, v1_dir]
    return paths[0], paths[1], paths[3]


async def start(checkpoint: Path, vllm_dir: Path | None, pool: EnginePool | None, mode: str = "compiled") -> dict:
    """One start to the first token; the engine stops (parks, with a pool) afterwards."""
    read_into_page_cache(checkpoint)
    engine = VllmEngine(checkpoint, start_mode=mode, pool=pool, vllm_dir=vllm_dir, kv_cache_bytes=KV_CACHE_BYTES)
    began = time.perf_counter()
    report = await engine.start()
    started = time.perf_counter()
    try:
        tokens = [t async for t in engine.generate(PROMPT, SamplingParams(max_tokens=1, temperature=0.0))]
        assert len(tokens) == 1
        ttft = time.perf_counter() - began
    finally:
        await engine.stop()
    return {"ttft_s": round(ttft, 4), "start_s": round(started - began, 4), "load_s": round(report.load_s, 4),
            "tier": report.source_tier, "num_bytes": report.num_bytes, "phases": report.phases}


async def one_run(hf_a: Path, a: Path, b: Path, vllm_own: bool) -> dict[str, dict]:
    with tempfile.TemporaryDirectory(prefix="sllmd-bench-vllm-") as tmp:
        vllm_dir = Path(tmp)
        pool = EnginePool(capacity=1)
        runs = {"fresh": await start(a, vllm_dir, None),
                "fresh_cached": await start(a, vllm_dir, pool),  # parks its engine for the next two
                "eager": await start(a, vllm_dir, None, mode="eager"),
                "parked": await start(a, vllm_dir, pool),
                "swap": await start(b, vllm_dir, pool)}
        if vllm_own:
            runs["vllm_own"] = await start(hf_a, None, None)
        await pool.close()
    for name, result in runs.items():
        phases = ", ".join(f"{k} {v:.2f}" for k, v in result["phases"].items())
        print(f"{name:13s} ttft {result['ttft_s']:7.3f} s  load {result['load_s']:6.3f} s  from {result['tier']}  "
              f"[{phases}]", file=sys.stderr, flush=True)
    return runs


async def run(args: argparse.Namespace) -> dict:
    hf_a, a, b = build_models(REPO / "data" / "bench_vllm", args.layers)
    per_run = [await one_run(hf_a, a, b, args.vllm_own) for _ in range(args.runs)]
    summary: dict = {"model_bytes": per_run[0]["fresh"]["num_bytes"], "num_layers": args.layers, "runs": args.runs}
    for name in per_run[0]:
        results = [run[name] for run in per_run]
        summary[name] = {"ttft_s": statistics.median(r["ttft_s"] for r in results),
                         "load_s": statistics.median(r["load_s"] for r in results),
                         "tiers": sorted({r["tier"] for r in results}),
                         "phases": {phase: round(statistics.median(r["phases"][phase] for r in results), 4)
                                    for phase in results[0]["phases"]}}
    summary["before_over_after_ttft"] = round(summary["fresh"]["ttft_s"] / summary["parked"]["ttft_s"], 1)
    summary["swap_over_load"] = round(summary["swap"]["phases"]["swap"] / summary["fresh"]["load_s"], 2)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vllm-own", action="store_true", help="also start A with vLLM's own loader")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args)), default=dataclasses.asdict))


if __name__ == "__main__":  # vLLM spawns processes that re-import this module
    main()
