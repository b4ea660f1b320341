"""Where one request for a model is served: pure policy over a snapshot of the cluster, no I/O or clocks.

The entry node builds a `NodeView` per known node (its own from the worker, the others from the
replicated instance records and NODE_STATUS soft state) and asks `choose_node`. Rules, first match wins:

1. this node, if it has a ready instance of the model (no hop);
2. the alive node with a ready instance and the least load per ready instance;
3. the alive node already starting one (this node first), so a cold start is not started twice;
4. this node, if it can start one (a free slot, or an idle instance it may evict);
5. the alive node with the most free slots;
6. None: nothing can take it now; the caller serves locally and queues (or answers 503) there.

Ties are broken by node id, so every entry node with the same view makes the same choice.
Later rules (checkpoint locality, estimated load time) extend `NodeView` with defaulted fields.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class NodeView:
    """One node as the entry node sees it for one model. Counts are of that model's instances."""

    id: str
    is_alive: bool
    num_free_slots: int
    ready_instances_of_model: int = 0
    starting_instances_of_model: int = 0
    in_flight_hint: int = 0  # requests of the model the entry node knows to be in flight there
    num_evictable: int = 0  # idle instances of other models it may stop to start this one

    @property
    def can_start(self) -> bool:
        return self.num_free_slots + self.num_evictable > 0


def choose_node(model: str, *, local_node_id: str, nodes: Sequence[NodeView]) -> str | None:
    """The id of the node that should serve a request for `model`, or None (see the module doc).

    `model` is not used by these rules yet; it is part of the signature for locality-aware ones.
    The local node counts as alive whatever its view says.
    """
    del model
    alive = sorted((n for n in nodes if n.is_alive or n.id == local_node_id), key=lambda n: n.id)
    local = next((n for n in alive if n.id == local_node_id), None)
    if local is not None and local.ready_instances_of_model > 0:
        return local.id
    ready = [n for n in alive if n.ready_instances_of_model > 0]
    if ready:
        return min(ready, key=lambda n: (n.in_flight_hint / n.ready_instances_of_model, n.id)).id
    starting = [n for n in alive if n.starting_instances_of_model > 0]
    if starting:
        return min(starting, key=lambda n: (n.id != local_node_id, n.id)).id
    if local is not None and local.can_start:
        return local.id
    free = [n for n in alive if n.num_free_slots > 0]
    if free:
        return min(free, key=lambda n: (-n.num_free_slots, n.id)).id
    return None
