"""Autoscaling policy: pure decisions, no clocks or I/O, so the simulator can run the same code.

Demand is the number of requests a model has in flight or waiting. A model wants
`ceil(demand / target_concurrency)` instances, clamped to `[min_instances, max_instances]`.
Requests are packed onto the busiest instance still under target, so surplus instances drain,
sit idle for `keep_alive_s`, and stop. A request that finds no ready instance waits through the cold start
as long as the start is within its estimate (`cold_start_wait_s`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from sllmd.types import AutoscalingPolicy

# A start counts as stuck once it has run START_WAIT_FACTOR × its estimate + START_WAIT_SLACK_S. A node's first
# start of an engine kind is estimated from defaults, which can be 2× off (a vLLM start on the 2-core
# development VM took 42-123 s against a 60 s default, depending on what else ran); that start corrects the
# estimate of the next ones (`Calibration.observe_load`).
START_WAIT_FACTOR = 2.0
START_WAIT_SLACK_S = 30.0


def num_instances_wanted(policy: AutoscalingPolicy, demand: int) -> int:
    wanted = math.ceil(demand / policy.target_concurrency) if demand > 0 else 0
    return min(max(wanted, policy.min_instances), policy.max_instances)


def num_instances_to_start(
    policy: AutoscalingPolicy, *, demand: int, num_live: int, num_startable: int, num_elsewhere: int = 0
) -> int:
    """How many new instances to start now on one node.

    `demand` and `num_live` (instances starting or ready) are the node's own; `num_startable` is how many
    more instances of the model could start there (in free memory, or memory that evicting idle instances
    of other models would free; a caller that finds out as it goes passes a large number); `num_elsewhere`
    counts its instances on other nodes, which `max_instances` bounds together with this node's.
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


def cold_start_wait_s(queue_timeout_s: float, max_start_wait_s: float, *, waited_s: float,
                      starts: Iterable[tuple[float, float]]) -> float:
    """How long in all (seconds since it began waiting, `waited_s` ago) a request may wait for a ready instance.

    `starts`: (estimated seconds, seconds since it began) of each instance of the model starting now. The
    request waits `queue_timeout_s`, or longer until the last of those starts counts as stuck (START_WAIT_FACTOR
    × its estimate + START_WAIT_SLACK_S after it began), but never more than `max_start_wait_s` (which must be
    >= `queue_timeout_s`). A start that begins while the request waits only moves the bound later, so asking
    again once it has passed is enough to follow it.
    """
    stuck_after_s = [waited_s - running_s + START_WAIT_FACTOR * estimated_s + START_WAIT_SLACK_S
                     for estimated_s, running_s in starts]
    return min(max_start_wait_s, max([queue_timeout_s, *stuck_after_s]))
