"""Start-time estimator accuracy: sllmd's estimate of each instance start against the real start, on real loads.

    .venv/bin/python scripts/bench_estimator.py [--rounds 5] [--sizes-gb 1,2.5] [--tiers ssd,dram]

Deploys the demo model and synthetic Llama-shaped float32 checkpoints of `--sizes-gb` (built once and kept
under `--cache-dir`, with the demo model's tokenizer so requests work) on a real daemon, with keep_alive_s
0.5 so every instance stops between rounds. Each round, for each model (smallest first, so the init fit
sees every size): evict the store files' page cache (posix_fadvise DONTNEED, no root tricks), read the
node's calibration from /metrics, send one completion (max_tokens 1) that starts an instance from zero,
wait until the instance has stopped and its memory is free. One daemon per `--tiers` entry:

* ssd:  `[store] dram_budget_gb = 0`: every start reads the SSD store.
* dram: a DRAM cache big enough for all models: a model's first start reads the SSD and fills the cache,
        its later starts are DRAM hits.

Every start's "instance ready" line (JSON logs) gives tier, bytes, load_s, init_s, start_s (actual seconds,
start to ready) and estimated_s (the daemon's estimate when the start began). From the calibration read just
before the start, the estimate is split into its load and init parts, and the tier the daemon estimated for
is recovered (the one whose formula reproduces estimated_s); `other_s` = start_s - load_s - init_s is what
no estimator part covers (engine creation, store lease, state writes).

Reported per tier, overall, and excluding each model's first start on each daemon (that estimate still uses
the probe and the default init line): count, median and p90 of |start_s - estimated_s| in seconds and
relative to start_s, the median signed error (estimate - actual), and the median |error| of each part;
also each daemon's probed bandwidths and its calibration after the last start.
A table goes to stderr; the LAST stdout line is the JSON result.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from _daemon import ChildError, evict_page_cache, start_daemon, temp_dir, terminate_as_exception

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sllmd.scheduler.estimate import BYTES_PER_GB, Calibration, LinearFit, load_time_s  # noqa: E402
from sllmd.tools.demo_model import build_demo_model  # noqa: E402
from sllmd.types import EngineKind, Tier  # noqa: E402

KEEP_ALIVE_S = 0.5
REQUEST_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 60.0
POLL_S = 0.05
NUM_CPU_SLOTS = 2
DRAM_BUDGET_GB = 8.0  # the dram daemon's cache: every model here fits
ESTIMATE_MATCH_S = 1e-4  # the log rounds estimated_s to 0.1 ms; the metrics print full precision
HIDDEN, INTERMEDIATE, NUM_KV_HEADS, HEAD_DIM = 2048, 8192, 8, 64  # Llama-3.2-1B's layer shapes
FLOAT32_BYTES = 4
NOISE_ELEMENTS = 1 << 24  # one 64 MiB block of N(0, 0.02²) floats, tiled (at shifting offsets) over every tensor
WEIGHT_STD = 0.02
COPIED_FROM_DEMO_SKIP = {"config.json", "model.safetensors"}


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# ---- models -------------------------------------------------------------------------------------------------


def synthetic_shapes(num_bytes: float, vocab_size: int) -> tuple[int, list[tuple[str, tuple[int, ...]]]]:
    """(number of layers, [(tensor name, shape)]) of a float32 Llama with Llama-3.2-1B layers and the demo
    tokenizer's vocabulary (so every generated id decodes), with as many layers as come closest to `num_bytes`."""
    kv = NUM_KV_HEADS * HEAD_DIM
    layer_elements = 2 * HIDDEN * HIDDEN + 2 * kv * HIDDEN + 3 * HIDDEN * INTERMEDIATE + 2 * HIDDEN
    num_layers = max(1, round(num_bytes / FLOAT32_BYTES / layer_elements))
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab_size, HIDDEN))]
    for i in range(num_layers):
        p = f"model.layers.{i}."
        shapes += [(p + "input_layernorm.weight", (HIDDEN,)), (p + "post_attention_layernorm.weight", (HIDDEN,)),
                   (p + "self_attn.q_proj.weight", (HIDDEN, HIDDEN)), (p + "self_attn.k_proj.weight", (kv, HIDDEN)),
                   (p + "self_attn.v_proj.weight", (kv, HIDDEN)), (p + "self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
                   (p + "mlp.gate_proj.weight", (INTERMEDIATE, HIDDEN)),
                   (p + "mlp.up_proj.weight", (INTERMEDIATE, HIDDEN)),
                   (p + "mlp.down_proj.weight", (HIDDEN, INTERMEDIATE))]
    shapes += [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (vocab_size, HIDDEN))]
    return num_layers, shapes


def write_safetensors(path: Path, shapes: list[tuple[str, tuple[int, ...]]]) -> None:
    """A float32 safetensors file of `shapes`, streamed tensor by tensor (memory: one 64 MiB noise block)."""
    noise = (np.random.default_rng(0).standard_normal(NOISE_ELEMENTS, dtype=np.float32) * WEIGHT_STD)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes:
        size = int(np.prod(shape)) * FLOAT32_BYTES
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as out:
        out.write(len(encoded).to_bytes(8, "little") + encoded)
        for i, (_, shape) in enumerate(shapes):
            remaining = int(np.prod(shape))
            start = (i * 7919 * 1024) % NOISE_ELEMENTS  # different values per tensor
            while remaining:
                n = min(remaining, NOISE_ELEMENTS - start)
                out.write(noise[start : start + n].tobytes())
                remaining -= n
                start = 0
        out.flush()
        os.fsync(out.fileno())


def ensure_models(cache_dir: Path, sizes_gb: list[float]) -> dict[str, Path]:
    """{model name: Hugging Face directory}: the demo model and one synthetic model per size, built under
    `cache_dir` unless already complete there (a `complete` marker is written last)."""
    demo = cache_dir / "demo"
    if not (demo / "config.json").is_file():
        shutil.rmtree(demo, ignore_errors=True)
        build_demo_model(demo)
    models = {"demo": demo}
    demo_config = json.loads((demo / "config.json").read_text())
    for size_gb in sizes_gb:
        name = f"synth-{size_gb:g}gb".replace(".", "p")
        root = cache_dir / name
        models[name] = root
        if (root / "complete").is_file():
            continue
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        num_layers, shapes = synthetic_shapes(size_gb * BYTES_PER_GB, demo_config["vocab_size"])
        began = time.perf_counter()
        write_safetensors(root / "model.safetensors", shapes)
        config = {**demo_config, "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE,
                  "num_hidden_layers": num_layers, "num_attention_heads": HIDDEN // HEAD_DIM,
                  "num_key_value_heads": NUM_KV_HEADS, "head_dim": HEAD_DIM}
        (root / "config.json").write_text(json.dumps(config, indent=1))
        for file in demo.iterdir():
            if file.is_file() and file.name not in COPIED_FROM_DEMO_SKIP:
                shutil.copy2(file, root / file.name)
        (root / "complete").write_text("ok\n")
        log(f"built {name}: {num_layers} layers, {(root / 'model.safetensors').stat().st_size / 1e9:.2f} GB "
            f"in {time.perf_counter() - began:.1f}s")
    return models


# ---- one daemon ---------------------------------------------------------------------------------------------

_METRIC = re.compile(
    r'^(sllmd_estimator)(?:\{engine_kind="([^"]*)",quantity="([^"]*)",tier="([^"]*)"\})? (\S+)$')
KIND = EngineKind.TRANSFORMERS  # the engine every model here runs on


async def read_calibration(session: aiohttp.ClientSession, url: str) -> Calibration:
    """The node's calibration as its sllmd_estimator gauges show it."""
    async with session.get(url + "/metrics") as resp:
        text = await resp.text()
    gauges: dict[tuple[str, str, str], float] = {}
    for line in text.splitlines():
        if m := _METRIC.match(line):
            gauges[(m[3], m[4], m[2])] = float(m[5])
    calibration = Calibration(
        load_gbps={t: gauges[("load_gbps", str(t), "")] for t in (Tier.DRAM, Tier.SSD)},
        fetch_gbps={t: gauges[("fetch_gbps", str(t), "")] for t in (Tier.PEER, Tier.REPOSITORY)},
        init={k: LinearFit(gauges[("init_slope_s", "", k)], gauges[("init_intercept_s", "", k)]) for k in EngineKind},
        migration=LinearFit(gauges[("migration_slope_s", "", "")], gauges[("migration_intercept_s", "", "")]))
    return calibration


async def request_json(session: aiohttp.ClientSession, method: str, url: str, body: Any = None) -> Any:
    async with session.request(method, url, json=body) as resp:
        payload = await resp.json(content_type=None)
        if not 200 <= resp.status < 300:
            raise RuntimeError(f"{method} {url} answered {resp.status}: {str(payload)[:500]}")
        return payload


async def wait_stopped(session: aiohttp.ClientSession, url: str, model: str) -> None:
    """Until `model` has no instance and every device's memory is free again (its engine stopped)."""
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while time.monotonic() < deadline:
        view = await request_json(session, "GET", f"{url}/admin/models/{model}")
        (node,) = (await request_json(session, "GET", f"{url}/admin/cluster"))["nodes"]
        if not view["instances"] and all(d["free_bytes"] == d["budget_bytes"] for d in node["devices"]):
            return
        await asyncio.sleep(POLL_S)
    raise RuntimeError(f"{model}: instance not stopped {STOP_TIMEOUT_S:.0f}s after keep-alive")


def log_records(log_path: Path, message: str) -> list[dict[str, Any]]:
    """Every record with msg `message` of a JSON daemon log, in order (non-JSON lines are skipped)."""
    records = []
    for line in log_path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("msg") == message:
                records.append(record)
    return records


def estimate_parts(num_bytes: int, estimated_s: float, calibration: Calibration) -> tuple[str, float, float]:
    """(tier the daemon estimated for, its load seconds, its init seconds), recovered by finding the load tier
    whose formula under `calibration` comes closest to `estimated_s` ("?" if none is within ESTIMATE_MATCH_S)."""
    gb = num_bytes / BYTES_PER_GB
    init_s = max(0.0, calibration.init[KIND].predict(gb))
    tier = min((Tier.DRAM, Tier.SSD), key=lambda t: abs(load_time_s(KIND, num_bytes, t, calibration) - estimated_s))
    if abs(load_time_s(KIND, num_bytes, tier, calibration) - estimated_s) > ESTIMATE_MATCH_S:
        return "?", estimated_s - init_s, init_s
    return str(tier), gb / calibration.load_gbps[tier], init_s


async def run_daemon(daemon_tier: str, models: dict[str, Path], rounds: int,
                     tmp: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """All rounds on one fresh daemon: (one row per start, in order; the node's probe and final calibration)."""
    work = tmp / daemon_tier
    work.mkdir()
    budget = 0.0 if daemon_tier == "ssd" else DRAM_BUDGET_GB
    config = work / "sllmd.toml"
    config.write_text(f"[store]\ndram_budget_gb = {budget}\n\n[devices]\nkind = \"cpu\"\n"
                      f"cpu_slots = {NUM_CPU_SLOTS}\n")
    log_path = work / "sllmd.log"
    daemon = start_daemon(work / "data", log_path=log_path,
                          extra_args=["--config", str(config), "--log-format", "json"])
    calibrations: list[Calibration] = []
    requests: list[tuple[str, float]] = []
    try:
        await daemon.wait_ready()
        url = daemon.base_url
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)) as session:
            for name, path in models.items():
                began = time.perf_counter()
                await request_json(session, "POST", url + "/admin/models", {
                    "name": name, "checkpoint": str(path), "autoscaling": {"keep_alive_s": KEEP_ALIVE_S}})
                log(f"[{daemon_tier}] deployed {name} in {time.perf_counter() - began:.1f}s")
            for round_index in range(rounds):
                for name in models:
                    evict_page_cache(work / "data" / "store")
                    calibrations.append(await read_calibration(session, url))
                    began = time.perf_counter()
                    answer = await request_json(session, "POST", url + "/v1/completions", {
                        "model": name, "prompt": "Hello, my name is", "max_tokens": 1, "temperature": 0})
                    if not answer.get("choices"):
                        raise RuntimeError(f"completion of {name} has no choices: {answer}")
                    requests.append((name, time.perf_counter() - began))
                    await wait_stopped(session, url, name)
                log(f"[{daemon_tier}] round {round_index + 1}/{rounds} done")
            final = await read_calibration(session, url)
    except ChildError:
        raise
    except Exception as exc:
        raise RuntimeError(f"[{daemon_tier}] {exc}\nsllmd log tail:\n{daemon.log_tail()}") from exc
    finally:
        daemon.stop()
    records = log_records(log_path, "instance ready")
    probe = log_records(log_path, "probed load bandwidth")
    info = {"probe_gbps": {t: probe[0].get(f"{t}_gbps") for t in ("ssd", "dram")} if probe else None,
            "final": {"load_gbps": {str(t): round(g, 3) for t, g in final.load_gbps.items()},
                      "init_intercept_s": round(final.init[KIND].intercept, 4),
                      "init_slope_s": round(final.init[KIND].slope, 4)}}
    if len(records) != len(requests):
        raise RuntimeError(f"[{daemon_tier}] {len(requests)} requests but {len(records)} instance starts logged")
    rows, seen = [], set()
    for record, calibration, (name, request_s) in zip(records, calibrations, requests, strict=True):
        if not record["instance"].startswith(name + "-"):
            raise RuntimeError(f"[{daemon_tier}] start {record['instance']} does not match the request for {name}")
        est_tier, est_load_s, est_init_s = estimate_parts(record["bytes"], record["estimated_s"], calibration)
        rows.append({"daemon": daemon_tier, "model": name, "is_first": name not in seen, "tier": record["tier"],
                     "estimated_tier": est_tier, "bytes": record["bytes"], "start_s": record["start_s"],
                     "estimated_s": record["estimated_s"], "load_s": record["load_s"], "init_s": record["init_s"],
                     "est_load_s": round(est_load_s, 4), "est_init_s": round(est_init_s, 4),
                     "other_s": round(record["start_s"] - record["load_s"] - record["init_s"], 4),
                     "request_s": round(request_s, 4)})
        seen.add(name)
    return rows, info


# ---- statistics ---------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (q in [0, 1])."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Error statistics of `rows` (absolute seconds, relative to start_s, signed bias, per-part |error|)."""
    if not rows:
        return {"starts": 0}
    abs_err = [abs(r["start_s"] - r["estimated_s"]) for r in rows]
    rel_err = [e / r["start_s"] for e, r in zip(abs_err, rows, strict=True)]

    def p50_p90(values: list[float]) -> dict[str, float]:
        return {"p50": round(percentile(values, 0.5), 4), "p90": round(percentile(values, 0.9), 4)}

    return {
        "starts": len(rows),
        "abs_error_s": p50_p90(abs_err),
        "rel_error": p50_p90(rel_err),
        "bias_s": round(statistics.median(r["estimated_s"] - r["start_s"] for r in rows), 4),
        "median_start_s": round(statistics.median(r["start_s"] for r in rows), 4),
        "median_abs_part_error_s": {
            "load": round(statistics.median(abs(r["load_s"] - r["est_load_s"]) for r in rows), 4),
            "init": round(statistics.median(abs(r["init_s"] - r["est_init_s"]) for r in rows), 4),
            "other": round(statistics.median(abs(r["other_s"]) for r in rows), 4),
        },
    }


def grouped(rows: list[dict[str, Any]]) -> dict[str, Any]:
    tiers = sorted({r["tier"] for r in rows})
    return {**summary(rows), "by_tier": {t: summary([r for r in rows if r["tier"] == t]) for t in tiers}}


def print_table(rows: list[dict[str, Any]], result: dict[str, Any]) -> None:
    log(f"\n{'daemon':6s} {'model':12s} {'tier':5s} {'est':5s} {'GB':>5s} {'start_s':>8s} {'est_s':>7s} "
        f"{'load_s':>7s} {'est_ld':>7s} {'init_s':>7s} {'est_in':>7s} {'other':>6s}")
    for r in rows:
        log(f"{r['daemon']:6s} {r['model']:12s} {r['tier']:5s} {r['estimated_tier']:5s} {r['bytes'] / 1e9:5.2f} "
            f"{r['start_s']:8.3f} {r['estimated_s']:7.3f} {r['load_s']:7.3f} {r['est_load_s']:7.3f} "
            f"{r['init_s']:7.3f} {r['est_init_s']:7.3f} {r['other_s']:6.3f}{'  (first)' if r['is_first'] else ''}")
    log(f"\n{'group':22s} {'n':>3s} {'|err| p50':>9s} {'p90':>7s} {'rel p50':>8s} {'p90':>6s} {'bias':>7s}  "
        "|err| of load / init / other")
    for label, group in (("all", result), ("after_first", result["after_first"])):
        for name, s in [(label, group), *((f"{label}:{t}", v) for t, v in group["by_tier"].items())]:
            parts = s["median_abs_part_error_s"]
            log(f"{name:22s} {s['starts']:3d} {s['abs_error_s']['p50']:9.3f} {s['abs_error_s']['p90']:7.3f} "
                f"{s['rel_error']['p50']:8.2f} {s['rel_error']['p90']:6.2f} {s['bias_s']:7.3f}  "
                f"{parts['load']:.3f} / {parts['init']:.3f} / {parts['other']:.3f}")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    began = time.perf_counter()
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    models = ensure_models(args.cache_dir, args.sizes_gb)
    rows: list[dict[str, Any]] = []
    daemons: dict[str, Any] = {}
    with terminate_as_exception(), temp_dir("sllmd-bench-estimator-") as tmp:
        for daemon_tier in args.tiers:
            daemon_rows, daemons[daemon_tier] = await run_daemon(daemon_tier, models, args.rounds, tmp)
            rows += daemon_rows
    result = {**grouped(rows), "after_first": grouped([r for r in rows if not r["is_first"]])}
    mismatched = [r for r in rows if r["estimated_tier"] != r["tier"]]
    result.update({
        "rounds": args.rounds,
        "models": {name: next(r["bytes"] for r in rows if r["model"] == name) for name in models},
        "num_tier_mismatches": len(mismatched),
        "daemons": daemons,
        "per_start": [{k: r[k] for k in ("daemon", "model", "tier", "estimated_tier", "start_s", "estimated_s",
                                         "load_s", "est_load_s", "init_s", "est_init_s", "other_s")} for r in rows],
        "total_s": round(time.perf_counter() - began, 1),
    })
    print_table(rows, result)
    for daemon_tier, info in daemons.items():
        log(f"[{daemon_tier}] probed GB/s {info['probe_gbps']}; calibration at the end {info['final']}")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="cold starts per model per daemon (default 5)")
    parser.add_argument("--sizes-gb", default="1,2.5", help="synthetic model sizes, comma-separated (default 1,2.5)")
    parser.add_argument("--tiers", default="ssd,dram", help="daemons to run: ssd, dram or both (default ssd,dram)")
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/sllmd-bench-estimator-models"),
                        help="where the models are built and kept between runs")
    args = parser.parse_args()
    try:
        args.sizes_gb = [float(s) for s in args.sizes_gb.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--sizes-gb must be comma-separated numbers, got {args.sizes_gb!r}")
    if not all(0 < s <= 3.5 for s in args.sizes_gb):
        parser.error("--sizes-gb values must be in (0, 3.5]: a CPU slot holds 4 GB")
    args.tiers = [t.strip() for t in args.tiers.split(",") if t.strip()]
    if not args.tiers or not set(args.tiers) <= {"ssd", "dram"}:
        parser.error("--tiers must name ssd, dram or both")
    if not 1 <= args.rounds <= 50:
        parser.error("--rounds must be between 1 and 50")
    print(json.dumps(asyncio.run(run(args))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
