"""From what the cluster reports to what the scheduler plans on: pure translation, no I/O.

`node_states` turns the nodes of `/admin/cluster` (each node's NODE_STATUS soft state, already
type-checked by `membership.checked_status`) and the deployments into `placement.NodeState`s. Store and
DRAM-cache contents arrive as checkpoint ids; placement speaks of models, so each id maps back to the
deployments whose checkpoint it is. A calibration that does not parse (an old or hostile peer) reads as
the defaults rather than failing the plan.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sllmd.scheduler.estimate import Calibration
from sllmd.scheduler.placement import NodeState, RunningInstance
from sllmd.state.models import Deployment


def node_states(nodes: Sequence[Mapping[str, Any]], deployments: Mapping[str, Deployment], *,
                models_of: Mapping[str, Iterable[str]], in_place: frozenset[str], local_node_id: str
                ) -> list[NodeState]:
    """One NodeState per node of the cluster view. `models_of` maps a checkpoint id to the deployments
    whose checkpoint it is; `in_place` names deployments read where they are (a local directory), which
    count as on every node's SSD. The local node counts as alive whatever the view says. Only READY
    instances are listed: a starting one holds its slot (not in `free_slots`) but serves nothing."""

    def models(ids: Iterable[Any]) -> frozenset[str]:
        return frozenset(name for cid in ids if isinstance(cid, str) for name in models_of.get(cid, ()))

    states = []
    for node in nodes:
        try:
            calibration = Calibration.from_wire(node.get("calibration"))
        except ValueError:
            calibration = Calibration.defaults()
        instances = tuple(
            RunningInstance(i["id"], i["model"], deployments[i["model"]].engine_kind, int(i.get("requests", 0)),
                            int(i.get("tokens", 0)), deployments[i["model"]].checkpoint_bytes)
            for i in node.get("instances", ()) if _is_ready_instance(i, deployments))
        states.append(NodeState(
            id=node["id"], is_alive=bool(node["alive"]) or node["id"] == local_node_id,
            num_free_slots=node.get("free_slots") or 0, calibration=calibration,
            dram_models=models(node.get("dram_cached", ())), ssd_models=models(node.get("ssd_cached", ())) | in_place,
            free_dram_bytes=node.get("free_dram_bytes", 0), free_ssd_bytes=node.get("free_ssd_bytes", 0),
            pending_load_s=float(node.get("pending_load_s", 0.0)), instances=instances,
            parked_models=frozenset(m for m in node.get("parked_models", ())
                                    if isinstance(m, str) and m in deployments)))
    return states


def _is_ready_instance(item: Any, deployments: Mapping[str, Deployment]) -> bool:
    return (isinstance(item, dict) and item.get("state") == "ready" and isinstance(item.get("id"), str)
            and item.get("model") in deployments and isinstance(item.get("requests", 0), int)
            and isinstance(item.get("tokens", 0), int))
