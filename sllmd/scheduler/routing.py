"""Where a request goes, decided on the node it entered: pure policy over that node's `NodeState`s (its own
from its worker, the others from the replicated instance records and their NODE_STATUS), no I/O or clocks.

`route` picks a node for the request, first match wins:

1. this node, if it has a ready instance of the model (no hop);
2. the alive node with a ready instance and the fewest requests per ready instance;
3. the alive node already starting one (this node first), so a cold start is not started twice;
4. this node, if it can start one (a device with the memory free, or after evicting idle instances of
   other models);
5. the alive node whose devices have the memory free (on as many devices as an instance spans), the most
   free first;
6. none: nothing can take it now.

Ties are broken by node id, so every entry node with the same view makes the same choice. It then answers:
- `AskLeader` when a new instance is wanted: the node picked has no instance of the model (rules 4–6), or
  it is saturated (`has_room` fails) and the cluster has fewer than `max_instances` live ones. The leader's
  `placement.plan_new_instance` says where; `AskLeader.then` turns its answer into where to go;
- else `ServeHere` (rule 1 or 3 here: queued for the instance if need be) or `RelayTo` the node picked.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

from sllmd.scheduler.placement import ModelLoad, NodeState
from sllmd.types import AutoscalingPolicy


@dataclass(frozen=True, slots=True)
class ServeHere:
    """Serve on the entry node: on a ready instance, or queued for one (starting there, or started for it)."""


@dataclass(frozen=True, slots=True)
class RelayTo:
    node_id: str


@dataclass(frozen=True, slots=True)
class AskLeader:
    """Ask the leader where a new instance goes. Its answer stands if it names a node in `eligible` (this one,
    or an alive one the entry node does not avoid); with no answer, or another one, `fallback` does."""

    fallback: ServeHere | RelayTo
    eligible: frozenset[str]

    def then(self, placed: str | None, *, local_id: str) -> ServeHere | RelayTo:
        """Where to go once the leader answered `placed` (None: it did not, or no node can take it now)."""
        if placed is None or placed not in self.eligible:
            return self.fallback
        return ServeHere() if placed == local_id else RelayTo(placed)


Route = ServeHere | RelayTo | AskLeader


def has_room(load: ModelLoad, num_requests: int, policy: AutoscalingPolicy) -> bool:
    """`num_requests` requests fit under the target concurrency of the node's live instances (`load`)."""
    return num_requests < load.num_live * policy.target_concurrency


def route(model: str, policy: AutoscalingPolicy, nodes: Sequence[NodeState], *, local_id: str,
          memory_bytes: int, num_devices: int = 1, num_relayed: Mapping[str, int] | None = None,
          avoid: Collection[str] = ()) -> Route:
    """Where a request for `model` (autoscaled by `policy`, an instance asking `memory_bytes` of each of
    `num_devices` devices) that entered at node `local_id` goes (see the module doc). `nodes` holds every node
    this one knows, itself included, which counts as alive whatever its state says; nodes in `avoid` (a relay
    to them failed lately) count as dead. The requests at a node are the most of what it reports and
    `num_relayed[node]`, the requests this node has relayed there and still streams.
    `max_instances` counts the live instances on every node of `nodes`, dead ones too (their records stand
    until the leader drops them)."""
    relayed = num_relayed or {}

    def num_requests(node: NodeState) -> int:
        return max(node.load(model).num_requests, relayed.get(node.id, 0))

    alive = sorted((n for n in nodes if n.id == local_id or (n.is_alive and n.id not in avoid)), key=lambda n: n.id)
    chosen = _choose(model, memory_bytes, num_devices, alive, local_id, num_requests)
    go: ServeHere | RelayTo = ServeHere() if chosen is None or chosen.id == local_id else RelayTo(chosen.id)
    num_live = sum(n.load(model).num_live for n in nodes)
    if chosen is None or chosen.load(model).num_live == 0 or (
            not has_room(chosen.load(model), num_requests(chosen), policy) and num_live < policy.max_instances):
        return AskLeader(go, frozenset(n.id for n in alive))
    return go


def _choose(model: str, memory_bytes: int, num_devices: int, alive: Sequence[NodeState], local_id: str,
            num_requests: Callable[[NodeState], int]) -> NodeState | None:
    """Rules 1–6 over the alive nodes (in id order)."""
    local = next((n for n in alive if n.id == local_id), None)
    if local is not None and local.load(model).num_ready > 0:
        return local
    ready = [n for n in alive if n.load(model).num_ready > 0]
    if ready:
        return min(ready, key=lambda n: (num_requests(n) / n.load(model).num_ready, n.id))
    starting = [n for n in alive if n.load(model).num_starting > 0]
    if starting:
        return min(starting, key=lambda n: (n.id != local_id, n.id))
    if local is not None and local.can_start(model, memory_bytes, num_devices):
        return local

    def free_on_enough(node: NodeState) -> int:  # the most every one of `num_devices` devices has free
        ranked = sorted(node.free_memory, reverse=True)
        return ranked[num_devices - 1] if len(ranked) >= num_devices else -1

    free = [n for n in alive if free_on_enough(n) >= memory_bytes]
    if free:
        return min(free, key=lambda n: (-free_on_enough(n), n.id))
    return None
