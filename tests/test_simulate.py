"""`sllmd simulate`: the policy comparison on the built-in trace, determinism, CSV errors, GPU accounting."""

from __future__ import annotations

import itertools
import json

import pytest

from sllmd.cli import main
from sllmd.sim.cluster import Hardware, LruCache, ModelSpec, catalogue
from sllmd.sim.engine import Simulation
from sllmd.sim.policies import RayServe, Sllmd
from sllmd.sim.simulate import AUTOSCALING, BUILTIN_WARMUP_S, NUM_MODEL_COPIES, builtin_trace, percentile, simulate
from sllmd.sim.trace import Request, TokenLengths, TraceError, azure_like_trace, parse_csv

MODELS = {m.name for m in catalogue(NUM_MODEL_COPIES)}


@pytest.fixture(scope="module")
def builtin_summaries() -> dict:
    return simulate(builtin_trace(seed=0), seed=0, warmup_s=BUILTIN_WARMUP_S)


def test_p99_startup_ratios_on_the_builtin_trace(builtin_summaries):
    p99 = {name: s["p99_s"] for name, s in builtin_summaries.items()}
    assert p99["ray-serve"] >= 10 * p99["sllmd"]
    assert p99["ray-serve-cache"] >= 3 * p99["sllmd"]
    assert p99["no-migration"] >= 1.2 * p99["sllmd"]
    # Every policy serves every request after the warm-up, and only sllmd migrates.
    measured = sum(r.time_s >= BUILTIN_WARMUP_S for r in builtin_trace(seed=0))
    assert {s["requests"] for s in builtin_summaries.values()} == {measured}
    assert all(s["migrations"] == 0 for name, s in builtin_summaries.items() if name != "sllmd")
    assert builtin_summaries["sllmd"]["migrations"] > 0
    # Migration turns peer fetches into local loads.
    assert builtin_summaries["sllmd"]["cold_starts"]["peer"] < builtin_summaries["no-migration"]["cold_starts"]["peer"]
    assert builtin_summaries["ray-serve"]["cold_starts"]["repository"] > 0
    assert builtin_summaries["ray-serve"]["cold_starts"]["dram"] == 0
    for summary in builtin_summaries.values():
        assert {"p50_s", "p99_s", "mean_s", "e2e_p50_s", "e2e_p99_s", "e2e_mean_s", "gpu_s"} <= set(summary)
        assert summary["p50_s"] <= summary["p99_s"] <= summary["e2e_p99_s"]


def test_no_policy_ever_holds_more_gpus_than_a_server_has(builtin_summaries):
    for summary in builtin_summaries.values():
        used = summary["max_gpus_used"]
        assert set(used) == {"s0", "s1", "s2", "s3"}
        assert max(used.values()) == 4  # the trace does fill servers, and never past their 4 GPUs
        assert summary["gpu_s"] > 0


def test_same_seed_same_result_and_a_new_seed_changes_it():
    runs = [simulate(builtin_trace(seed, duration_s=1200), seed, warmup_s=600) for seed in (3, 3, 4)]
    assert runs[0] == runs[1] != runs[2]
    assert set(runs[0]) == {"sllmd", "no-migration", "ray-serve", "ray-serve-cache", "random"}


def test_warmup_leaves_early_requests_out_of_the_latencies():
    trace = builtin_trace(seed=1, duration_s=1200)
    everything = simulate(trace, seed=1)["sllmd"]
    later = simulate(trace, seed=1, warmup_s=600)["sllmd"]
    assert everything["requests"] == len(trace) > later["requests"] == sum(r.time_s >= 600 for r in trace) > 0
    assert everything["gpu_s"] == later["gpu_s"]  # the same run, measured over fewer requests


class AskedSllmd(Sllmd):
    """Records the entry server of every request the router sent to the leader."""

    def __init__(self) -> None:
        super().__init__()
        self.asked_by: list[str] = []

    def place(self, model: ModelSpec, sim: Simulation, *, asked_by: str) -> str | None:
        self.asked_by.append(asked_by)
        return super().place(model, sim, asked_by=asked_by)


@pytest.mark.parametrize("policy", [AskedSllmd, lambda: RayServe(ssd_cache=True)])
def test_requests_entering_other_servers_are_routed_to_the_ready_instance(policy):
    # One instance starts for the first request (entering s0); the later ones enter s1 and s2, where the
    # model has no instance, and `route` relays them to it (ready, or still starting) while it has room,
    # for every policy alike.
    policy = policy()
    trace = [Request(0.0, "opt-6.7b-00", 100, 10), Request(30.0, "opt-6.7b-00", 100, 10),
             Request(30.5, "opt-6.7b-00", 100, 10)]
    sim = Simulation(Hardware(), catalogue(1), AUTOSCALING, policy, num_homes=1)
    outcome = sim.run(trace)
    assert sum(outcome.cold_starts.values()) == 1
    first, *later = outcome.requests
    assert first.instance is not None and all(r.instance is first.instance for r in later)
    if isinstance(policy, AskedSllmd):
        assert policy.asked_by == ["s0"]  # the leader was asked once, by the first request's entry server


def test_table_then_json_last_line_from_a_csv_trace(tmp_path, capsys):
    trace = tmp_path / "trace.csv"
    trace.write_text("time_s,model,prompt_tokens,output_tokens\n0,opt-13b-00,120,200\n0.5,opt-13b-00\n"
                     "30,llama-2-7b-01,50,60\n")
    assert main(["simulate", "--trace", str(trace)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[1].split()[0] == "policy"
    result = json.loads(lines[-1])
    assert result["trace"] == str(trace) and result["seed"] == 0 and result["warmup_s"] == 0  # CSV: no warm-up
    assert set(result["policies"]) == {"sllmd", "no-migration", "ray-serve", "ray-serve-cache", "random"}
    assert result["policies"]["sllmd"]["requests"] == 3
    # The first request is a cold start from an SSD home or DRAM, never the repository.
    assert result["policies"]["sllmd"]["cold_starts"]["repository"] == 0
    assert result["policies"]["ray-serve"]["p50_s"] > 60  # 26 GB at 0.2 GB/s
    assert main(["simulate", "--trace", str(trace), "--warmup", "10", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["policies"]["sllmd"]["requests"] == 1


def test_bad_warmup_is_a_one_line_error_exit_2(tmp_path, capsys):
    trace = tmp_path / "trace.csv"
    trace.write_text("0,opt-13b-00\n5,opt-13b-00\n")
    for warmup, message in (("-1", ">= 0"), ("nan", ">= 0"), ("5.5", "warm-up")):
        assert main(["simulate", "--trace", str(trace), "--warmup", warmup]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1,opt-13b-00,5\n", "line 1: expected"),
        ("x,opt-13b-00\n", "line 1: time_s 'x'"),
        ("time_s,model\n-1,opt-13b-00\n", "line 2: time_s must be"),
        ("nan,opt-13b-00\n", "finite"),
        ("0,gpt-5\n", "unknown model 'gpt-5'"),
        ("0,opt-13b-00,1.5,3\n", "integers"),
        ("0,opt-13b-00,0,3\n", ">= 1"),
        ("0,opt-13b-00,4000,1000\n", "<= 4096"),
        ("time_s,model\n", "no requests"),
    ],
)
def test_bad_csv_rows_are_named(text, message):
    with pytest.raises(TraceError, match=message):
        parse_csv(text, known_models=MODELS, lengths=TokenLengths.GSM8K, seed=0)


def test_bad_trace_is_a_one_line_error_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("0,opt-13b-00\n1,nope\n")
    assert main(["simulate", "--trace", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "line 2" in err and "nope" in err
    assert main(["simulate", "--trace", str(tmp_path / "missing.csv")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_plot_without_matplotlib_is_a_one_line_error(tmp_path, capsys):
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert main(["simulate", "--plot", str(tmp_path / "cdf.png")]) == 2
        assert "matplotlib" in capsys.readouterr().err
    else:
        trace = tmp_path / "trace.csv"
        trace.write_text("0,opt-13b-00\n5,opt-13b-00\n")
        assert main(["simulate", "--trace", str(trace), "--json", "--plot", str(tmp_path / "cdf.png")]) == 0
        assert (tmp_path / "cdf.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_azure_like_arrivals_are_bursty_and_skewed():
    models = [f"m{i}" for i in range(10)]
    trace = azure_like_trace(models, duration_s=20_000, total_rate=1.0, seed=1)
    assert trace == sorted(trace, key=lambda r: r.time_s)
    assert 0.4 * 20_000 < len(trace) < 2.5 * 20_000
    counts = [sum(r.model == m for r in trace) for m in models]
    assert counts[0] > 3 * counts[-1]
    times = [r.time_s for r in trace if r.model == "m0"]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    mean = sum(gaps) / len(gaps)
    cv = (sum((g - mean) ** 2 for g in gaps) / len(gaps)) ** 0.5 / mean
    assert cv > 3  # Poisson would be 1


def test_token_lengths_match_their_datasets():
    gsm = azure_like_trace(["m"], duration_s=50_000, total_rate=0.2, seed=2, lengths=TokenLengths.GSM8K)
    assert all(100 <= r.prompt_tokens <= 200 and 100 <= r.output_tokens <= 300 for r in gsm)
    share = azure_like_trace(["m"], duration_s=50_000, total_rate=0.2, seed=2, lengths=TokenLengths.SHAREGPT)
    prompts = sorted(r.prompt_tokens for r in share)
    assert prompts[len(prompts) // 2] < 400 and prompts[-1] > 1500  # median short, tail long
    assert all(r.prompt_tokens + r.output_tokens <= 4096 for r in share)


def test_lru_cache_never_exceeds_capacity_and_keeps_pinned():
    cache = LruCache(100)
    assert cache.add("home", 60, pin=True)
    assert cache.add("a", 30) and cache.add("b", 30)  # b pushes a out: 60 + 30 fits, 60 + 60 does not
    assert "a" not in cache and {"home", "b"} <= cache.models()
    assert not cache.add("huge", 50)  # only 40 is evictable
    assert cache.free_bytes >= 0 and "home" in cache


def test_percentile_interpolates():
    assert percentile([], 99) == 0
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    assert percentile([0.0, 10.0], 99) == 9.9
