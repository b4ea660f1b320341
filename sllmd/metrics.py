"""Prometheus metrics of one node, in a registry of its own (several nodes can share a process in tests)."""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

from sllmd.scheduler.estimate import Calibration

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
GBPS_BUCKETS = (0.1, 0.25, 0.5, 1, 1.5, 2, 3, 4, 6, 8, 12, 16, 25, 50, 100)  # disk ~1-7, PCIe ~10-50, DRAM hit more


class Metrics:
    def __init__(self) -> None:
        disable_created_metrics()  # `_created` series double the output and no dashboard reads them
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("sllmd_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.ttft = Histogram(
            "sllmd_ttft_seconds", "Request arrival to first token", ["model"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.latency = Histogram(
            "sllmd_request_latency_seconds", "Request arrival to last token", ["model"], buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter("sllmd_tokens", "Tokens processed", ["model", "direction"], registry=r)
        self.cold_starts = Counter("sllmd_cold_starts", "Instance starts by checkpoint source tier", ["model", "tier"],
                                   registry=r)
        self.cold_start_seconds = Histogram(
            "sllmd_cold_start_seconds", "Instance start to ready", ["model", "tier"], buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.start_phase_seconds = Histogram(
            "sllmd_start_phase_seconds", "Instance start seconds by phase (the engine's split: see docs/operations.md)",
            ["engine_kind", "phase"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.load_bytes = Counter("sllmd_load_bytes", "Checkpoint bytes loaded", ["model", "tier"], registry=r)
        self.load_gbps = Histogram(
            "sllmd_load_gbps", "Checkpoint load speed (bytes / load_s, GB/s) by source tier", ["model", "tier"],
            buckets=GBPS_BUCKETS, registry=r,
        )
        self.fetches = Counter("sllmd_checkpoint_fetches", "Checkpoints copied into the SSD store by origin tier",
                               ["tier"], registry=r)
        self.fetch_bytes = Counter("sllmd_checkpoint_fetch_bytes", "Bytes copied into the SSD store by origin tier",
                                   ["tier"], registry=r)
        self.start_estimate_error = Histogram(
            "sllmd_start_estimate_error_seconds", "|actual - estimated| seconds of instance starts, by source tier",
            ["tier"], buckets=LATENCY_BUCKETS, registry=r)
        self.estimator = Gauge("sllmd_estimator", "This node's estimator constants (GB/s, or s and s per unit)",
                               ["quantity", "tier", "engine_kind"], registry=r)
        self.instances = Gauge("sllmd_instances", "Instances on this node by state", ["model", "state"], registry=r)
        self.queued = Gauge("sllmd_queued_requests", "Requests waiting for an instance", ["model"], registry=r)
        self.device_free_bytes = Gauge("sllmd_device_free_bytes", "Device memory budget not held by an instance",
                                       ["device"], registry=r)

    def forget_model(self, model: str) -> None:
        """Drop the gauges of a removed model (counters and histograms keep its history)."""
        for gauge, labels in [(self.instances, (model, "starting")), (self.instances, (model, "ready")),
                              (self.queued, (model,))]:
            with contextlib.suppress(KeyError):  # never set for this model
                gauge.remove(*labels)

    def show_calibration(self, calibration: Calibration) -> None:
        for tier, gbps in calibration.load_gbps.items():
            self.estimator.labels("load_gbps", tier, "").set(gbps)
        for tier, gbps in calibration.fetch_gbps.items():
            self.estimator.labels("fetch_gbps", tier, "").set(gbps)
        fits = [("init", kind, fit) for kind, fit in calibration.init.items()]
        for name, kind, fit in [*fits, ("migration", "", calibration.migration)]:
            self.estimator.labels(f"{name}_intercept_s", "", kind).set(fit.intercept)
            self.estimator.labels(f"{name}_slope_s", "", kind).set(fit.slope)

    def render(self) -> bytes:
        return generate_latest(self.registry)
