"""Relay benchmark: CPU time each node spends on a relayed streaming request, two real daemons on loopback.

    python scripts/bench_relay.py [--json] [--requests 400] [--concurrency 16] [--max-tokens 64]

Daemon `s` deploys the demo model with backend `dummy` (no model compute) and starts its one instance;
daemon `e` joins and holds none (max_instances 1), so every request sent to `e` is relayed to `s`. After a warm-up,
`--requests` streamed completions go to `e` from `--concurrency` clients; the CPU time (user + system,
from /proc) each daemon used during that phase is divided by the number of requests. The serving node
`s` generates token ids; where the text work (detokenising, stop strings, SSE shaping) happens is what
this measures. Compare runs of different code on the same machine in the same session: absolute
figures vary with the machine's load.

The last stdout line is JSON: {"requests", "max_tokens", "serving_cpu_ms_per_request",
"entry_cpu_ms_per_request", "requests_per_s", "errors"}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
from _daemon import Child, make_demo_model, sse_events, start_daemon, temp_dir, terminate_as_exception

MODEL = "demo"
CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
# One instance at most, and none kept running for its own sake: it starts on `s` before `e` joins.
AUTOSCALING = {"min_instances": 0, "max_instances": 1, "target_concurrency": 64, "keep_alive_s": 3600}


def cpu_s(child: Child) -> float:
    """User + system CPU seconds of the daemon's process so far (Linux /proc)."""
    fields = Path(f"/proc/{child.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_S  # utime, stime


async def stream_one(session: aiohttp.ClientSession, url: str, max_tokens: int) -> int:
    """One streamed completion through the entry node; its completion token count."""
    body = {"model": MODEL, "prompt": "Hello there", "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    usage: dict[str, Any] = {}
    async with session.post(url + "/v1/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"completion answered {resp.status}: {(await resp.read())[:300]!r}")
        async for event in sse_events(resp):
            if "error" in event:
                raise RuntimeError(f"stream failed: {event['error']}")
            usage = event.get("usage") or usage
    return int(usage["completion_tokens"])


async def load(url: str, num_requests: int, concurrency: int, max_tokens: int) -> int:
    """Send `num_requests` completions from `concurrency` clients; the number that failed."""
    remaining = iter(range(num_requests))
    errors = 0

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        for _ in remaining:
            try:
                if await stream_one(session, url, max_tokens) != max_tokens:
                    errors += 1
            except (RuntimeError, aiohttp.ClientError):
                errors += 1

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    return errors


async def wait_known(entry_url: str, timeout_s: float = 30.0) -> None:
    """Until the entry node's cluster view shows `s` holding a slot for the model's instance (so it
    relays instead of placing an instance of its own)."""
    deadline = time.perf_counter() + timeout_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        while time.perf_counter() < deadline:
            try:
                async with session.get(entry_url + "/admin/cluster") as resp:
                    nodes = (await resp.json())["nodes"]
                    if any(n["id"] == "s" and any((slot["instance"] or "").startswith(f"{MODEL}-")
                                                  for slot in n.get("slots", ())) for n in nodes):
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError("the entry node never saw the serving node's instance")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with terminate_as_exception(), temp_dir("sllmd-bench-relay-") as tmp:
        checkpoint = make_demo_model(tmp / "demo-model")
        serving = start_daemon(tmp / "s", log_path=tmp / "s.log", extra_args=["--node-id", "s"])
        children = [serving]
        try:
            await serving.wait_ready()
            spec = {"name": MODEL, "checkpoint": str(checkpoint), "backend": "dummy", "autoscaling": AUTOSCALING}
            async with aiohttp.ClientSession() as session, session.post(serving.base_url + "/admin/models",
                                                                        json=spec) as resp:
                if resp.status != 201:
                    raise RuntimeError(f"POST /admin/models answered {resp.status}: {await resp.text()}")
            await load(serving.base_url, 1, 1, args.max_tokens)  # starts the instance on `s`
            peer_port = serving.proc.args[serving.proc.args.index("--peer-port") + 1]
            entry = start_daemon(tmp / "e", log_path=tmp / "e.log",
                                 extra_args=["--node-id", "e", "--join", f"127.0.0.1:{peer_port}"])
            children.append(entry)
            await entry.wait_ready()
            await wait_known(entry.base_url)
            await load(entry.base_url, args.warmup, args.concurrency, args.max_tokens)
            serving_before, entry_before, began = cpu_s(serving), cpu_s(entry), time.perf_counter()
            errors = await load(entry.base_url, args.requests, args.concurrency, args.max_tokens)
            elapsed = time.perf_counter() - began
            serving_used, entry_used = cpu_s(serving) - serving_before, cpu_s(entry) - entry_before
        finally:
            for child in reversed(children):
                child.stop()
        started = [line for line in (tmp / "e.log").read_text().splitlines() if "instance ready" in line]
        if started:
            raise RuntimeError(f"the entry node started an instance, requests were not all relayed: {started}")
        return {"requests": args.requests, "max_tokens": args.max_tokens,
                "serving_cpu_ms_per_request": round(1000 * serving_used / args.requests, 3),
                "entry_cpu_ms_per_request": round(1000 * entry_used / args.requests, 3),
                "requests_per_s": round(args.requests / elapsed, 1), "errors": errors}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="only the JSON result on stdout")
    parser.add_argument("--requests", type=int, default=400, help="measured requests (default 400)")
    parser.add_argument("--warmup", type=int, default=50, help="requests before measuring (default 50)")
    parser.add_argument("--concurrency", type=int, default=16, help="clients at once (default 16)")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens per request (default 64)")
    args = parser.parse_args(argv)
    result = asyncio.run(run(args))
    if not args.json:
        print(f"serving node {result['serving_cpu_ms_per_request']} ms CPU/request, entry node "
              f"{result['entry_cpu_ms_per_request']} ms CPU/request, {result['requests_per_s']} requests/s",
              file=sys.stderr)
    print(json.dumps(result))
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
