"""`sllmd simulate`: the real routing, placement, estimators and autoscaler on a simulated cluster, against
the placements users get today, on one trace. Prints a table, then (last line) JSON.

Setup (`simcluster`, `trace`), the regime of the ServerlessLLM paper (OSDI'24 §7): many models, few GPUs,
GPUs busy with long-running inference, each checkpoint local on one server only. 4 servers × 4 80 GB GPUs;
40 models (8 deployments each of OPT-6.7B, Llama-2-7B, OPT-13B, Llama-2-13B and OPT-30B at fp16, 13–60 GB,
1.1 TB in all); each checkpoint on ONE server's SSD (`plan_checkpoint_homes`, k=1); per server a 160 GB DRAM
cache (2–12 checkpoints) and a 500 GB SSD checkpoint cache (under half the catalogue); DRAM→GPU 25 GB/s
(PCIe 4.0 x16), SSD→GPU 6 GB/s (one NVMe drive), peer→SSD 1.25 GB/s (10 Gbps), repository 0.2 GB/s.
Autoscaling: up to 4 instances per model at a target of 4 concurrent requests, 60 s keep-alive. Requests
enter the servers in turn and go where the daemon's `routing.route` sends them, for every policy alike
(`simengine`). The built-in trace: 2 h of Azure-Functions-like arrivals (Gamma, CV 8, Zipf-skewed rates, 1.5
req/s in all) with ShareGPT-like lengths (median ~200 output tokens, a tail in the thousands) decoded at
batch 1 (24 ms/token for 7B … 55 ms for 30B), so a request runs for seconds to minutes and the GPUs holding
a model's local copy are often all busy when it cold-starts. Requests arriving in the first BUILTIN_WARMUP_S
(600 s, every model's first cold start at once) are played but not measured, for every policy alike. Startup
latency is arrival → first token; end-to-end is arrival → last token; GPU-seconds count every GPU from
placement to stop, over the whole run.

What drives each difference (p99 startup latency, built-in trace; seeds 0 / 1 / 2):
- sllmd: 20.9 / 18.7 / 35.2 s. Its tail is cold starts: requests that found no ready instance of their
  model (OPT-30B alone takes 13.3 s from its home SSD: 60 GB at 6 GB/s + 3.3 s init), or whose least
  loaded instance was at target, so routing asked for a new one and they wait for it.
- `no-migration` (2.8× / 1.5× / 2.8×: 59 / 27 / 98 s): when the one server holding a model (its SSD home,
  and mostly its DRAM) has all GPUs busy with running requests, it starts the model on another server,
  fetched from that peer at 1.25 GB/s first (13B: 28 s, 30B: 61 s), and that fetch holds the other
  server's NIC and SSD, so the loads queued behind it wait too, and its GPU serves nothing meanwhile. sllmd
  instead migrates a running instance to a server with a free GPU where that instance's model loads fast
  (DRAM/SSD there, a few seconds plus ~0.1–0.4 ms per moved token of re-prefill) and loads the cold model
  from the local DRAM or SSD: ~110 migrations in 2 h cut peer fetches from ~210 to ~110 and raise DRAM
  starts from ~750 to ~980. The gap needs the catalogue not to fit on every SSD: with a 1 TB SSD cache
  (fetched copies then sit almost everywhere) both policies read local copies and the ratio is 1.0.
- `ray-serve` (176× / 135× / 80×) and `ray-serve-cache` (64× / 80× / 57×): every cold start
  downloads 13–60 GB from the repository at 0.2 GB/s (65–300 s; the cache version only when the chosen
  server's SSD lacks it, which with placement by free GPUs alone is ~45% of its starts), one download at
  a time per server. At 1.5 req/s that is more downloading than 2 h holds, so their queues grow all run
  long and their p99 (~20–60 min) grows with the trace; the ratio is not a steady-state figure.
- `random` (4.1× / 4.1× / 3.0×): the same tiers as sllmd, but it ignores where checkpoints are and
  which loads are queued, so ~40% of its cold starts are peer fetches.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sllmd.sim.cluster import Hardware, catalogue
from sllmd.sim.engine import Outcome, Simulation
from sllmd.sim.policies import all_policies
from sllmd.sim.trace import Request, TokenLengths, TraceError, azure_like_trace, parse_csv
from sllmd.types import AutoscalingPolicy, Tier

NUM_MODEL_COPIES = 8
NUM_CHECKPOINT_HOMES = 1
AUTOSCALING = AutoscalingPolicy(min_instances=0, max_instances=4, target_concurrency=4, keep_alive_s=60.0)
BUILTIN_DURATION_S = 7200.0
BUILTIN_RATE = 1.5  # requests/s over all models
BUILTIN_WARMUP_S = 600.0  # requests arriving earlier are played but not measured


def builtin_trace(seed: int, *, duration_s: float = BUILTIN_DURATION_S,
                  lengths: TokenLengths = TokenLengths.SHAREGPT) -> list[Request]:
    models = [m.name for m in catalogue(NUM_MODEL_COPIES)]
    return azure_like_trace(models, duration_s=duration_s, total_rate=BUILTIN_RATE, seed=seed, lengths=lengths)


def simulate(trace: list[Request], seed: int, *, warmup_s: float = 0.0) -> dict[str, dict[str, Any]]:
    """Per policy name, the summary of playing `trace` (see `summarise`); requests arriving before
    `warmup_s` are played but left out of the latency figures."""
    summaries = {}
    for policy in all_policies(seed):
        sim = Simulation(Hardware(), catalogue(NUM_MODEL_COPIES), AUTOSCALING, policy, num_homes=NUM_CHECKPOINT_HOMES)
        summaries[policy.name] = summarise(sim.run(trace), warmup_s)
    return summaries


def summarise(outcome: Outcome, warmup_s: float) -> dict[str, Any]:
    """Latency percentiles over the requests arriving at or after `warmup_s` ("requests" counts them);
    GPU-seconds, cold starts and migrations over the whole run."""
    measured = [r for r in outcome.requests if r.request.time_s >= warmup_s]
    startup = sorted(r.first_token_s - r.request.time_s for r in measured)  # type: ignore[operator]
    e2e = sorted(r.done_s - r.request.time_s for r in measured)  # type: ignore[operator]
    return {
        "p50_s": percentile(startup, 50), "p99_s": percentile(startup, 99), "mean_s": _mean(startup),
        "e2e_p50_s": percentile(e2e, 50), "e2e_p99_s": percentile(e2e, 99), "e2e_mean_s": _mean(e2e),
        "gpu_s": round(outcome.gpu_s, 1),
        "cold_starts": {str(t): outcome.cold_starts.get(str(t), 0) for t in Tier if t is not Tier.DEVICE},
        "migrations": outcome.num_migrations,
        "max_gpus_used": outcome.max_slots_used,
        "requests": len(measured),
        "startup_s": startup,
    }


def percentile(ordered: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks of an ascending sequence; 0 when empty."""
    if not ordered:
        return 0.0
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return round(ordered[low] + (ordered[high] - ordered[low]) * (rank - low), 3)


def _mean(values: Sequence[float]) -> float:
    return round(sum(values) / len(values), 3) if values else 0.0


def table(summaries: dict[str, dict[str, Any]]) -> str:
    head = f"{'policy':<16}{'p50 s':>8}{'p99 s':>9}{'mean s':>9}{'e2e p99 s':>11}{'GPU-s':>10}{'migr':>6}  cold starts"
    lines = [head]
    for name, s in summaries.items():
        colds = " ".join(f"{tier}={n}" for tier, n in s["cold_starts"].items())
        lines.append(f"{name:<16}{s['p50_s']:>8.2f}{s['p99_s']:>9.2f}{s['mean_s']:>9.2f}{s['e2e_p99_s']:>11.2f}"
                     f"{s['gpu_s']:>10.0f}{s['migrations']:>6}  {colds}")
    return "\n".join(lines)


def plot(summaries: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, s in summaries.items():
        values = s["startup_s"]
        ax.step(values, [(i + 1) / len(values) for i in range(len(values))], where="post", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("startup latency, arrival → first token (s)")
    ax.set_ylabel("fraction of requests")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def load_trace(spec: str, seed: int, lengths: TokenLengths | None) -> list[Request]:
    """The built-in trace (ShareGPT-like lengths unless `lengths`) or the CSV file at `spec` (token
    counts it lacks drawn from `lengths`, GSM8K-like unless given)."""
    if spec == "builtin":
        return builtin_trace(seed, lengths=lengths or TokenLengths.SHAREGPT)
    lengths = lengths or TokenLengths.GSM8K
    try:
        text = Path(spec).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise TraceError(f"cannot read {spec}: {exc}") from None
    return parse_csv(text, known_models={m.name for m in catalogue(NUM_MODEL_COPIES)}, lengths=lengths, seed=seed)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="sllmd simulate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace", default="builtin",
                        help="'builtin' or a CSV of time_s,model[,prompt_tokens,output_tokens] (default builtin)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the trace and the random policy (default 0)")
    parser.add_argument("--lengths", choices=[t.value for t in TokenLengths],
                        help="token lengths of generated requests (default: sharegpt for the built-in trace, "
                             "gsm8k for a CSV's rows without them)")
    parser.add_argument("--warmup", type=float, metavar="S",
                        help=f"leave requests arriving in the first S seconds out of the latency figures "
                             f"(default: {BUILTIN_WARMUP_S:.0f} for the built-in trace, 0 for a CSV)")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    parser.add_argument("--plot", type=Path, metavar="FILE", help="write a PNG of the startup-latency CDFs")
    args = parser.parse_args(argv)
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("sllmd simulate: --plot needs matplotlib (pip install 'sllmd[sim]')", file=sys.stderr)
            return 2
    warmup_s = args.warmup if args.warmup is not None else BUILTIN_WARMUP_S if args.trace == "builtin" else 0.0
    if not (math.isfinite(warmup_s) and warmup_s >= 0):
        print(f"sllmd simulate: --warmup must be a finite number of seconds >= 0, got {args.warmup}", file=sys.stderr)
        return 2
    try:
        trace = load_trace(args.trace, args.seed, TokenLengths(args.lengths) if args.lengths else None)
    except TraceError as exc:
        print(f"sllmd simulate: {exc}", file=sys.stderr)
        return 2
    if all(r.time_s < warmup_s for r in trace):
        print(f"sllmd simulate: every request arrives within the {warmup_s:g} s warm-up; lower --warmup",
              file=sys.stderr)
        return 2
    summaries = simulate(trace, args.seed, warmup_s=warmup_s)
    if args.plot is not None:
        plot(summaries, args.plot)
    for summary in summaries.values():
        del summary["startup_s"]
    if not args.json:
        print(f"{len(trace)} requests, trace {args.trace}, seed {args.seed}; latencies of the "
              f"{summaries['sllmd']['requests']} arriving after {warmup_s:g} s")
        print(table(summaries))
    print(json.dumps({"policies": summaries, "seed": args.seed, "trace": args.trace, "warmup_s": warmup_s}))
    return 0
