"""The state machine: commands in, LMDB changes out, one transaction per command.

Commands are plain msgpack-able maps `{"op": Op, ...}`. A single node applies them as they are
proposed; in a cluster the same maps are the Raft log entries and every node applies them in log
order, so `apply` must be deterministic: no clocks, no randomness, no reads outside the txn.
"""

from __future__ import annotations

import enum
from typing import Any

from sllmd.errors import Conflict, ModelNotFound
from sllmd.state.models import Deployment, InstanceRecord
from sllmd.state.store import StateStore, Transaction


class Op(enum.StrEnum):
    DEPLOY = "deploy"
    UPDATE_DEPLOYMENT = "update_deployment"
    UNDEPLOY = "undeploy"
    PUT_INSTANCE = "put_instance"
    DELETE_INSTANCE = "delete_instance"
    DELETE_NODE_INSTANCES = "delete_node_instances"


def apply(txn: Transaction, command: dict[str, Any]) -> Any:
    """Apply one command; raise a domain error (and change nothing) if it does not apply."""
    op = Op(command["op"])
    if op is Op.DEPLOY:
        deployment = Deployment.from_wire(command["deployment"])
        if txn.get("deployments", deployment.name) is not None:
            raise Conflict(f"model '{deployment.name}' is already deployed", param="name", code="model_exists")
        txn.put("deployments", deployment.name, deployment.to_wire())
        return deployment
    if op is Op.UPDATE_DEPLOYMENT:
        deployment = Deployment.from_wire(command["deployment"])
        if txn.get("deployments", deployment.name) is None:
            raise ModelNotFound(deployment.name)
        txn.put("deployments", deployment.name, deployment.to_wire())
        return deployment
    if op is Op.UNDEPLOY:
        name = command["name"]
        if not txn.delete("deployments", name):
            raise ModelNotFound(name)
        for instance_id, wire in list(txn.items("instances")):
            if wire["model"] == name:
                txn.delete("instances", instance_id)
        return None
    if op is Op.PUT_INSTANCE:
        record = InstanceRecord.from_wire(command["instance"])
        txn.put("instances", record.id, record.to_wire())
        return record
    if op is Op.DELETE_INSTANCE:
        return txn.delete("instances", command["id"])
    if op is Op.DELETE_NODE_INSTANCES:
        stale = [key for key, wire in txn.items("instances") if wire["node_id"] == command["node_id"]]
        for key in stale:
            txn.delete("instances", key)
        return len(stale)
    raise AssertionError(f"unhandled op {op}")  # pragma: no cover - Op() above rejects unknown ops


class LocalStateMachine:
    """Applies commands straight to the local store (a one-node cluster commits on proposal)."""

    def __init__(self, store: StateStore) -> None:
        self.store = store

    async def propose(self, command: dict[str, Any]) -> Any:
        with self.store.write() as txn:
            return apply(txn, command)

    def deployments(self) -> dict[str, Deployment]:
        with self.store.read() as txn:
            return {name: Deployment.from_wire(wire) for name, wire in txn.items("deployments")}

    def deployment(self, name: str) -> Deployment | None:
        with self.store.read() as txn:
            wire = txn.get("deployments", name)
        return None if wire is None else Deployment.from_wire(wire)

    def instances(self) -> list[InstanceRecord]:
        with self.store.read() as txn:
            return [InstanceRecord.from_wire(wire) for _, wire in txn.items("instances")]
