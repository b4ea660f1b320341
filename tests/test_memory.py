"""Memory as capacity, the pure parts: what an instance asks (`scheduler.memory`), which idle instances go
when one needs room (`scheduler.eviction`), pins against the pinned share, a node's device pool, and
placement packing several instances on one device."""

from __future__ import annotations

import pytest

from sllmd.scheduler.estimate import Calibration
from sllmd.scheduler.eviction import EvictionCandidate, EvictionRule, RequestRate, plan_evictions
from sllmd.scheduler.memory import (
    ENGINE_OVERHEAD_BYTES,
    MemoryNeed,
    Pins,
    instance_memory,
    kv_bytes_per_token,
    pins_problem,
    weights_bytes,
)
from sllmd.scheduler.placement import NodeState, RunningInstance, plan_start
from sllmd.types import Backend, EngineKind
from sllmd.worker.devices import Device, DevicePool

GIB = 1 << 30
MIB = 1 << 20

# ----------------------------------------------------------------------------------- what an instance asks


@pytest.mark.parametrize(("config", "dtype", "expected"), [
    # Llama-3-8B: 32 layers, 8 KV heads of 128 (GQA) -> 128 KiB per token in bf16.
    ({"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_size": 4096},
     "bfloat16", 2 * 32 * 8 * 128 * 2),
    # GPT-2: n_layer / n_head / n_embd, every head a KV head.
    ({"n_layer": 12, "n_head": 12, "n_embd": 768}, "float32", 2 * 12 * 12 * 64 * 4),
    # OPT-125m: Llama's names without num_key_value_heads.
    ({"num_hidden_layers": 12, "num_attention_heads": 12, "hidden_size": 768}, "float16", 2 * 12 * 12 * 64 * 2),
    # Falcon-7B: multi-query attention, one KV head.
    ({"num_hidden_layers": 32, "num_attention_heads": 71, "hidden_size": 4544, "multi_query": True},
     "bfloat16", 2 * 32 * 1 * 64 * 2),
    # Gemma: head_dim given, not hidden / heads.
    ({"num_hidden_layers": 18, "num_attention_heads": 8, "num_key_value_heads": 1, "hidden_size": 2048,
      "head_dim": 256}, "bfloat16", 2 * 18 * 1 * 256 * 2),
    # A multimodal model's text half.
    ({"text_config": {"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 256}}, "float32",
     2 * 2 * 4 * 64 * 4),
    ({"model_type": "mystery"}, "float32", 0),  # unknown: the instance gets the whole KV cap
])
def test_kv_bytes_per_token_reads_the_common_config_names(config, dtype, expected):
    assert kv_bytes_per_token(config, dtype) == expected


def test_weights_count_floating_tensors_at_the_serving_dtype_and_others_as_stored():
    tensors = [((1024, 1024), True, 4), ((10,), False, 8)]  # an fp32 matrix, an int64 buffer
    assert weights_bytes(tensors, "bfloat16") == 1024 * 1024 * 2 + 80
    assert weights_bytes(tensors, "float32") == 1024 * 1024 * 4 + 80


@pytest.mark.parametrize(("per_token", "context", "batch", "cap", "expected_kv"), [
    (2048, 1024, 32, 2 * GIB, 2048 * 1024 * 32),  # the demo model: the batch at full length fits the cap
    (131072, 8192, 32, 2 * GIB, 2 * GIB),  # Llama-3-8B at 8k: capped
    (131072, 131072, 32, 2 * GIB, 131072 * 131072),  # at 128k one request alone is over the cap: it still fits
    (0, 4096, 32, 2 * GIB, 2 * GIB),  # unknown per-token size: the cap
])
def test_the_kv_budget_is_the_batch_at_full_length_capped_but_never_below_one_request(
        per_token, context, batch, cap, expected_kv):
    need = instance_memory(Backend.TRANSFORMERS, weights_bytes=GIB, kv_bytes_per_token=per_token,
                           context_length=context, max_batch_size=batch, max_kv_bytes=cap, on_gpu=True)
    assert need == MemoryNeed(GIB, expected_kv, ENGINE_OVERHEAD_BYTES[Backend.TRANSFORMERS, True])
    assert need.total_bytes == GIB + expected_kv + need.overhead_bytes


def test_a_vllm_engine_costs_more_overhead_than_a_transformers_one_and_a_dummy_no_kv():
    kwargs = {"weights_bytes": GIB, "kv_bytes_per_token": 1000, "context_length": 100, "max_batch_size": 1,
              "max_kv_bytes": GIB, "on_gpu": True}
    vllm, hf = instance_memory(Backend.VLLM, **kwargs), instance_memory(Backend.TRANSFORMERS, **kwargs)
    assert vllm.overhead_bytes > hf.overhead_bytes and vllm.kv_bytes == hf.kv_bytes == 100_000
    assert instance_memory(Backend.DUMMY, **kwargs).kv_bytes == 0


# ----------------------------------------------------------------------------------------------- eviction


def candidate(instance_id: str, *, device: int | tuple[int, ...] = 0, gib: float = 1.0, reload_s: float = 1.0,
              rate: float = 0.0, idle_s: float = 0.0, keep_alive_left_s: float = 0.0) -> EvictionCandidate:
    devices = device if isinstance(device, tuple) else (device,)
    return EvictionCandidate(instance_id, devices, int(gib * GIB), reload_s, rate, idle_s, keep_alive_left_s)


@pytest.mark.parametrize(("candidates", "free", "needed_gib", "rule", "expected"), [
    # Room already: nothing evicted, on the device with room.
    ([candidate("a")], {0: 0, 1: 2 * GIB}, 1, EvictionRule.COST, (1, ())),
    # Cost = reload seconds x requests/s: a popular model that reloads slowly stays.
    ([candidate("hot", reload_s=10, rate=1.0), candidate("cold", reload_s=10, rate=0.01)], {0: 0}, 1,
     EvictionRule.COST, (0, ("cold",))),
    # Equally popular: the one that reloads fastest (its checkpoint in DRAM) goes.
    ([candidate("ssd", reload_s=8, rate=0.1), candidate("dram", reload_s=0.5, rate=0.1)], {0: 0}, 1,
     EvictionRule.COST, (0, ("dram",))),
    # Per byte freed: one 4 GiB instance of cost 0.4 beats four 1 GiB ones of cost 0.2 each.
    ([candidate("big", gib=4, reload_s=4, rate=0.1), *(candidate(f"s{i}", reload_s=2, rate=0.1) for i in range(4))],
     {0: 0}, 4, EvictionRule.COST, (0, ("big",))),
    # Taken in order until enough is free, then what the later ones made unneeded is given back: the cheap
    # small one went first, but the 3 GiB one alone covers the need.
    ([candidate("small", gib=1, reload_s=1, rate=0.001), candidate("mid", gib=3, reload_s=1, rate=0.01)],
     {0: 0}, 3, EvictionRule.COST, (0, ("mid",))),
    # Across devices: the cheapest device's set wins.
    ([candidate("x", device=0, reload_s=5, rate=1), candidate("y", device=1, reload_s=5, rate=0.1)], {0: 0, 1: 0},
     1, EvictionRule.COST, (1, ("y",))),
    # The baselines: LRU takes the longest idle, Ollama's rule the keep-alive that ends soonest.
    ([candidate("old", idle_s=300, keep_alive_left_s=3000, rate=1), candidate("new", idle_s=5, keep_alive_left_s=1)],
     {0: 0}, 1, EvictionRule.LRU, (0, ("old",))),
    ([candidate("old", idle_s=300, keep_alive_left_s=3000, rate=1), candidate("new", idle_s=5, keep_alive_left_s=1)],
     {0: 0}, 1, EvictionRule.SHORTEST_KEEP_ALIVE, (0, ("new",))),
    # Not enough on any device, even evicting all: None.
    ([candidate("a", device=0), candidate("b", device=1)], {0: 0, 1: 0}, 2, EvictionRule.COST, None),
    # Free bytes count: 1 GiB free + 1 GiB evicted makes 2.
    ([candidate("a")], {0: GIB}, 2, EvictionRule.COST, (0, ("a",))),
])
def test_eviction_follows_the_rule(candidates, free, needed_gib, rule, expected):
    plan = plan_evictions(candidates, free, needed_gib * GIB, rule)
    assert (None if plan is None else (plan.devices[0], plan.evictions)) == expected


def test_the_request_rate_decays_with_its_half_life():
    rate = RequestRate(half_life_s=10.0)
    assert rate.per_s(0.0) == 0.0
    for t in range(100):
        rate.observe(float(t))  # one request a second
    assert rate.per_s(99.0) == pytest.approx(1.0, rel=0.1)
    assert rate.per_s(109.0) == pytest.approx(rate.per_s(99.0) / 2)


# ------------------------------------------------------------------------------------------------- pins


@pytest.mark.parametrize(("pins", "budgets", "share", "problem"), [
    ({}, [(4 * GIB,)], 0.5, None),
    ({"a": (0, 100 * GIB)}, [(4 * GIB,)], 0.5, None),  # no pins: whatever the size
    ({"a": (2, GIB)}, [(4 * GIB,)], 0.5, None),  # exactly the share
    ({"a": (3, GIB)}, [(4 * GIB,)], 0.5, "min_instances need 3.00 GiB"),
    ({"a": (2, GIB), "b": (1, GIB)}, [(4 * GIB,)], 0.5, "(a 2 x 1.00 GiB, b 1 x 1.00 GiB)"),
    ({"a": (2, GIB), "b": (1, GIB)}, [(4 * GIB,), (2 * GIB,)], 0.5, None),  # two nodes' shares
    ({"a": (1, 3 * GIB)}, [(4 * GIB,), (4 * GIB,)], 0.5, "one instance needs 3.00 GiB"),  # fits no node's share
    ({"a": (1, 3 * GIB)}, [(2 * GIB, 2 * GIB)], 1.0, "one instance needs 3.00 GiB"),  # ... nor any one device
    ({"a": (1, 2 * GIB, 2)}, [(2 * GIB, 2 * GIB)], 1.0, None),  # ... but spans two
    ({"a": (1, 2 * GIB, 3)}, [(2 * GIB, 2 * GIB)], 1.0, "one instance needs 6.00 GiB"),  # not three
])
def test_pins_must_fit_the_clusters_pinned_share(pins, budgets, share, problem):
    found = pins_problem({model: Pins(*pin) for model, pin in pins.items()}, budgets, share)
    assert found is None if problem is None else problem in found, found


# ---------------------------------------------------------------------------------------------- devices


def test_the_device_pool_fits_best_takes_over_evicted_memory_and_resizes_to_measurements():
    pool = DevicePool([Device(0, "cuda:0", 10 * GIB), Device(1, "cuda:1", 10 * GIB)])
    assert pool.acquire("a", 6 * GIB)[0].index == 0
    assert pool.acquire("b", 3 * GIB)[0].index == 0  # best fit: the fuller device, so device 1 stays whole
    assert pool.acquire("c", 8 * GIB)[0].index == 1
    assert pool.acquire("d", 3 * GIB) is None and pool.free_by_device() == (GIB, 2 * GIB)
    pool.take_over(pool.devices[:1], "d", 7 * GIB, ["a"])  # a's 6 GiB + 1 free
    assert pool.hold_of("a") is None and pool.free_by_device() == (0, 2 * GIB)
    pool.release("a")  # an evicted instance's stop: nothing left to free
    assert pool.free_by_device() == (0, 2 * GIB)
    pool.resize("c", 9 * GIB)  # its engine measured more than estimated
    assert pool.free_by_device() == (0, GIB)
    for holder in ("b", "c", "d"):
        pool.release(holder)
    assert pool.free_by_device() == (10 * GIB, 10 * GIB)


# ---------------------------------------------------------------------------------------------- packing


def instance(instance_id: str, model: str, *, device: int, gib: float, requests: int = 0,
             rate: float = 0.0) -> RunningInstance:
    return RunningInstance(instance_id, model, EngineKind.TRANSFORMERS, requests, 0, num_bytes=GIB, devices=(device,),
                           memory_bytes=int(gib * GIB), request_rate=rate)


def test_small_models_pack_beside_each_other_and_a_big_one_evicts_the_cheapest_set():
    cal = Calibration.defaults()
    node = NodeState("a", True, free_memory=(30 * GIB, 4 * GIB), calibration=cal, dram_models=frozenset({"m"}),
                     instances=(instance("i1", "x", device=0, gib=50, requests=1),
                                instance("i2", "y", device=1, gib=40, rate=0.5),
                                instance("i3", "z", device=1, gib=20, rate=0.001),
                                instance("i4", "w", device=1, gib=16, rate=0.002)))
    # 8 GiB fits beside the others, on either device: nothing evicted.
    small = plan_start("m", EngineKind.TRANSFORMERS, GIB, 8 * GIB, [node])
    assert small is not None and small.evictions == () and small.devices in ((0,), (1,))
    # 40 GiB: device 0's busy instance cannot go; on device 1, z and w (rarely asked) make room, not y.
    big = plan_start("m", EngineKind.TRANSFORMERS, GIB, 40 * GIB, [node], allow_migration=False)
    assert big is not None and (big.devices, sorted(big.evictions)) == ((1,), ["i3", "i4"])
    assert plan_start("m", EngineKind.TRANSFORMERS, GIB, 81 * GIB, [node], allow_migration=False) is None
