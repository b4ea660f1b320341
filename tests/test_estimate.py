"""Estimators: the linear fit, calibration from observed loads, load-time arithmetic and hostile wire input."""

from __future__ import annotations

import json
import math
import random

import pytest

from sllmd.scheduler.estimate import (
    BYTES_PER_GB,
    Calibration,
    DeviceKind,
    EngineKind,
    LinearFit,
    load_time_s,
    migration_time_s,
    transfer_time_s,
)
from sllmd.types import Tier

GB = int(BYTES_PER_GB)
HF = EngineKind.TRANSFORMERS


def test_linear_fit_recovers_a_line_from_noisy_points():
    rng = random.Random(7)
    fit = LinearFit(slope=0.0, intercept=0.0)
    for _ in range(200):
        x = rng.uniform(0, 5000)
        fit = fit.observe(x, 3e-4 * x + 0.15 + rng.gauss(0, 0.01))
    assert fit.slope == pytest.approx(3e-4, rel=0.05)
    assert fit.intercept == pytest.approx(0.15, abs=0.03)
    assert fit.predict(2000) == pytest.approx(0.75, rel=0.05)


def test_linear_fit_keeps_the_prior_slope_until_x_spreads():
    fit = LinearFit(slope=2.0, intercept=0.0).observe(10.0, 5.0)
    assert fit.slope == 2.0 and fit.predict(10.0) == pytest.approx(5.0)
    fit = fit.observe(10.0, 7.0)  # the same x again: still no slope information
    assert fit.slope == 2.0
    assert fit.observe(20.0, 9.0).slope != 2.0


def test_linear_fit_forgets_old_behaviour():
    fit = LinearFit(slope=0.0, intercept=0.0)
    for i in range(100):
        fit = fit.observe(float(i % 10), 1.0 * (i % 10))
    for i in range(200):
        fit = fit.observe(float(i % 10), 3.0 * (i % 10) + 1.0)
    assert fit.slope == pytest.approx(3.0, rel=1e-3) and fit.intercept == pytest.approx(1.0, abs=1e-2)


def test_calibration_converges_to_the_true_bandwidths_from_observed_loads():
    rng = random.Random(3)
    true_dram, true_ssd, true_peer = 24.0, 5.5, 1.2
    calibration = Calibration.defaults()
    for _ in range(40):
        num_bytes = rng.randint(5, 60) * GB
        gb = num_bytes / GB
        calibration = calibration.observe_load(HF, Tier.DRAM, num_bytes, gb / true_dram, 1.0 + 0.02 * gb)
        calibration = calibration.observe_load(HF, Tier.SSD, num_bytes, gb / true_ssd, 1.0 + 0.02 * gb)
        calibration = calibration.observe_fetch(Tier.PEER, num_bytes, gb / true_peer)
    assert calibration.load_gbps[Tier.DRAM] == pytest.approx(true_dram, rel=1e-3)
    assert calibration.load_gbps[Tier.SSD] == pytest.approx(true_ssd, rel=1e-3)
    assert calibration.fetch_gbps[Tier.PEER] == pytest.approx(true_peer, rel=1e-3)
    assert calibration.fetch_gbps[Tier.REPOSITORY] == Calibration.defaults().fetch_gbps[Tier.REPOSITORY]
    assert calibration.init[HF].slope == pytest.approx(0.02, rel=1e-3)
    assert calibration.init[HF].intercept == pytest.approx(1.0, rel=1e-3)
    truth = 13 / true_ssd + 1.0 + 0.02 * 13
    assert load_time_s(HF, 13 * GB, Tier.SSD, calibration) == pytest.approx(truth, rel=1e-3)


def test_tiny_loads_update_init_but_not_bandwidth():
    calibration = Calibration.defaults().observe_load(HF, Tier.DRAM, 4096, 1e-3, 0.5)
    assert calibration.load_gbps == Calibration.defaults().load_gbps
    assert calibration.init != Calibration.defaults().init


def test_observations_name_only_their_own_tiers():
    with pytest.raises(ValueError):
        Calibration.defaults().observe_load(HF, Tier.PEER, GB, 1.0, 1.0)
    with pytest.raises(ValueError):
        Calibration.defaults().observe_fetch(Tier.SSD, GB, 1.0)


def test_migration_time_follows_observed_migrations():
    calibration = Calibration.defaults()
    for num_tokens in range(0, 8000, 100):
        calibration = calibration.observe_migration(num_tokens, 0.05 + 2e-5 * num_tokens)
    assert migration_time_s(4000, calibration) == pytest.approx(0.05 + 2e-5 * 4000, rel=1e-3)


def test_load_time_adds_every_tier_the_bytes_cross():
    c = Calibration.defaults()
    gb = 26.0
    init = c.init[HF].predict(gb)
    assert load_time_s(HF, 26 * GB, Tier.DEVICE, c) == 0
    assert load_time_s(HF, 26 * GB, Tier.DRAM, c) == pytest.approx(gb / 10 + init)
    assert load_time_s(HF, 26 * GB, Tier.SSD, c) == pytest.approx(gb / 2 + init)
    assert load_time_s(HF, 26 * GB, Tier.PEER, c) == pytest.approx(gb / 1 + gb / 2 + init)
    assert load_time_s(HF, 26 * GB, Tier.REPOSITORY, c) == pytest.approx(gb / 0.1 + gb / 2 + init)
    times = [load_time_s(HF, 26 * GB, t, c) for t in Tier]
    assert times == sorted(times)
    # The transfer alone (what keeps the SSD and network busy) is the load without engine init.
    for tier in Tier:
        expected = 0 if tier is Tier.DEVICE else load_time_s(HF, 26 * GB, tier, c) - init
        assert transfer_time_s(26 * GB, tier, c) == pytest.approx(expected)


def test_wire_round_trip_through_json():
    calibration = Calibration.defaults(DeviceKind.CPU).observe_load(EngineKind.VLLM, Tier.SSD, 10 * GB, 2.0, 40.5)
    calibration = calibration.observe_migration(500, 0.3)
    assert Calibration.from_wire(json.loads(json.dumps(calibration.to_wire()))) == calibration


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.pop("init"),
        lambda d: d.update(extra=1),
        lambda d: d["load_gbps"].update(dram="fast"),
        lambda d: d["load_gbps"].update(dram=0.0),
        lambda d: d["load_gbps"].update(ssd=-3.0),
        lambda d: d["load_gbps"].update(dram=math.inf),
        lambda d: d["load_gbps"].update(dram=True),
        lambda d: d["load_gbps"].pop("ssd"),
        lambda d: d["load_gbps"].update(peer=1.0),
        lambda d: d["fetch_gbps"].update(moon=1.0),
        lambda d: d.update(fetch_gbps=[1.0, 2.0]),
        lambda d: d["init"]["vllm"].update(slope=math.nan),
        lambda d: d["init"]["transformers"].pop("sum_w"),
        lambda d: d["init"]["vllm-eager"].update(sum_xx=-1.0),
        lambda d: d["init"].pop("vllm"),
        lambda d: d["init"].update(tpu=d["init"]["vllm"]),
        lambda d: d["init"].update(vllm=None),
        lambda d: d.update(init=d["init"]["vllm"]),  # the old wire form: one fit for every engine kind
        lambda d: d["migration"].update(sum_w=-1.0),
        lambda d: d.update(migration="0.1"),
    ],
)
def test_from_wire_rejects_hostile_input(mutate):
    wire = Calibration.defaults().to_wire()
    mutate(wire)
    with pytest.raises(ValueError):
        Calibration.from_wire(wire)


@pytest.mark.parametrize("wire", [None, [], "calibration", 3, {"load_gbps": {}}])
def test_from_wire_rejects_what_is_not_a_calibration(wire):
    with pytest.raises(ValueError):
        Calibration.from_wire(wire)


DEMO_BYTES = 673 * 10**6  # the 673 MB Llama the vLLM start figures were taken with


@pytest.mark.parametrize(("device", "kind", "low_s", "high_s"), [
    (DeviceKind.CPU, EngineKind.TRANSFORMERS, 0.0, 1.0),
    (DeviceKind.CPU, EngineKind.VLLM, 30.0, 90.0),
    (DeviceKind.CPU, EngineKind.VLLM_EAGER, 10.0, 30.0),
    (DeviceKind.CPU, EngineKind.VLLM_PARKED, 0.0, 0.2),  # the load (DRAM) and a prefix-cache reset
    (DeviceKind.CPU, EngineKind.DUMMY, 0.0, 0.1),
    (DeviceKind.CUDA, EngineKind.TRANSFORMERS, 0.5, 2.0),
    (DeviceKind.CUDA, EngineKind.VLLM_PARKED, 0.2, 1.0),  # and its wake-up
    (DeviceKind.CUDA, EngineKind.VLLM, 20.0, 60.0),
    (DeviceKind.CUDA, EngineKind.VLLM_EAGER, 5.0, 20.0),
    (DeviceKind.CUDA, EngineKind.DUMMY, 0.0, 0.1),
])
def test_a_fresh_node_times_a_start_by_its_engine_kind_and_device(device, kind, low_s, high_s):
    assert low_s <= load_time_s(kind, DEMO_BYTES, Tier.DRAM, Calibration.defaults(device)) <= high_s


@pytest.mark.parametrize("observed", list(EngineKind))
def test_observing_a_start_corrects_only_its_engine_kinds_line(observed):
    fresh = Calibration.defaults(DeviceKind.CPU)
    learned = fresh.observe_load(observed, Tier.SSD, DEMO_BYTES, 0.7, 75.0)
    assert learned.init[observed].predict(DEMO_BYTES / GB) == pytest.approx(75.0)
    for kind in EngineKind:
        if kind is not observed:
            assert learned.init[kind] == fresh.init[kind]
            assert load_time_s(kind, DEMO_BYTES, Tier.DRAM, learned) == load_time_s(kind, DEMO_BYTES, Tier.DRAM, fresh)


def test_an_incomplete_set_of_init_lines_is_no_calibration():
    fresh = Calibration.defaults()
    with pytest.raises(ValueError, match="engine kinds"):
        Calibration(fresh.load_gbps, fresh.fetch_gbps, {EngineKind.VLLM: fresh.init[EngineKind.VLLM]}, fresh.migration)
