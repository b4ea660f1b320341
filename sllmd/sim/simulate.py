"""`sllmd simulate`: the real routing, placement, estimators, autoscaler and eviction rule on a simulated
cluster, against the placements and capacity rules users get today, on one trace. Prints a table, then (last
line) JSON.

Capacity (`simcluster.Capacity`, `--capacity`): `per-device`, an instance takes a whole GPU whatever its size
(sllmd before memory); `pack-lru`, `pack-cost` and `pack-keepalive`, each GPU is an 80 GB memory budget that
instances share while they fit, an instance holding its weights, a KV budget (`simcluster.KV_BATCH_SIZE`: 32
requests at the full 4096-token context, capped at 16 GiB) and engine overhead (one spanning k GPUs holds 1/k of
the weights and KV budget and a whole overhead on each); to make room, idle instances are evicted longest idle
first, by the daemon's cost rule (reload seconds × request rate per byte freed, cheapest first), or by Ollama's
rule (the keep-alive that ends soonest first). In every mode a cold start is a load that a request waited for
(it found no ready instance of its model); loads count every instance load, scale-outs beside a ready instance
and migrations' copies too.
Startup latency is arrival → first token; end-to-end is arrival → last token; GPU-seconds count each
instance's memory × its time from placement to stop, in whole GPUs, over the whole run.

The serverlessllm workload (the default; rows are placement policies, all under `--capacity`, pack-cost
unless given), the regime of the ServerlessLLM paper (OSDI'24 §7): many models, few GPUs, GPUs busy with
long-running inference, each checkpoint local on one server only. 4 servers × 4 80 GB GPUs; 40 models (8
deployments each of OPT-6.7B, Llama-2-7B, OPT-13B, Llama-2-13B and OPT-30B at fp16, 13–60 GB, 1.1 TB in all;
an instance asks 31–77 GB, so at most two share a GPU); each checkpoint on ONE server's SSD
(`plan_checkpoint_homes`, k=1); per server a 160 GB DRAM cache (2–12 checkpoints) and a 500 GB SSD checkpoint
cache (under half the catalogue); DRAM→GPU 25 GB/s (PCIe 4.0 x16), SSD→GPU 6 GB/s (one NVMe drive),
peer→SSD 1.25 GB/s (10 Gbps), repository 0.2 GB/s. Autoscaling: up to 4 instances per model at a target of 4
concurrent requests, 60 s keep-alive. Requests enter the servers in turn and go where the daemon's
`routing.route` sends them, for every policy alike (`simengine`). The built-in trace: 2 h of
Azure-Functions-like arrivals (Gamma, CV 8, Zipf-skewed rates, 1.5 req/s in all) with ShareGPT-like lengths
(median ~200 output tokens, a tail in the thousands) decoded at batch 1 (24 ms/token for 7B … 55 ms for 30B),
so a request runs for seconds to minutes and the GPUs holding a model's local copy are often all busy when it
cold-starts. Requests arriving in the first 600 s (every model's first cold start at once) are played but
not measured, for every policy alike.

What drives each difference (p99 startup latency, built-in trace, pack-cost; seeds 0 / 1 / 2):
- sllmd: 15.0 / 13.5 / 35.5 s. Its tail is cold starts: requests that found no ready instance of their
  model (OPT-30B alone takes 13.3 s from its home SSD: 60 GB at 6 GB/s + 3.3 s init), or whose least
  loaded instance was at target, so routing asked for a new one and they wait for it.
- `no-migration` (1.6× / 1.3× / 1.7×: 24 / 17 / 61 s): when the one server holding a model (its SSD home,
  and mostly its DRAM) has no room left beside running requests, it starts the model on another server,
  fetched from that peer at 1.25 GB/s first (13B: 28 s, 30B: 61 s), and that fetch holds the other
  server's NIC and SSD, so the loads queued behind it wait too. sllmd instead migrates a running instance
  to a server with room where that instance's model loads fast (DRAM/SSD there, a few seconds plus
  ~0.1–0.4 ms per moved token of re-prefill) and loads the cold model from the local DRAM or SSD: 35–51
  migrations in 2 h, peer fetches 103 / 99 / 125 against 106 / 138 / 155. Per device (a whole GPU each)
  there is less room, sllmd migrates 87–132 times and the ratio is 4.1× / 1.1× / 2.9× (sllmd 15.0 / 25.0 /
  27.3 s). The gap needs the catalogue not to fit on every SSD: with a 1 TB SSD cache (fetched copies then
  sit almost everywhere) both policies read local copies and the ratio is 1.0.
- `ray-serve` (500× / 195× / 186×) and `ray-serve-cache` (92× / 55× / 32×): every cold start downloads
  13–60 GB from the repository at 0.2 GB/s (65–300 s; the cache version only when the chosen server's SSD
  lacks it, which with placement by free memory alone is a third of its loads), one download at a time per
  server. At 1.5 req/s that is more downloading than 2 h holds, so their queues grow all run long and their
  p99 (12 min to 2 h) grows with the trace; the ratio is not a steady-state figure.
- `random` (5.7× / 5.5× / 3.2×): the same tiers as sllmd, but it ignores where checkpoints are and
  which loads are queued, so ~40% of its loads are peer fetches.

The serverlessllm-large workload (`--workload serverlessllm-large`; rows are placement policies): the same
cluster, links and trace generator with the paper's largest models too: the 40 deployments above plus 2
each of OPT-66B and Llama-2-70B (132 and 138 GB at fp16), last in the Zipf ranking (1–2% of requests, in
bursts). Neither fits one 80 GB GPU; an instance spans 2 of one server (`ModelSpec.num_gpus`: the fewest
GPUs that each hold its share of the weights and of the 16 GiB KV budget plus a whole engine overhead, 75
and 78 GB), loads from DRAM over both GPUs' PCIe links (138 GB: 2.8 s + 5.6 s init), from its home SSD at
the one drive's 6 GB/s (23 s + 5.6 s), from a peer after a 110 s fetch, and decodes at 59–61 ms/token. (The
daemon serves a model on several GPUs with vllm only; the init here is the simulated engine's, the same for
every model, so a new vLLM engine's tens of seconds are left out, for every policy alike.) The
caches grow with the catalogue (1.65 TB): 240 GB of DRAM (one such checkpoint beside smaller ones) and 750
GB of SSD per server. The table adds "multi-GPU p99 s": the 2-GPU models' requests alone. Seeds 0 / 1 / 2:
- p99 startup over all requests: sllmd 64.6 / 133.8 / 75.0 s; no-migration 101.6 / 101.7 / 111.0 s;
  random 128.9 / 159.0 / 104.0 s; ray-serve-cache 1102 / 1107 / 1098 s; ray-serve 7000-8000 s. Mean:
  sllmd 4.2 / 6.4 / 4.6 s, no-migration 4.5 / 4.5 / 5.1 s, random 10.6 / 11.4 / 9.6 s. So sllmd leads
  except on seed 1, where placement without migration wins on both.
- The 2-GPU models alone, p99: sllmd 259 / 194 / 223 s, no-migration 148 / 184 / 139 s, random 249 / 318 /
  176 s; mean: 39 / 79 / 46 s, 43 / 65 / 39 s, 83 / 134 / 77 s. Their mean is 0.5–0.6× random's, but their
  tail beats random's on seed 1 only and is worse than without migration on every seed. A 2-GPU start needs
  two GPUs of one server free or freed by evicting idle instances, and `plan_start` migrates at most one
  running instance, which makes room only where the other GPU is free already (once in 2 h); so while its
  home server's GPUs are busy, a burst for a 2-GPU model is started on another server from a peer: 139 s, and
  every node-tier policy's 2-GPU p99 is at least that. With ~100–230 such requests in 2 h, their p99 is one
  or two bursts: sllmd's 259 s on seed 0 is one peer fetch that queued behind 119 s of other loads, where
  without migration the same burst was started at its home (behind as many) and loaded from its SSD.
- ray-serve and ray-serve-cache download 132-138 GB at 0.2 GB/s (11-12 min) per cold start of a 2-GPU model.

The many-small workload (`--workload many-small`; rows are capacity modes, all with sllmd's placement): what
sharing GPUs buys when models are small. 2 servers × 4 80 GB GPUs (640 GB); 32 models (4 fine-tunes each of
Qwen2.5-0.5B, Llama-3.2-1B, Qwen2.5-1.5B, Qwen2.5-3B, Llama-3.2-3B, Qwen2.5-7B, Mistral-7B and Llama-3.1-8B at
fp16: 1–16 GB of weights, 260 GB in all; an instance asks 3–34 GB, 554 GB for one of each); the same caches,
links and trace generator (1 h, 1 req/s, 600 s warm-up); up to 4 instances per model, keep-alives of 5, 15,
30 and 60 min by copy (as operators set them per deployment), so hot models' scale-outs and idle instances fill
memory (over 98% held at the peak) and idle instances are evicted to make room far more often than they time
out. Seeds 0 / 1 / 2:
- cold starts: per-device 259 / 315 / 304; pack-lru 115 / 124 / 117; pack-cost 113 / 110 / 121 (2.3× / 2.9× /
  2.5× fewer than per-device); pack-keepalive (Ollama's rule) 114 / 132 / 140. p99 startup: per-device 5.1 /
  4.7 / 7.8 s; every packing mode 2.6–2.7 s (an 8B model's load from DRAM). The eight GPUs hold eight instances
  per device, 50-odd packed.
- the eviction rules: the cost rule evicts the fewest instances (234 / 254 / 301, against LRU's 268 / 293 / 350
  and Ollama's 325 / 385 / 462) and uses the fewest GPU-seconds; its cold starts are within 10% of LRU's and
  2–16% under Ollama's, which stops a popular model whose keep-alive happens to be short. They are close
  because a reload takes nearly the same 1.6–2.6 s at every size here (DRAM at 25 GB/s plus 1.5 s init), so
  the cost rule ranks by request rate per byte, and under Zipf arrivals recency tracks rate.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sllmd.sim.cluster import LARGE_BASE_MODELS, SMALL_BASE_MODELS, Capacity, Hardware, ModelSpec, catalogue
from sllmd.sim.engine import Outcome, Simulation
from sllmd.sim.policies import Sllmd, all_policies
from sllmd.sim.trace import Request, TokenLengths, TraceError, azure_like_trace, parse_csv
from sllmd.types import AutoscalingPolicy, Tier


class Workload(enum.StrEnum):
    SERVERLESSLLM = "serverlessllm"  # the paper's regime; rows are placement policies
    SERVERLESSLLM_LARGE = "serverlessllm-large"  # the same with 4 models spanning 2 GPUs; rows are placement policies
    MANY_SMALL = "many-small"  # 32 small models on 2 servers; rows are capacity modes

    @property
    def compares_policies(self) -> bool:
        """Its rows are placement policies (else capacity modes under sllmd's placement)."""
        return self is not Workload.MANY_SMALL


def with_keep_alives(models: list[ModelSpec], num_bases: int, keep_alives_s: Sequence[float]) -> list[ModelSpec]:
    """`models` (a `catalogue`, copy by copy of `num_bases` base models) with copy i kept alive
    `keep_alives_s[i % len(keep_alives_s)]` seconds."""
    return [dataclasses.replace(model, keep_alive_s=keep_alives_s[(i // num_bases) % len(keep_alives_s)])
            for i, model in enumerate(models)]


@dataclass(frozen=True, slots=True)
class Setup:
    """A workload's cluster, catalogue, autoscaling and built-in trace."""

    hardware: Hardware
    models: tuple[ModelSpec, ...]
    autoscaling: AutoscalingPolicy
    duration_s: float  # of the built-in trace
    rate: float  # requests/s over all models
    warmup_s: float  # requests arriving earlier are played but not measured
    num_homes: int = 1  # SSD checkpoint homes per model


SETUPS = {
    Workload.SERVERLESSLLM: Setup(
        Hardware(), tuple(catalogue(8)),
        AutoscalingPolicy(min_instances=0, max_instances=4, target_concurrency=4, keep_alive_s=60.0),
        duration_s=7200.0, rate=1.5, warmup_s=600.0),
    # The serverlessllm catalogue plus 2 deployments each of OPT-66B and Llama-2-70B (2 GPUs each), last in the
    # Zipf ranking. The caches grow with the catalogue (1.1 → 1.65 TB), so each server still holds under half
    # of it on its SSD and, in DRAM, one 138 GB checkpoint beside the smaller ones.
    Workload.SERVERLESSLLM_LARGE: Setup(
        Hardware(dram_cache_bytes=240 * 10**9, ssd_cache_bytes=750 * 10**9),
        (*catalogue(8), *catalogue(2, LARGE_BASE_MODELS)),
        AutoscalingPolicy(min_instances=0, max_instances=4, target_concurrency=4, keep_alive_s=60.0),
        duration_s=7200.0, rate=1.5, warmup_s=600.0),
    # Keep-alives long enough (5 min to 1 h, 15 min for the workload's default) that memory pressure, not the
    # timer, stops most idle instances; they differ by deployment, as operators set them, so Ollama's rule (the
    # keep-alive that ends soonest first) is not LRU's.
    Workload.MANY_SMALL: Setup(
        Hardware(num_servers=2), tuple(with_keep_alives(catalogue(4, SMALL_BASE_MODELS), len(SMALL_BASE_MODELS),
                                                        (900.0, 300.0, 3600.0, 1800.0))),
        AutoscalingPolicy(min_instances=0, max_instances=4, target_concurrency=4, keep_alive_s=900.0),
        duration_s=3600.0, rate=1.0, warmup_s=600.0),
}


def builtin_trace(seed: int, *, workload: Workload = Workload.SERVERLESSLLM, duration_s: float | None = None,
                  lengths: TokenLengths = TokenLengths.SHAREGPT) -> list[Request]:
    setup = SETUPS[workload]
    return azure_like_trace([m.name for m in setup.models], duration_s=duration_s or setup.duration_s,
                            total_rate=setup.rate, seed=seed, lengths=lengths)


def simulate(trace: list[Request], seed: int, *, warmup_s: float = 0.0, capacity: Capacity = Capacity.PACK_COST,
             workload: Workload = Workload.SERVERLESSLLM) -> dict[str, dict[str, Any]]:
    """Per placement policy, the summary of playing `trace` on `workload`'s setup (one that compares policies)
    under `capacity` (see `summarise`); requests arriving before `warmup_s` are played but left out of the
    latency figures."""
    setup = SETUPS[workload]
    return {policy.name: summarise(Simulation(setup.hardware, list(setup.models), setup.autoscaling, policy,
                                              capacity=capacity, num_homes=setup.num_homes).run(trace), warmup_s)
            for policy in all_policies(seed)}


def compare_capacities(trace: list[Request], *, warmup_s: float = 0.0,
                       capacities: Sequence[Capacity] = tuple(Capacity)) -> dict[str, dict[str, Any]]:
    """Per capacity mode, the summary of playing `trace` on the many-small setup with sllmd's placement."""
    setup = SETUPS[Workload.MANY_SMALL]
    return {str(capacity): summarise(Simulation(setup.hardware, list(setup.models), setup.autoscaling, Sllmd(),
                                                capacity=capacity, num_homes=setup.num_homes).run(trace), warmup_s)
            for capacity in capacities}


def summarise(outcome: Outcome, warmup_s: float) -> dict[str, Any]:
    """Latency percentiles over the requests arriving at or after `warmup_s` ("requests" counts them, and
    "cold_requests" those of them that waited for an instance to start); GPU-seconds, cold starts, loads,
    evictions and migrations over the whole run; per server, the largest share of its GPU memory held at once.
    When some measured requests are for models spanning several GPUs, "multi_gpu" has their startup latencies
    and count alone."""
    measured = [r for r in outcome.requests if r.request.time_s >= warmup_s]
    startup = sorted(r.first_token_s - r.request.time_s for r in measured)  # type: ignore[operator]
    e2e = sorted(r.done_s - r.request.time_s for r in measured)  # type: ignore[operator]
    spanning = sorted(r.first_token_s - r.request.time_s for r in measured  # type: ignore[operator]
                      if r.instance is not None and r.instance.spec.num_gpus > 1)
    multi_gpu = {"multi_gpu": {"p50_s": percentile(spanning, 50), "p99_s": percentile(spanning, 99),
                               "mean_s": _mean(spanning), "requests": len(spanning)}} if spanning else {}
    return {
        "p50_s": percentile(startup, 50), "p99_s": percentile(startup, 99), "mean_s": _mean(startup),
        "e2e_p50_s": percentile(e2e, 50), "e2e_p99_s": percentile(e2e, 99), "e2e_mean_s": _mean(e2e),
        "gpu_s": round(outcome.gpu_s, 1),
        "cold_starts": outcome.num_cold_starts,
        "loads": {str(t): outcome.loads.get(str(t), 0) for t in Tier if t is not Tier.DEVICE},
        "cold_requests": sum(r.dispatched_s > r.request.time_s for r in measured),  # type: ignore[operator]
        "evictions": outcome.num_evictions,
        "migrations": outcome.num_migrations,
        "max_memory_share": {server: round(share, 3) for server, share in outcome.max_memory_share.items()},
        "requests": len(measured),
        "startup_s": startup,
    } | multi_gpu


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


def table(summaries: dict[str, dict[str, Any]], row_name: str) -> str:
    """One row per summary: latencies, GPU-seconds, cold starts, evictions, migrations, loads by tier; when the
    summaries have "multi_gpu", the p99 startup of those requests too."""
    multi_gpu = all("multi_gpu" in s for s in summaries.values())
    head = (f"{row_name:<16}{'p50 s':>8}{'p99 s':>9}{'mean s':>9}{'e2e p99 s':>11}"
            + (f"{'multi-GPU p99 s':>17}" if multi_gpu else "")
            + f"{'GPU-s':>10}{'cold':>6}{'evict':>7}{'migr':>6}  loads")
    lines = [head]
    for name, s in summaries.items():
        loads = " ".join(f"{tier}={n}" for tier, n in s["loads"].items())
        lines.append(f"{name:<16}{s['p50_s']:>8.2f}{s['p99_s']:>9.2f}{s['mean_s']:>9.2f}{s['e2e_p99_s']:>11.2f}"
                     + (f"{s['multi_gpu']['p99_s']:>17.2f}" if multi_gpu else "")
                     + f"{s['gpu_s']:>10.0f}{s['cold_starts']:>6}{s['evictions']:>7}{s['migrations']:>6}  {loads}")
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


def load_trace(spec: str, seed: int, lengths: TokenLengths | None, workload: Workload) -> list[Request]:
    """The workload's built-in trace (ShareGPT-like lengths unless `lengths`) or the CSV file at `spec` naming
    the workload's models (token counts it lacks drawn from `lengths`, GSM8K-like unless given)."""
    if spec == "builtin":
        return builtin_trace(seed, workload=workload, lengths=lengths or TokenLengths.SHAREGPT)
    lengths = lengths or TokenLengths.GSM8K
    try:
        text = Path(spec).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise TraceError(f"cannot read {spec}: {exc}") from None
    return parse_csv(text, known_models={m.name for m in SETUPS[workload].models}, lengths=lengths, seed=seed)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="sllmd simulate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=[w.value for w in Workload], default=Workload.SERVERLESSLLM.value,
                        help="serverlessllm: 40 models of 13-60 GB on 4 servers x 4 80 GB GPUs, one row per placement "
                             "policy; serverlessllm-large: the same plus 4 models of 132-138 GB, each instance on 2 "
                             "GPUs; many-small: 32 models of 1-16 GB on 2 servers x 4 80 GB GPUs, sllmd's "
                             "placement, one row per capacity mode (default serverlessllm)")
    parser.add_argument("--capacity", choices=[c.value for c in Capacity],
                        help="how GPUs hold instances: per-device (an instance takes a whole GPU), pack-lru, "
                             "pack-cost or pack-keepalive (GPUs are memory budgets that instances share while they "
                             "fit; to make room the longest idle, the cheapest to reload by reload seconds x request "
                             "rate per byte, or the one whose keep-alive ends soonest (Ollama's) are evicted). "
                             "Default: pack-cost (the daemon's) for serverlessllm and "
                             "serverlessllm-large, every mode for many-small")
    parser.add_argument("--trace", default="builtin",
                        help="'builtin' or a CSV of time_s,model[,prompt_tokens,output_tokens] naming the "
                             "workload's models (default builtin)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the trace and the random policy (default 0)")
    parser.add_argument("--lengths", choices=[t.value for t in TokenLengths],
                        help="token lengths of generated requests (default: sharegpt for the built-in trace, "
                             "gsm8k for a CSV's rows without them)")
    parser.add_argument("--warmup", type=float, metavar="S",
                        help="leave requests arriving in the first S seconds out of the latency figures "
                             "(default: 600 for the built-in trace, 0 for a CSV)")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    parser.add_argument("--plot", type=Path, metavar="FILE", help="write a PNG of the startup-latency CDFs")
    args = parser.parse_args(argv)
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("sllmd simulate: --plot needs matplotlib (pip install 'sllmd[sim]')", file=sys.stderr)
            return 2
    workload = Workload(args.workload)
    warmup_s = (args.warmup if args.warmup is not None else SETUPS[workload].warmup_s if args.trace == "builtin"
                else 0.0)
    if not (math.isfinite(warmup_s) and warmup_s >= 0):
        print(f"sllmd simulate: --warmup must be a finite number of seconds >= 0, got {args.warmup}", file=sys.stderr)
        return 2
    try:
        trace = load_trace(args.trace, args.seed, TokenLengths(args.lengths) if args.lengths else None, workload)
    except TraceError as exc:
        print(f"sllmd simulate: {exc}", file=sys.stderr)
        return 2
    if all(r.time_s < warmup_s for r in trace):
        print(f"sllmd simulate: every request arrives within the {warmup_s:g} s warm-up; lower --warmup",
              file=sys.stderr)
        return 2
    result: dict[str, Any] = {"workload": str(workload)}
    if workload.compares_policies:
        capacity = Capacity(args.capacity or Capacity.PACK_COST)
        summaries = simulate(trace, args.seed, warmup_s=warmup_s, capacity=capacity, workload=workload)
        result |= {"capacity": str(capacity), "policies": summaries}
        row_name, setting = "policy", f"capacity {capacity}"
    else:
        capacities = [Capacity(args.capacity)] if args.capacity else list(Capacity)
        summaries = compare_capacities(trace, warmup_s=warmup_s, capacities=capacities)
        result |= {"policy": "sllmd", "capacities": summaries}
        row_name, setting = "capacity", "sllmd placement"
    if args.plot is not None:
        plot(summaries, args.plot)
    for summary in summaries.values():
        del summary["startup_s"]
    if not args.json:
        print(f"{len(trace)} requests, workload {workload}, trace {args.trace}, seed {args.seed}, {setting}; "
              f"latencies of the {next(iter(summaries.values()))['requests']} arriving after {warmup_s:g} s")
        print(table(summaries, row_name))
    print(json.dumps(result | {"seed": args.seed, "trace": args.trace, "warmup_s": warmup_s}))
    return 0
