"""From what the cluster reports to what placement plans on: pure translation, no I/O.

`node_states` turns the nodes of a `ClusterView` (each with its decoded `NodeStatus`), the replicated
instance records and the deployments into `placement.NodeState`s. Store and DRAM-cache contents arrive as
checkpoint ids; placement speaks of models, so each id maps back to the deployments whose checkpoint it is.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping, Sequence

from sllmd.scheduler.placement import ModelLoad, NodeState, RunningInstance
from sllmd.scheduler.status import PeerInfo
from sllmd.state.models import Deployment, InstanceRecord, InstanceState


def node_states(nodes: Sequence[PeerInfo], deployments: Mapping[str, Deployment], records: Iterable[InstanceRecord],
                *, models_of: Mapping[str, Iterable[str]], in_place: frozenset[str], local_node_id: str
                ) -> list[NodeState]:
    """One NodeState per node. `models_of` maps a checkpoint id to the deployments whose checkpoint it is;
    `in_place` names deployments read where they are (a local directory), which count as on every node's SSD.

    - Alive: the node is alive and has an HTTP address (nothing could be relayed to it otherwise); the local
      node counts as alive whatever the view says.
    - A node without a status yet has no devices, nothing cached, and the default calibration.
    - `instances`: its READY instances of deployed models, as its status lists them (a starting one holds
      its memory, out of its device's free bytes, but serves nothing).
    - `loads`: per model, its live instances, and the requests its status reports waiting or in flight. An
      instance counts once it is in the replicated records or in the node's status, whichever shows it first:
      records are written in the background, and while the cluster has no leader only statuses arrive. Apart,
      `num_in_status`: those the status lists, whose memory its free memory leaves out.
    """

    def named(ids: Iterable[str]) -> frozenset[str]:
        return frozenset(name for cid in ids for name in models_of.get(cid, ()))

    recorded = collections.Counter((r.node_id, r.model, r.state) for r in records if r.is_live)
    states = []
    for node in nodes:
        status = node.status
        requests = {} if status is None else {m: q.num_requests for m, q in status.queues.items()}
        reported = collections.Counter(
            (node.id, i.model, i.state) for i in (status.instances if status is not None else ()))
        live = {key: max(recorded[key], reported[key]) for key in {*recorded, *reported} if key[0] == node.id}
        models = {m for (_, m, _) in live} | set(requests)
        in_status = collections.Counter(model for (_, model, state) in reported.elements()
                                        if state is not InstanceState.STOPPING)
        loads = {m: ModelLoad(live.get((node.id, m, InstanceState.READY), 0),
                              live.get((node.id, m, InstanceState.STARTING), 0), requests.get(m, 0), in_status[m])
                 for m in models}
        is_alive = (node.is_alive and node.http is not None) or node.id == local_node_id
        if status is None:
            states.append(NodeState(node.id, is_alive, ssd_models=in_place, loads=loads))
            continue

        states.append(NodeState(
            node.id, is_alive, free_memory=tuple(d.free_bytes for d in status.devices), topology=status.topology,
            calibration=status.calibration,
            dram_models=named(status.dram_cached), ssd_models=named(status.ssd_cached) | in_place,
            free_dram_bytes=status.free_dram_bytes, free_ssd_bytes=status.free_ssd_bytes,
            pending_load_s=status.pending_load_s,
            instances=tuple(
                RunningInstance(i.id, i.model, deployments[i.model].engine_kind, i.num_requests, i.num_tokens,
                                deployments[i.model].checkpoint_bytes, is_kept=i.is_kept, devices=i.devices,
                                memory_bytes=i.memory_bytes, request_rate=i.request_rate)
                for i in status.instances if i.state is InstanceState.READY and i.model in deployments),
            parked_models=frozenset(m for m in status.parked_models if m in deployments),
            loads=loads))
    return states
