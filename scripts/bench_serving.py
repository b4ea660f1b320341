"""Serving-path benchmark: requests/s and latency through sllmd's HTTP path with the `dummy` backend
(no model compute), against a bare aiohttp baseline measured in the same run by the same client.

    python scripts/bench_serving.py [--json] [--requests N] [--max-tokens K]

Both servers run as child processes on 127.0.0.1 under uvloop. sllmd serves the demo model with
backend `dummy` and min_instances 1, so no cold start is measured. The baseline's handler parses the
JSON body and returns a completion of the same shape with K short tokens of text (or streams K SSE
chunks), with no routing, queueing, tokenising or validation. For each concurrency level (1, 16, 64
clients, each sending sequential requests over keep-alive connections), the servers are measured
one after the other, in alternating order, with at most N requests and `--time-limit` seconds each.

Timings on a small noisy machine vary from run to run; the ratios (baseline vs sllmd, same run) are
the figures to compare. The last stdout line is one JSON object:

    {"levels": {"1": {"sllmd": {...}, "baseline": {...}, "rps_ratio": .., "p50_ratio": ..}, ...},
     "stream_16": {...}, "max_tokens": K, ...}

`rps_ratio` is baseline_rps / sllmd_rps and `p50_ratio` is sllmd_p50 / baseline_p50 (1.0: no
overhead; 2.0: sllmd takes twice the baseline's time). Exit status 1 if any request failed.

(`--baseline-server --port P` runs the baseline server itself; the benchmark starts it that way.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
from _daemon import (
    StreamError,
    make_demo_model,
    sse_events,
    start_daemon,
    start_script,
    temp_dir,
    terminate_as_exception,
)

LEVELS = (1, 16, 64)
STREAM_CONCURRENCY = 16
MODEL = "demo"
PROMPT = "Hello, my name is"
REQUEST_TIMEOUT_S = 30.0


# -- the baseline server (runs in its own process) -----------------------------------------------


def run_baseline_server(port: int) -> int:
    import signal

    import uvloop
    from aiohttp import web

    def envelope(model: str, cmpl_id: str, created: int, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": cmpl_id, "object": "text_completion", "created": created, "model": model, "choices": choices}

    async def completions(request: web.Request) -> web.StreamResponse:
        body = json.loads(await request.read())
        model = body["model"]
        num_tokens = int(body.get("max_tokens") or 16)
        cmpl_id = "cmpl-" + secrets.token_hex(12)
        created = int(time.time())
        usage = {"prompt_tokens": 5, "completion_tokens": num_tokens, "total_tokens": 5 + num_tokens}
        if not body.get("stream"):
            text = " tok" * num_tokens
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "length"}
            return web.json_response({**envelope(model, cmpl_id, created, [choice]), "usage": usage})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)

        async def send(payload: dict[str, Any] | str) -> None:
            data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
            await response.write(f"data: {data}\n\n".encode())

        for _ in range(num_tokens):
            await send(envelope(model, cmpl_id, created,
                                [{"index": 0, "text": " tok", "logprobs": None, "finish_reason": None}]))
            await asyncio.sleep(0)  # one scheduling point per token, as sllmd's dummy engine has
        await send(envelope(model, cmpl_id, created,
                            [{"index": 0, "text": "", "logprobs": None, "finish_reason": "length"}]))
        if (body.get("stream_options") or {}).get("include_usage"):
            await send({**envelope(model, cmpl_id, created, []), "usage": usage})
        await send("[DONE]")
        await response.write_eof()
        return response

    async def health(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def serve() -> None:
        app = web.Application()
        app.router.add_post("/v1/completions", completions)
        app.router.add_get("/health", health)
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, reuse_address=True).start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        await runner.cleanup()

    uvloop.run(serve())
    return 0


# -- the client -----------------------------------------------------------------------------------


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (q in (0, 1])."""
    if not sorted_values:
        return math.nan
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))]


class Load:
    """Results of one measured level against one server."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.ttfts: list[float] = []
        self.num_tokens = 0
        self.num_chunks = 0
        self.errors = 0
        self.first_error: str | None = None
        self.elapsed_s = 0.0

    def fail(self, message: str) -> None:
        self.errors += 1
        if self.first_error is None:
            self.first_error = message[:300]

    def summary(self, *, stream: bool) -> dict[str, Any]:
        lat = sorted(self.latencies)
        out: dict[str, Any] = {
            "requests": len(lat),
            "errors": self.errors,
            "elapsed_s": round(self.elapsed_s, 3),
            "rps": round(len(lat) / self.elapsed_s, 1) if self.elapsed_s > 0 else 0.0,
            "p50_ms": round(percentile(lat, 0.50) * 1000, 3),
            "p99_ms": round(percentile(lat, 0.99) * 1000, 3),
        }
        if stream:
            ttft = sorted(self.ttfts)
            out["tokens_per_s"] = round(self.num_tokens / self.elapsed_s, 1) if self.elapsed_s > 0 else 0.0
            out["chunks_per_s"] = round(self.num_chunks / self.elapsed_s, 1) if self.elapsed_s > 0 else 0.0
            out["ttft_p50_ms"] = round(percentile(ttft, 0.50) * 1000, 3)
            out["ttft_p99_ms"] = round(percentile(ttft, 0.99) * 1000, 3)
        if self.first_error is not None:
            out["first_error"] = self.first_error
        return out


async def _one_plain(session: aiohttp.ClientSession, url: str, payload: bytes, max_tokens: int, load: Load) -> bool:
    async with session.post(url, data=payload, headers={"Content-Type": "application/json"}) as resp:
        raw = await resp.read()
    if resp.status != 200:
        load.fail(f"HTTP {resp.status}: {raw[:200]!r}")
        return False
    body = json.loads(raw)
    choices = body.get("choices")
    if (not isinstance(choices, list) or len(choices) != 1 or not choices[0].get("text")
            or body.get("usage", {}).get("completion_tokens") != max_tokens):
        load.fail(f"unexpected body: {raw[:200]!r}")
        return False
    return True


async def _one_stream(session: aiohttp.ClientSession, url: str, payload: bytes, began: float, load: Load) -> bool:
    tokens = None
    async with session.post(url, data=payload, headers={"Content-Type": "application/json"}) as resp:
        if resp.status != 200:
            load.fail(f"HTTP {resp.status}: {(await resp.read())[:200]!r}")
            return False
        try:
            async for event in sse_events(resp):
                if event.get("usage"):
                    tokens = event["usage"].get("completion_tokens")
                for choice in event.get("choices") or ():
                    if choice.get("text"):
                        load.num_chunks += 1
                        if began > 0:
                            load.ttfts.append(time.perf_counter() - began)
                            began = 0.0
        except StreamError as exc:
            load.fail(str(exc))
            return False
    if not isinstance(tokens, int):
        load.fail(f"stream ended without usage (tokens={tokens})")
        return False
    load.num_tokens += tokens
    return True


async def measure(base_url: str, *, concurrency: int, max_requests: int, time_limit_s: float, max_tokens: int,
                  stream: bool = False) -> Load:
    """`concurrency` clients, each sending sequential requests, until `max_requests` were sent in
    total or `time_limit_s` passed."""
    body: dict[str, Any] = {"model": MODEL, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    payload = json.dumps(body).encode()
    url = base_url + "/v1/completions"
    load = Load()
    budget = [max_requests]
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        deadline = math.inf

        async def client() -> None:
            while budget[0] > 0 and time.perf_counter() < deadline:
                budget[0] -= 1
                began = time.perf_counter()
                try:
                    if stream:
                        ok = await _one_stream(session, url, payload, began, load)
                    else:
                        ok = await _one_plain(session, url, payload, max_tokens, load)
                except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                    load.fail(f"{type(exc).__name__}: {exc}")
                    ok = False
                if ok:
                    load.latencies.append(time.perf_counter() - began)

        async def connect() -> None:  # one untimed request per client, so every connection is open
            scratch = Load()
            try:
                if stream:
                    await _one_stream(session, url, payload, 0.0, scratch)
                else:
                    await _one_plain(session, url, payload, max_tokens, scratch)
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                scratch.fail(f"{type(exc).__name__}: {exc}")
            if scratch.first_error is not None:
                load.fail("connect request: " + scratch.first_error)

        await asyncio.gather(*(connect() for _ in range(concurrency)))
        deadline = time.perf_counter() + time_limit_s
        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        load.elapsed_s = time.perf_counter() - started
    return load


def ratio(numerator: float, denominator: float) -> float | None:
    if not denominator or math.isnan(numerator) or math.isnan(denominator):
        return None
    return round(numerator / denominator, 3)


# -- orchestration --------------------------------------------------------------------------------


async def _json(session: aiohttp.ClientSession, method: str, url: str, body: Any = None) -> tuple[int, Any]:
    async with session.request(method, url, json=body) as resp:
        return resp.status, await resp.json(content_type=None)


async def deploy_dummy(base_url: str, checkpoint: Path, timeout_s: float = 60.0) -> None:
    """Deploy the demo model with backend dummy and one always-on instance; wait until it is ready."""
    spec = {
        "name": MODEL, "checkpoint": str(checkpoint), "backend": "dummy",
        "autoscaling": {"min_instances": 1, "max_instances": 1, "target_concurrency": 64, "keep_alive_s": 3600},
    }
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        status, body = await _json(session, "POST", base_url + "/admin/models", spec)
        if status != 201:
            raise RuntimeError(f"POST /admin/models answered {status}: {body}")
        deadline = time.perf_counter() + timeout_s
        while True:
            status, body = await _json(session, "GET", f"{base_url}/admin/models/{MODEL}")
            states = [i.get("state") for i in body.get("instances", [])] if status == 200 else []
            if "ready" in states:
                return
            if time.perf_counter() > deadline:
                raise RuntimeError(f"dummy instance not ready after {timeout_s:.0f}s: {status} {body}")
            await asyncio.sleep(0.05)


async def bench(args: argparse.Namespace, sllmd_url: str, baseline_url: str) -> dict[str, Any]:
    servers = {"sllmd": sllmd_url, "baseline": baseline_url}
    say = args.say
    for name, url in servers.items():  # warm up: connections, code paths, allocator
        for stream in (False, True):
            load = await measure(url, concurrency=16, max_requests=args.warmup, time_limit_s=30,
                                 max_tokens=args.max_tokens, stream=stream)
            if load.errors:
                raise RuntimeError(f"warm-up against {name} failed: {load.first_error}")
    say(f"warmed up ({args.warmup} plain + {args.warmup} streaming requests per server)")

    results: dict[str, Any] = {"levels": {}}
    order = list(servers)
    for level in LEVELS:
        entry: dict[str, Any] = {}
        for name in order:
            load = await measure(servers[name], concurrency=level, max_requests=args.requests,
                                 time_limit_s=args.time_limit, max_tokens=args.max_tokens)
            entry[name] = load.summary(stream=False)
        order.reverse()  # alternate who goes first, so drift on the machine does not favour one
        entry["rps_ratio"] = ratio(entry["baseline"]["rps"], entry["sllmd"]["rps"])
        entry["p50_ratio"] = ratio(entry["sllmd"]["p50_ms"], entry["baseline"]["p50_ms"])
        results["levels"][str(level)] = {"sllmd": entry["sllmd"], "baseline": entry["baseline"],
                                         "rps_ratio": entry["rps_ratio"], "p50_ratio": entry["p50_ratio"]}
        s, b = entry["sllmd"], entry["baseline"]
        say(f"c={level:<3} sllmd {s['rps']:>8.1f} rps p50 {s['p50_ms']:>7.2f} ms p99 {s['p99_ms']:>7.2f} ms | "
            f"baseline {b['rps']:>8.1f} rps p50 {b['p50_ms']:>7.2f} ms p99 {b['p99_ms']:>7.2f} ms | "
            f"rps x{entry['rps_ratio']} p50 x{entry['p50_ratio']}")

    stream_entry: dict[str, Any] = {"concurrency": STREAM_CONCURRENCY}
    for name in order:
        load = await measure(servers[name], concurrency=STREAM_CONCURRENCY, max_requests=args.stream_requests,
                             time_limit_s=args.time_limit, max_tokens=args.max_tokens, stream=True)
        stream_entry[name] = load.summary(stream=True)
    s, b = stream_entry["sllmd"], stream_entry["baseline"]
    stream_entry["tokens_per_s_ratio"] = ratio(b["tokens_per_s"], s["tokens_per_s"])
    stream_entry["p50_ratio"] = ratio(s["p50_ms"], b["p50_ms"])
    stream_entry["ttft_p50_ratio"] = ratio(s["ttft_p50_ms"], b["ttft_p50_ms"])
    results["stream_16"] = stream_entry
    say(f"stream c={STREAM_CONCURRENCY} sllmd {s['tokens_per_s']:.0f} tok/s ttft p50 {s['ttft_p50_ms']:.2f} ms | "
        f"baseline {b['tokens_per_s']:.0f} tok/s ttft p50 {b['ttft_p50_ms']:.2f} ms | "
        f"tok/s x{stream_entry['tokens_per_s_ratio']}")
    return results


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with terminate_as_exception(), temp_dir("sllmd-bench-serving-") as tmp:
        began = time.perf_counter()
        checkpoint = make_demo_model(tmp / "demo-model")
        children = []
        try:
            children.append(start_daemon(tmp / "data", log_path=tmp / "sllmd.log"))
            children.append(start_script(Path(__file__).resolve(), ["--baseline-server"],
                                         log_path=tmp / "baseline.log"))
            await asyncio.gather(*(child.wait_ready() for child in children))
            sllmd, baseline = children
            await deploy_dummy(sllmd.base_url, checkpoint)
            args.say(f"servers ready (sllmd in {sllmd.ready_s:.2f}s, baseline in {baseline.ready_s:.2f}s)")
            results = await bench(args, sllmd.base_url, baseline.base_url)
            if sllmd.proc.poll() is not None:
                raise RuntimeError(f"sllmd exited during the run; log tail:\n{sllmd.log_tail()}")
        finally:
            for child in reversed(children):
                child.stop()
        results["max_tokens"] = args.max_tokens
        results["requests_per_level"] = args.requests
        results["time_limit_s"] = args.time_limit
        results["total_s"] = round(time.perf_counter() - began, 1)
        return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="only the JSON result on stdout")
    parser.add_argument("--requests", type=int, default=2000, help="requests per level and server (default 2000)")
    parser.add_argument("--max-tokens", type=int, default=16, help="max_tokens per request (default 16)")
    parser.add_argument("--stream-requests", type=int, default=None,
                        help="streaming requests per server (default: --requests / 2)")
    parser.add_argument("--warmup", type=int, default=200, help="warm-up requests per server and mode")
    parser.add_argument("--time-limit", type=float, default=20.0, help="seconds per level and server (default 20)")
    parser.add_argument("--baseline-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.baseline_server:
        if not args.port:
            parser.error("--baseline-server needs --port")
        return run_baseline_server(args.port)
    if args.requests < 1 or args.max_tokens < 1 or args.warmup < 1 or args.time_limit <= 0:
        parser.error("--requests, --max-tokens and --warmup must be >= 1 and --time-limit > 0")
    if args.stream_requests is None:
        args.stream_requests = max(1, args.requests // 2)

    def say(line: str) -> None:
        print(line, file=sys.stderr if args.json else sys.stdout, flush=True)

    args.say = say
    import uvloop

    results = uvloop.run(run(args))
    print(json.dumps(results))
    num_errors = sum(v[s]["errors"] for v in results["levels"].values() for s in ("sllmd", "baseline"))
    num_errors += sum(results["stream_16"][s]["errors"] for s in ("sllmd", "baseline"))
    return 1 if num_errors else 0


if __name__ == "__main__":
    sys.exit(main())
