"""`sllmd simulate`: the policy comparison on the built-in trace, with models spanning two GPUs too, capacity
modes on many small models, determinism, CSV errors, memory accounting."""

from __future__ import annotations

import contextlib
import io
import itertools
import json

import pytest

from sllmd.cli import main
from sllmd.scheduler.estimate import BANDWIDTH_ALPHA, Calibration
from sllmd.sim.cluster import (
    BASE_MODELS,
    LARGE_BASE_MODELS,
    SMALL_BASE_MODELS,
    Capacity,
    Hardware,
    LruCache,
    ModelSpec,
    catalogue,
)
from sllmd.sim.engine import Simulation
from sllmd.sim.policies import RandomGpu, RayServe, Sllmd, all_policies
from sllmd.sim.simulate import SETUPS, Workload, builtin_trace, compare_capacities, percentile, summarise
from sllmd.sim.state import Decision, InstanceState, SimInstance, SimServer
from sllmd.sim.trace import Request, TokenLengths, TraceError, azure_like_trace, parse_csv
from sllmd.types import Tier

SERVERLESSLLM = SETUPS[Workload.SERVERLESSLLM]
LARGE = SETUPS[Workload.SERVERLESSLLM_LARGE]
MODELS = {m.name for m in SERVERLESSLLM.models}
POLICIES = {"sllmd", "no-migration", "ray-serve", "ray-serve-cache", "random"}


@pytest.fixture(scope="module")
def default_run() -> dict:
    """`sllmd simulate` with no arguments: its output's last line, parsed (the built-in trace, seed 0)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["simulate"]) == 0
    lines = out.getvalue().strip().splitlines()
    assert lines[1].split()[0] == "policy"
    return json.loads(lines[-1])


def test_default_run_ends_with_json_of_every_policy(default_run):
    assert default_run["workload"] == "serverlessllm" and default_run["capacity"] == "pack-cost"
    assert default_run["seed"] == 0 and default_run["trace"] == "builtin" and default_run["warmup_s"] == 600
    assert set(default_run["policies"]) == POLICIES


def test_p99_startup_ratios_on_the_builtin_trace(default_run):
    summaries = default_run["policies"]
    p99 = {name: s["p99_s"] for name, s in summaries.items()}
    assert p99["ray-serve"] >= 10 * p99["sllmd"]
    assert p99["ray-serve-cache"] >= 3 * p99["sllmd"]
    assert p99["no-migration"] >= 1.2 * p99["sllmd"]
    # Every policy serves every request after the warm-up, and only sllmd migrates.
    measured = sum(r.time_s >= SERVERLESSLLM.warmup_s for r in builtin_trace(seed=0))
    assert {s["requests"] for s in summaries.values()} == {measured}
    assert all(s["migrations"] == 0 for name, s in summaries.items() if name != "sllmd")
    assert summaries["sllmd"]["migrations"] > 0
    # Migration turns peer fetches into local loads.
    assert summaries["sllmd"]["loads"]["peer"] < summaries["no-migration"]["loads"]["peer"]
    assert summaries["ray-serve"]["loads"]["repository"] > 0
    assert summaries["ray-serve"]["loads"]["dram"] == 0
    for summary in summaries.values():
        assert {"p50_s", "p99_s", "mean_s", "e2e_p50_s", "e2e_p99_s", "e2e_mean_s", "gpu_s"} <= set(summary)
        assert summary["p50_s"] <= summary["p99_s"] <= summary["e2e_p99_s"]
        assert 0 < summary["cold_starts"] <= sum(summary["loads"].values())


def test_no_policy_ever_holds_more_memory_than_a_server_has(default_run):
    for summary in default_run["policies"].values():
        shares = summary["max_memory_share"]
        assert set(shares) == {"s0", "s1", "s2", "s3"}
        assert all(0.9 < share <= 1 for share in shares.values())  # the trace fills servers, never past them
        assert summary["gpu_s"] > 0


class Placing(Simulation):
    """Keeps every instance it places (instances leave their server's list when they stop), and each migration's
    heir with the instance whose memory it took."""

    def __init__(self, *args, **kwargs) -> None:
        self.placed: list[SimInstance] = []
        self.heirs: list[tuple[SimInstance, SimInstance]] = []
        super().__init__(*args, **kwargs)

    def _new_instance(self, spec: ModelSpec, server: SimServer, devices: tuple[int, ...], state: InstanceState, *,
                      waiting_for: SimInstance | None = None) -> SimInstance:
        instance = super()._new_instance(spec, server, devices, state, waiting_for=waiting_for)
        self.placed.append(instance)
        if waiting_for is not None:
            self.heirs.append((instance, waiting_for))
        return instance


LARGE_TRACE = {"seed": 2, "duration_s": 1800}  # 30 min, with 45 requests for 2-GPU models after the warm-up


@pytest.fixture(scope="module")
def large() -> dict[str, tuple[dict, Placing]]:
    """The serverlessllm-large workload's policies on a short trace (the first 10 min not measured): per
    policy, its summary and its simulation."""
    trace = builtin_trace(LARGE_TRACE["seed"], workload=Workload.SERVERLESSLLM_LARGE,
                          duration_s=LARGE_TRACE["duration_s"])
    runs = {}
    for policy in all_policies(LARGE_TRACE["seed"]):
        sim = Placing(LARGE.hardware, list(LARGE.models), LARGE.autoscaling, policy, num_homes=LARGE.num_homes)
        runs[policy.name] = (summarise(sim.run(trace), LARGE.warmup_s), sim)
    return runs


def test_the_paper_s_largest_models_need_two_gpus():
    for base in LARGE_BASE_MODELS:
        assert base.num_gpus == 2 and 130e9 < base.num_bytes < 140e9
        assert base.memory_bytes <= LARGE.hardware.gpu_bytes < ModelSpec(base.name, base.num_params,
                                                                           base.kv_bytes_per_token).memory_bytes
    assert {m.name for m in LARGE.models} == MODELS | {"opt-66b-00", "llama-2-70b-00", "opt-66b-01", "llama-2-70b-01"}


def test_a_large_instance_always_holds_its_gpus_of_one_server(large):
    for summary, sim in large.values():
        spanning = [i for i in sim.placed if i.spec.num_gpus > 1]
        assert spanning  # every policy starts the large models
        for instance in sim.placed:
            assert len(set(instance.devices)) == instance.spec.num_gpus
            assert all(0 <= d < LARGE.hardware.gpus_per_server for d in instance.devices)
            assert instance.memory_bytes <= LARGE.hardware.gpu_bytes
        # The engine asserts every GPU's budget whenever a hold grows; the run got through, and the fullest
        # server held no more than it has.
        assert all(0.9 < share <= 1 for share in summary["max_memory_share"].values())
    # A migration makes room on the GPUs of the instance it moves: its heir takes at least one of them.
    heirs = large["sllmd"][1].heirs
    assert any(heir.spec.num_gpus > 1 for heir, _ in heirs)  # once here, for a 2-GPU instance
    assert all(heir.server is moved.server and set(heir.devices) & set(moved.devices) for heir, moved in heirs)


def test_sllmd_places_large_models_at_least_as_well_as_the_baselines(large):
    summaries = {name: summary for name, (summary, _) in large.items()}
    trace = builtin_trace(LARGE_TRACE["seed"], workload=Workload.SERVERLESSLLM_LARGE,
                          duration_s=LARGE_TRACE["duration_s"])
    assert {s["requests"] for s in summaries.values()} == {sum(r.time_s >= LARGE.warmup_s for r in trace)}
    assert {s["multi_gpu"]["requests"] for s in summaries.values()} == {45}
    sllmd = summaries["sllmd"]
    for baseline in ("random", "ray-serve", "ray-serve-cache"):
        assert sllmd["p99_s"] <= summaries[baseline]["p99_s"]
        assert sllmd["mean_s"] <= summaries[baseline]["mean_s"]
    for baseline in ("ray-serve", "ray-serve-cache"):  # a 132-138 GB download: 11 min at 0.2 GB/s
        assert 10 * sllmd["multi_gpu"]["p99_s"] <= summaries[baseline]["multi_gpu"]["p99_s"]
        assert 10 * sllmd["multi_gpu"]["mean_s"] <= summaries[baseline]["multi_gpu"]["mean_s"]
    # Not asserted, as it does not hold on every trace (see simulate's doc): the 2-GPU models' latencies against
    # random (sllmd's mean is lower on most traces, its p99 on some) and anything against no-migration.


def large_sim(**hardware: object) -> Simulation:
    """One server of four GPUs, one deployment of each serverlessllm model and each large one."""
    return Simulation(Hardware(num_servers=1, **hardware), catalogue(1, BASE_MODELS + LARGE_BASE_MODELS),
                      LARGE.autoscaling, Sllmd(), num_homes=1)


def test_make_room_for_two_gpus_takes_the_closest_pair_with_room():
    flat = large_sim()
    place(flat, "opt-13b-00", (1,), InstanceState.LOADING)
    assert flat.make_room(flat.servers[0], flat.models["llama-2-70b-00"]) == Decision(flat.servers[0], (0, 2))
    nvlink_pairs = large_sim(topology=((0, 0, 20, 20), (0, 0, 20, 20), (20, 20, 0, 0), (20, 20, 0, 0)))
    place(nvlink_pairs, "opt-13b-00", (1,), InstanceState.LOADING)
    server = nvlink_pairs.servers[0]
    assert nvlink_pairs.make_room(server, nvlink_pairs.models["llama-2-70b-00"]) == Decision(server, (2, 3))


def test_make_room_for_two_gpus_evicts_on_the_pair_that_can_make_it():
    sim = large_sim()
    server = sim.servers[0]
    for device in (0, 1):
        place(sim, "opt-30b-00", (device,), InstanceState.LOADING)  # never evicted
    idle = place(sim, "opt-30b-00", (3,), InstanceState.READY, idle_since_s=0.0)
    decision = sim.make_room(server, sim.models["opt-66b-00"])
    assert decision == Decision(server, (2, 3), (idle,))
    sim.start(sim.models["opt-66b-00"], decision)
    held = sim.models["opt-66b-00"].memory_bytes
    assert server.free_memory()[2:] == (sim.hardware.gpu_bytes - held,) * 2


def test_a_migration_frees_every_gpu_of_the_instance_it_moves():
    sim = Simulation(Hardware(num_servers=2, gpus_per_server=2), catalogue(1, BASE_MODELS + LARGE_BASE_MODELS),
                     LARGE.autoscaling, Sllmd(), num_homes=1)
    s0, s1 = sim.servers
    big, small = sim.models["llama-2-70b-00"], sim.models["opt-30b-00"]
    moving = sim._new_instance(big, s0, (0, 1), InstanceState.READY)  # ready, no load to play
    # opt-30b takes GPU 0 of s0 once the 70B instance has moved to both GPUs of s1.
    sim.start(small, Decision(s0, (0,), migrate=moving, migrate_to=Decision(s1, (0, 1))))
    copy, heir = s1.instances[0], s0.instances[1]
    assert copy.devices == (0, 1) and heir.waiting_for is moving
    assert heir.held_on(0) == max(0, small.memory_bytes - big.memory_bytes) and heir.held_on(1) == 0
    outcome = sim.run([])
    assert outcome.num_migrations == 1 and sum(outcome.loads.values()) == 2  # the copy, then opt-30b
    # A 2-GPU heir of a 1-GPU instance holds, until the cut-over, what that one will not free on the GPU they
    # share, and all of its need on the other.
    resident = sim._new_instance(small, s0, (0,), InstanceState.READY)
    sim.start(big, Decision(s0, (0, 1), migrate=resident, migrate_to=Decision(s1, (0,))))
    heir = s0.instances[-1]
    assert heir.held_on(0) == big.memory_bytes - small.memory_bytes and heir.held_on(1) == big.memory_bytes


def test_a_dram_load_onto_two_gpus_runs_two_links_and_calibrates_one():
    hardware = Hardware()
    assert hardware.load_s(138 * 10**9, Tier.DRAM, 2) == hardware.load_s(138 * 10**9, Tier.DRAM) / 2
    assert hardware.load_s(138 * 10**9, Tier.SSD, 2) == hardware.load_s(138 * 10**9, Tier.SSD)  # one drive
    sim = Simulation(Hardware(num_servers=1, gpus_per_server=2), catalogue(1, LARGE_BASE_MODELS[1:]),
                     LARGE.autoscaling, Sllmd(), num_homes=1)
    model = "llama-2-70b-00"
    outcome = sim.run([Request(0.0, model, 100, 10), Request(300.0, model, 100, 10)])  # past the keep-alive
    assert dict(outcome.loads) == {"ssd": 1, "dram": 1}
    first, second = (r.first_token_s - r.request.time_s for r in outcome.requests)
    spec = sim.models[model]
    assert first == pytest.approx(spec.num_bytes / 6e9 + hardware.init_s(spec.num_bytes), rel=0.01)
    assert second == pytest.approx(spec.num_bytes / 50e9 + hardware.init_s(spec.num_bytes), rel=0.01)
    # The calibration learns one link's bandwidth (25 GB/s), which `transfer_time_s` multiplies by the GPUs.
    default = Calibration.defaults().load_gbps[Tier.DRAM]
    learned = sim.servers[0].calibration.load_gbps[Tier.DRAM]
    assert learned == pytest.approx((1 - BANDWIDTH_ALPHA) * default + BANDWIDTH_ALPHA * hardware.pcie_gbps)


def test_serverlessllm_large_prints_a_row_per_policy_then_json(tmp_path, capsys):
    trace = tmp_path / "large.csv"
    trace.write_text("0,llama-2-70b-00,100,50\n1,opt-66b-01,100,50\n2,opt-13b-00,100,50\n")
    assert main(["simulate", "--workload", "serverlessllm-large", "--trace", str(trace)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[1].split()[0] == "policy" and {line.split()[0] for line in lines[2:7]} == POLICIES
    result = json.loads(lines[-1])
    assert result["workload"] == "serverlessllm-large" and set(result["policies"]) == POLICIES
    assert result["policies"]["sllmd"]["loads"]["repository"] == 0
    assert result["policies"]["ray-serve"]["p99_s"] > 600  # 138 GB at 0.2 GB/s


@pytest.fixture(scope="module")
def many_small() -> dict:
    """The many-small workload's capacity modes on a short trace (20 min, seed 0), nothing left out."""
    return compare_capacities(builtin_trace(0, workload=Workload.MANY_SMALL, duration_s=1200))


def test_packing_memory_has_fewer_cold_starts_than_a_gpu_per_instance(many_small):
    assert set(many_small) == {"per-device", "pack-lru", "pack-cost", "pack-keepalive"}
    per_device, cost = many_small["per-device"], many_small["pack-cost"]
    assert cost["cold_starts"] < per_device["cold_starts"]
    assert cost["p99_s"] < per_device["p99_s"]
    assert sum(cost["loads"].values()) < sum(per_device["loads"].values())
    assert all(s["evictions"] > 0 for s in many_small.values())  # memory runs out: idle instances make room
    for summary in many_small.values():
        assert all(0.9 < share <= 1 for share in summary["max_memory_share"].values())


def test_one_instance_of_each_small_model_nearly_fills_the_cluster():
    setup = SETUPS[Workload.MANY_SMALL]
    assert len(setup.models) == 32
    assert all(0.9e9 < m.num_bytes < 16.5e9 for m in setup.models)  # 0.5B to 8B at fp16
    one_each = sum(m.memory_bytes for m in setup.models)
    budget = setup.hardware.num_servers * setup.hardware.gpus_per_server * setup.hardware.gpu_bytes
    assert 0.8 * budget < one_each < budget  # so hot models' scale-outs (up to 4 instances) overflow it


def small_sim(capacity: Capacity) -> Simulation:
    """One server with two GPUs, 16 small models, nothing played yet."""
    return Simulation(Hardware(num_servers=1, gpus_per_server=2), catalogue(2, SMALL_BASE_MODELS),
                      SETUPS[Workload.MANY_SMALL].autoscaling, Sllmd(), capacity=capacity, num_homes=1)


def place(sim: Simulation, model: str, devices: tuple[int, ...], state: InstanceState, *,
          idle_since_s: float | None = None):
    sim.start(sim.models[model], Decision(sim.servers[0], devices))
    instance = sim.servers[0].instances[-1]
    instance.state, instance.idle_since_s = state, idle_since_s
    return instance


def test_make_room_takes_the_best_fitting_gpu():
    sim = small_sim(Capacity.PACK_COST)
    place(sim, "llama-3.1-8b-00", (1,), InstanceState.READY, idle_since_s=0.0)
    # A small model goes where the least memory that fits it is free, beside the 8B, not to the empty GPU.
    assert sim.make_room(sim.servers[0], sim.models["qwen2.5-0.5b-00"]) == Decision(sim.servers[0], (1,))
    per_device = small_sim(Capacity.PER_DEVICE)
    assert per_device.memory_bytes["qwen2.5-0.5b-00"] == per_device.hardware.gpu_bytes
    place(per_device, "llama-3.1-8b-00", (1,), InstanceState.READY, idle_since_s=0.0)
    assert per_device.make_room(per_device.servers[0], per_device.models["qwen2.5-0.5b-00"]).devices == (0,)


@pytest.mark.parametrize(("capacity", "evicted"), [(Capacity.PACK_LRU, "often"), (Capacity.PACK_COST, "rarely")])
def test_make_room_evicts_by_the_capacitys_rule(capacity, evicted):
    sim = small_sim(capacity)
    server = sim.servers[0]
    sim.now = 1000.0
    # GPU 0 has an instance idle long but asked for often; GPU 1 one idle lately but rarely asked for; both also
    # hold a starting instance (never evicted), so neither has room for a 3B one.
    idle = {"often": place(sim, "llama-3.1-8b-00", (0,), InstanceState.READY, idle_since_s=100.0),
            "rarely": place(sim, "mistral-7b-00", (1,), InstanceState.READY, idle_since_s=900.0)}
    for device in (0, 1):
        place(sim, "llama-3.1-8b-01", (device,), InstanceState.LOADING)
    for t in range(50):
        sim._rate(server, "llama-3.1-8b-00").observe(950.0 + t)
    decision = sim.make_room(server, sim.models["llama-3.2-3b-00"])
    assert decision is not None and decision.evictions == (idle[evicted],)
    assert decision.devices == idle[evicted].devices


def test_a_start_past_a_gpus_budget_is_refused():
    sim = small_sim(Capacity.PER_DEVICE)
    sim.start(sim.models["qwen2.5-0.5b-00"], Decision(sim.servers[0], (0,)))
    with pytest.raises(AssertionError, match="budget"):
        sim.start(sim.models["qwen2.5-0.5b-01"], Decision(sim.servers[0], (0,)))


def test_many_small_prints_a_row_per_capacity_then_json(tmp_path, capsys):
    trace = tmp_path / "small.csv"
    trace.write_text("".join(f"{t},{m.name},100,50\n" for t, m in enumerate(SETUPS[Workload.MANY_SMALL].models)))
    assert main(["simulate", "--workload", "many-small", "--trace", str(trace)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines[1:6]] == ["capacity", "per-device", "pack-lru", "pack-cost",
                                                        "pack-keepalive"]
    result = json.loads(lines[-1])
    assert result["workload"] == "many-small" and list(result["capacities"]) == ["per-device", "pack-lru", "pack-cost",
                                                                                "pack-keepalive"]
    assert all(s["requests"] == 32 and s["cold_starts"] >= 32 for s in result["capacities"].values())
    assert main(["simulate", "--workload", "many-small", "--trace", str(trace), "--capacity", "pack-lru",
                 "--json"]) == 0
    assert list(json.loads(capsys.readouterr().out)["capacities"]) == ["pack-lru"]


def test_same_seed_same_result_and_a_new_seed_changes_it(many_small):
    # sllmd's placement (reservations, calibration, evictions) replays exactly...
    assert compare_capacities(builtin_trace(0, workload=Workload.MANY_SMALL, duration_s=1200)) == many_small
    # ... and the seed picks the trace and the random policy's choices.
    assert builtin_trace(3, duration_s=300) != builtin_trace(4, duration_s=300)
    trace = builtin_trace(3, duration_s=300)
    runs = [summarise(Simulation(SERVERLESSLLM.hardware, list(SERVERLESSLLM.models), SERVERLESSLLM.autoscaling,
                                 RandomGpu(seed), num_homes=1).run(trace), 0) for seed in (3, 3, 4)]
    assert runs[0] == runs[1] != runs[2]


def test_warmup_leaves_early_requests_out_of_the_latencies(many_small):
    trace = builtin_trace(0, workload=Workload.MANY_SMALL, duration_s=1200)
    everything = many_small["pack-cost"]
    later = compare_capacities(trace, warmup_s=600, capacities=[Capacity.PACK_COST])["pack-cost"]
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
    sim = Simulation(Hardware(), catalogue(1), SERVERLESSLLM.autoscaling, policy, num_homes=1)
    outcome = sim.run(trace)
    assert sum(outcome.loads.values()) == outcome.num_cold_starts == 1
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
    assert set(result["policies"]) == POLICIES
    assert result["policies"]["sllmd"]["requests"] == 3
    # The first request is a cold start from an SSD home or DRAM, never the repository.
    assert result["policies"]["sllmd"]["loads"]["repository"] == 0
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
