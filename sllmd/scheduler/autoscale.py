"""Autoscaling policy: pure decisions, no clocks or I/O, so the simulator can run the same code.

Demand is the number of requests a model has in flight or waiting. A model wants
`ceil(demand / target_concurrency)` instances, clamped to `[min_instances, max_instances]`.
Requests are packed onto the busiest instance still under target, so surplus instances drain,
sit idle for `keep_alive_s`, and stop.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class AutoscalingPolicy:
    min_instances: int = 0
    max_instances: int = 1
    target_concurrency: int = 4
    keep_alive_s: float = 60.0

    def problems(self) -> list[tuple[str, str]]:
        """(field, message) for every violated bound; empty when valid."""
        found = []
        if self.min_instances < 0:
            found.append(("min_instances", "must be >= 0"))
        if self.max_instances < 1:
            found.append(("max_instances", "must be >= 1"))
        if self.min_instances > self.max_instances:
            found.append(("min_instances", "must be <= max_instances"))
        if self.target_concurrency < 1:
            found.append(("target_concurrency", "must be >= 1"))
        if self.keep_alive_s < 0:
            found.append(("keep_alive_s", "must be >= 0"))
        return found


def num_instances_wanted(policy: AutoscalingPolicy, demand: int) -> int:
    wanted = math.ceil(demand / policy.target_concurrency) if demand > 0 else 0
    return min(max(wanted, policy.min_instances), policy.max_instances)


def num_instances_to_start(
    policy: AutoscalingPolicy, *, demand: int, num_live: int, num_startable: int, num_elsewhere: int = 0
) -> int:
    """How many new instances to start now on one node.

    `demand` and `num_live` (instances starting or ready) are the node's own; `num_startable` is how many
    more slots the model could get there (free slots plus ones that evicting idle instances of other
    models would free); `num_elsewhere` counts its instances on other nodes, which `max_instances`
    bounds together with this node's.
    """
    missing = min(num_instances_wanted(policy, demand), policy.max_instances - num_elsewhere) - num_live
    return max(0, min(missing, num_startable))


def pick_instance(in_flight: Sequence[int], target_concurrency: int) -> int:
    """Index of the instance for the next request: the busiest one still under target (packing, so
    surplus instances go idle and scale down); when all are at or over target, the least busy.
    Ties go to the lowest index. `in_flight` must be non-empty."""
    under = [i for i, n in enumerate(in_flight) if n < target_concurrency]
    if under:
        return max(under, key=lambda i: (in_flight[i], -i))
    return min(range(len(in_flight)), key=lambda i: (in_flight[i], i))
