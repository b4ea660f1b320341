"""Which idle instances to stop when a new one needs memory on a device. Pure: the caller (a node's worker,
the leader's placement, the simulator) describes the candidates; no clock, no I/O.

The cost rule (`EvictionRule.COST`): evicting an instance costs, in expectation, its model's next cold start:
the seconds to load it again from the tier that will hold its checkpoint (`reload_s`) times how often the
model is asked for (`request_rate`, requests/s). Per byte freed, the cheapest go first. The baselines the
simulator compares against: LRU (longest idle first) and Ollama's rule (the idle instance whose keep-alive
runs out soonest first).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


class EvictionRule(enum.StrEnum):
    COST = "cost"  # lowest reload seconds × request rate per byte freed first
    LRU = "lru"  # longest idle first
    SHORTEST_KEEP_ALIVE = "keep-alive"  # Ollama's: the one whose keep-alive ends soonest first


@dataclass(frozen=True, slots=True)
class EvictionCandidate:
    """An idle instance that may be stopped (never a busy one, nor one kept for min_instances)."""

    id: str
    devices: tuple[int, ...]  # where it runs
    num_bytes: int  # memory it frees on each of them
    reload_s: float  # seconds to start it again, from the tier its checkpoint stays in
    request_rate: float  # its model's recent requests per second
    idle_s: float  # seconds since its last request ended
    keep_alive_left_s: float  # seconds until its keep-alive would stop it anyway

    @property
    def cost(self) -> float:
        """Expected seconds of cold start per second that evicting it causes."""
        return self.reload_s * self.request_rate


def _order_key(candidate: EvictionCandidate, rule: EvictionRule) -> tuple[float, ...]:
    if rule is EvictionRule.COST:
        return (candidate.cost / max(1, candidate.num_bytes), -candidate.num_bytes, -candidate.idle_s)
    if rule is EvictionRule.LRU:
        return (-candidate.idle_s,)
    return (candidate.keep_alive_left_s, -candidate.idle_s)


@dataclass(frozen=True, slots=True)
class EvictionPlan:
    devices: tuple[int, ...]  # where the new instance goes: one device, or a set for one spanning several
    evictions: tuple[str, ...]  # instance ids, in the order chosen
    cost: float  # the cost rule's total for them (for every rule, so plans can be compared)


def plan_evictions(candidates: Sequence[EvictionCandidate], free_bytes: Mapping[int, int], needed_bytes: int,
                   rule: EvictionRule = EvictionRule.COST, *, groups: Sequence[tuple[int, ...]] | None = None
                   ) -> EvictionPlan | None:
    """The instances to evict so that every device of one group has `needed_bytes` free, or None when no group
    can get there.

    `free_bytes`: each device's free bytes now. `groups`: the device sets a new instance may take, in order of
    preference (for one spanning several devices, those close in the topology first); default: each device of
    `free_bytes` alone, in index order. A group with room already needs no eviction (the plan is empty).
    Otherwise candidates holding memory on a device of the group that is short are taken in the rule's order
    until every device has enough (an instance spanning several devices frees its bytes on each); then any
    taken one whose bytes turn out not to be needed is given back, most costly first. Among groups, the plan
    with the lowest cost-rule total wins under COST; under the baselines, the one whose first victim comes first
    in the rule's order; then fewer evictions, then the earlier group. A group with room always wins.
    """
    if groups is None:
        groups = [(device,) for device in sorted(free_bytes)]
    best: tuple[tuple[float, ...], EvictionPlan] | None = None
    for rank, group in enumerate(groups):
        free = {device: free_bytes[device] for device in group}
        if not _short(free, needed_bytes):
            plan = EvictionPlan(group, (), 0.0)
            key: tuple[float, ...] = (0, rank)  # room already: before any plan that evicts
        else:
            taken: list[EvictionCandidate] = []
            for candidate in sorted((c for c in candidates if set(c.devices) & set(group)),
                                    key=lambda c: (*_order_key(c, rule), c.id)):
                missing = _short(free, needed_bytes)
                if not missing:
                    break
                if set(candidate.devices) & set(missing):
                    taken.append(candidate)
                    _add(free, candidate, candidate.num_bytes)
            if _short(free, needed_bytes):
                continue
            for candidate in sorted(taken, key=lambda c: (-c.cost, c.id)):
                _add(free, candidate, -candidate.num_bytes)
                if _short(free, needed_bytes):
                    _add(free, candidate, candidate.num_bytes)  # needed after all
                else:
                    taken.remove(candidate)
            cost = sum(c.cost for c in taken)
            plan = EvictionPlan(group, tuple(c.id for c in taken), cost)
            first = _order_key(taken[0], rule) if rule is not EvictionRule.COST else (cost,)
            key = (1, *first, len(taken), rank)
        if best is None or key < best[0]:
            best = (key, plan)
    return None if best is None else best[1]


def _short(free: Mapping[int, int], needed_bytes: int) -> list[int]:
    """The devices of a group (the keys of `free`) with less than `needed_bytes` free."""
    return [device for device, num_bytes in free.items() if num_bytes < needed_bytes]


def _add(free: dict[int, int], candidate: EvictionCandidate, num_bytes: int) -> None:
    for device in candidate.devices:
        if device in free:
            free[device] += num_bytes


@dataclass
class RequestRate:
    """A model's recent request rate: arrivals decayed exponentially with `half_life_s`. Time comes from the
    caller (monotonic seconds), so the simulator and tests drive it."""

    half_life_s: float = 300.0
    _weight: float = 0.0  # decayed count of arrivals, as of `_at`
    _at: float = 0.0

    def observe(self, now: float, count: int = 1) -> None:
        self._weight = self._decayed(now) + count
        self._at = now

    def per_s(self, now: float) -> float:
        """Arrivals per second: the decayed count over the decay's mean lifetime (half-life / ln 2)."""
        return self._decayed(now) * 0.6931471805599453 / self.half_life_s

    def _decayed(self, now: float) -> float:
        if self._weight == 0.0:
            return 0.0
        return self._weight * 0.5 ** (max(0.0, now - self._at) / self.half_life_s)
