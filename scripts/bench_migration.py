"""Live-migration benchmark: two real daemons on loopback, requests moved mid-stream.

    python scripts/bench_migration.py [--json] [--requests 8] [--max-tokens 160] [--runs 3]

Builds the demo model (transformers backend, CPU, fp32), starts daemon `s` (it deploys the model) and
daemon `d` (joins it), both with one torch thread. Then:

1. Baseline: `--requests` concurrent streaming completions (half greedy, half seeded sampling at
   temperature 0.8, each with its own prompt) to the node running the instance; nothing migrates.
   decode_step_ms_p50 is the median gap between two streamed chunks of one request here.
2. `--runs` migrated runs: the same requests to the node running the instance; once every stream has
   received `--migrate-after` chunks, POST /admin/instances/{id}/migrate to the other node (s→d, then
   d→s, ...). Each run's streams must match the baseline exactly (text and completion token count):
   `identical`. A request's stall is its largest gap between two chunks that arrived from the POST
   to 0.5 s after its answer (the cut-over lies in there); migration_ms is the POST's duration as the
   client sees it, the destination's model start included (the result's start_s also appears).

The last stdout line is JSON: {"requests", "identical", "stall_ms_p50", "stall_ms_max",
"decode_step_ms_p50", "migration_ms_p50", ...}. Timings here are noisy: read the stall against
decode_step_ms_p50 from the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
from _daemon import Child, free_ports, make_demo_model, sse_events, temp_dir, terminate_as_exception

MODEL = "demo"
AFTER_CUT_OVER_S = 0.5
PROMPTS = ["Once upon a time", "The weather today", "In a distant land", "My favourite food is",
           "Numbers: one, two,", "The ship sailed", "Dear friend,", "A long time ago"]


def start_node(root: Path, node_id: str, *, model: Path | None = None, join: str = "") -> tuple[Child, str]:
    port, peer_port = free_ports(2)
    argv = [sys.executable, "-m", "sllmd", "--data-dir", str(root / node_id), "--port", str(port),
            "--peer-port", str(peer_port), "--node-id", node_id, "--log-format", "text"]
    if model is not None:
        argv += ["--deploy", f"{MODEL}={model}"]
    if join:
        argv += ["--join", join]
    os.environ["SLLMD_SERVING_TORCH_THREADS"] = "1"  # two daemons share two cores
    return Child(argv, port, root / f"{node_id}.log", name=f"sllmd-{node_id}"), f"127.0.0.1:{peer_port}"


def request_body(i: int, max_tokens: int) -> dict[str, Any]:
    sampling = {"temperature": 0} if i % 2 == 0 else {"temperature": 0.8, "top_p": 0.95, "seed": 1000 + i}
    return {"model": MODEL, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}, **sampling}


async def stream(session: aiohttp.ClientSession, url: str, body: dict[str, Any],
                 progress: asyncio.Event, migrate_after: int) -> dict[str, Any]:
    """One streamed completion: its text, completion tokens and chunk arrival times (perf_counter)."""
    parts: list[str] = []
    times: list[float] = []
    usage: dict[str, Any] = {}
    async with session.post(url + "/v1/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"completion answered {resp.status}: {(await resp.read())[:300]!r}")
        async for event in sse_events(resp):
            for choice in event.get("choices") or ():
                if choice.get("text"):
                    parts.append(choice["text"])
                    times.append(time.perf_counter())
                    if len(times) == migrate_after:
                        progress.set()
            usage = event.get("usage") or usage
    progress.set()  # a request that ended early must not hold the migration back
    return {"text": "".join(parts), "completion_tokens": usage.get("completion_tokens"), "times": times}


async def run_requests(session: aiohttp.ClientSession, url: str, args: argparse.Namespace,
                       migrate: Any = None) -> tuple[list[dict[str, Any]], Any]:
    progress = [asyncio.Event() for _ in range(args.requests)]
    tasks = [asyncio.create_task(stream(session, url, request_body(i, args.max_tokens), progress[i],
                                        args.migrate_after)) for i in range(args.requests)]
    migrated = None
    if migrate is not None:
        await asyncio.gather(*(p.wait() for p in progress))
        migrated = await migrate()
    return list(await asyncio.gather(*tasks)), migrated


async def get(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as resp:
        return await resp.json()


async def instance_on(session: aiohttp.ClientSession, nodes: dict[str, Child]) -> tuple[str, str]:
    """(node id, instance id) of the model's one ready instance."""
    for node_id, child in nodes.items():
        for instance in (await get(session, f"{child.base_url}/admin/models/{MODEL}"))["instances"]:
            if instance["state"] == "ready":
                return node_id, instance["id"]
    raise RuntimeError("no ready instance")


def gaps_ms(times: list[float]) -> list[float]:
    return [(b - a) * 1e3 for a, b in itertools.pairwise(times)]


def stall_ms(times: list[float], began: float, ended: float) -> float:
    """The largest gap between two chunks of which the later arrived within [began, ended]."""
    return max(((b - a) * 1e3 for a, b in itertools.pairwise(times) if began <= b <= ended), default=0.0)


async def bench(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    model = make_demo_model(root / "model")
    source, source_peer = start_node(root, "s", model=model)
    nodes = {"s": source}
    try:
        await source.wait_ready()
        nodes["d"], _ = start_node(root, "d", join=source_peer)
        await nodes["d"].wait_ready()
        timeout = aiohttp.ClientTimeout(total=600)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for _ in range(600):
                view = await get(session, f"{source.base_url}/admin/cluster")
                models = await get(session, f"{nodes['d'].base_url}/v1/models")
                if len(view["nodes"]) == 2 and all(n["alive"] for n in view["nodes"]) and models["data"]:
                    break
                await asyncio.sleep(0.1)
            else:
                raise RuntimeError("d did not join")
            warm = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
            async with session.post(source.base_url + "/v1/completions", json=warm) as resp:
                assert resp.status == 200, await resp.text()
            baseline, _ = await run_requests(session, source.base_url, args)
            decode_gaps = [g for r in baseline for g in gaps_ms(r["times"])]
            stalls, migration_ms, start_ms, runs = [], [], [], []
            is_identical = True
            for _ in range(args.runs):
                here, instance_id = await instance_on(session, nodes)
                there = "d" if here == "s" else "s"
                window: dict[str, float] = {}

                async def migrate(here: str = here, there: str = there, instance_id: str = instance_id,
                                  window: dict[str, float] = window) -> Any:
                    window["began"] = time.perf_counter()
                    url = f"{nodes[here].base_url}/admin/instances/{instance_id}/migrate"
                    async with session.post(url, json={"to": there}) as resp:
                        result = await resp.json()
                    window["ended"] = time.perf_counter()
                    if resp.status != 200 or result["outcome"] != "moved":
                        raise RuntimeError(f"migration failed: {resp.status} {result}")
                    return result

                results, migrated = await run_requests(session, nodes[here].base_url, args, migrate)
                same = [r["text"] == b["text"] and r["completion_tokens"] == b["completion_tokens"]
                        for r, b in zip(results, baseline, strict=True)]
                is_identical = is_identical and all(same)
                run_stalls = [stall_ms(r["times"], window["began"], window["ended"] + AFTER_CUT_OVER_S)
                              for r in results]
                stalls += run_stalls
                migration_ms.append((window["ended"] - window["began"]) * 1e3)
                start_ms.append(migrated["start_s"] * 1e3)
                runs.append({"from": here, "to": there, "identical": all(same), "num_requests_moved":
                             migrated["num_requests"], "num_tokens_moved": migrated["num_tokens"],
                             "rounds": migrated["num_rounds"], "cut_over_ms": round(migrated["cut_over_s"] * 1e3, 2),
                             "stall_ms": [round(s, 1) for s in run_stalls]})
    except BaseException:
        for child in nodes.values():
            print(f"--- {child.name}\n{child.log_tail(30)}", file=sys.stderr)
        raise
    finally:
        for child in nodes.values():
            child.stop()
    return {
        "requests": args.requests, "identical": is_identical,
        "stall_ms_p50": round(statistics.median(stalls), 2), "stall_ms_max": round(max(stalls), 2),
        "decode_step_ms_p50": round(statistics.median(decode_gaps), 2),
        "migration_ms_p50": round(statistics.median(migration_ms), 2),
        "destination_start_ms_p50": round(statistics.median(start_ms), 2),
        "max_tokens": args.max_tokens, "runs": runs,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="only the JSON result line on stdout")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--migrate-after", type=int, default=30, help="chunks every stream has before migrating")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if args.requests < 1 or args.runs < 1 or not 0 < args.migrate_after < args.max_tokens:
        parser.error("need --requests >= 1, --runs >= 1 and 0 < --migrate-after < --max-tokens")
    with terminate_as_exception(), temp_dir("sllmd-bench-migration-") as root:
        result = asyncio.run(bench(args, root))
    if not args.json:
        for run in result["runs"]:
            print(run)
    print(json.dumps({k: v for k, v in result.items() if k != "runs"} | {"runs": result["runs"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
