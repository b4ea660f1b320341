"""The state machine: commands in, LMDB changes out, one transaction per command.

Commands are plain msgpack-able maps `{"op": Op, ...}`. A single node applies them as they are
proposed; in a cluster the same maps are the Raft log entries and every node applies them in log
order, so `apply` must be deterministic: no clocks, no randomness, no reads outside the txn.

The replicated state is the databases in STATE_DATABASES (deployments, instances, the node table).
`meta` is local to a node (its id, the index of the last applied log entry) and never replicated.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import msgpack

from sllmd.errors import Conflict, ModelNotFound, NotFound
from sllmd.state.models import Deployment, InstanceRecord
from sllmd.state.store import StateStore, Transaction

STATE_DATABASES = ("deployments", "instances", "nodes")
APPLIED_INDEX_KEY = "raft_applied_index"  # in `meta`: written in the same txn as the entries it counts
SNAPSHOT_VERSION = 1


class Op(enum.StrEnum):
    DEPLOY = "deploy"
    UPDATE_DEPLOYMENT = "update_deployment"
    UNDEPLOY = "undeploy"
    PUT_INSTANCE = "put_instance"
    DELETE_INSTANCE = "delete_instance"
    DELETE_NODE_INSTANCES = "delete_node_instances"
    PUT_NODE = "put_node"  # add or re-address a cluster member
    REMOVE_NODE = "remove_node"  # forget a member and its instances


# Instance records describe what a node runs right now. Writing them is idempotent (a put, a delete),
# and a node keeps serving when they cannot be committed (no leader): see ReplicatedStateMachine.
SOFT_OPS = frozenset({Op.PUT_INSTANCE, Op.DELETE_INSTANCE, Op.DELETE_NODE_INSTANCES})


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """A cluster member as the replicated node table knows it. Addresses are "host:port"."""

    id: str
    peer: str  # ZeroMQ peer transport
    http: str  # HTTP API

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, wire: Any) -> NodeRecord:
        """Raises ValueError unless `wire` is {"id", "peer", "http"} with non-empty strings."""
        if not isinstance(wire, dict) or set(wire) != {"id", "peer", "http"}:
            raise ValueError("node record: expected a map of id, peer, http")
        if not all(isinstance(v, str) and 0 < len(v) <= 255 for v in wire.values()):
            raise ValueError("node record: id, peer and http must be strings of 1..255 characters")
        return cls(wire["id"], wire["peer"], wire["http"])


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
        return _delete_node_instances(txn, command["node_id"])
    if op is Op.PUT_NODE:
        node = NodeRecord.from_wire(command["node"])
        txn.put("nodes", node.id, node.to_wire())
        return node
    if op is Op.REMOVE_NODE:
        if not txn.delete("nodes", command["node_id"]):
            raise NotFound(f"node '{command['node_id']}' is not a cluster member", code="node_not_found")
        return _delete_node_instances(txn, command["node_id"])
    raise AssertionError(f"unhandled op {op}")  # pragma: no cover - Op() above rejects unknown ops


def _delete_node_instances(txn: Transaction, node_id: str) -> int:
    stale = [key for key, wire in txn.items("instances") if wire["node_id"] == node_id]
    for key in stale:
        txn.delete("instances", key)
    return len(stale)


# --------------------------------------------------------------------------- the Raft shell's machine


class StoreStateMachine:
    """The replicated databases of `store`, as a Raft shell's StateMachine (`sllmd.cluster.state_machine`).
    The applied index lives in `meta`, written in the same transaction as the effects it counts."""

    def __init__(self, store: StateStore) -> None:
        self.store = store

    def applied_index(self) -> int:
        with self.store.read() as txn:
            return _read_applied_index(txn)

    def apply(self, commands: Sequence[dict[str, Any]], applied_index: int) -> list[Any]:
        """One write transaction for the batch; each command runs in a nested one, so a command that
        raises is rolled back alone and its exception is its outcome."""
        env, dbs = self.store.env, self.store.dbs
        outcomes: list[Any] = []
        with env.begin(write=True) as parent:
            for command in commands:
                child = env.begin(write=True, parent=parent)
                try:
                    outcomes.append(apply(Transaction(child, dbs), command))
                except Exception as exc:  # deterministic on every node: the command is a no-op everywhere
                    child.abort()
                    outcomes.append(exc)
                else:
                    child.commit()
            _write_applied_index(Transaction(parent, dbs), applied_index)
        return outcomes

    def snapshot(self) -> tuple[int, bytes]:
        """The replicated databases as one msgpack map (Raft §7), and the applied index they are as of."""
        with self.store.read() as txn:
            dbs = {db: dict(txn.items(db)) for db in STATE_DATABASES}
            return _read_applied_index(txn), msgpack.packb({"version": SNAPSHOT_VERSION, "dbs": dbs},
                                                           use_bin_type=True)

    def restore(self, data: bytes, applied_index: int) -> None:
        """Replaces the replicated databases with a `snapshot` copy (b"": the empty state). Raises
        ValueError on a copy that does not decode, and then changes nothing."""
        dbs = _decode_snapshot(data) if data else {}
        with self.store.write() as txn:
            for db in STATE_DATABASES:
                for key in [key for key, _ in txn.items(db)]:
                    txn.delete(db, key)
                for key, value in dbs.get(db, {}).items():
                    if not isinstance(key, str):
                        raise ValueError(f"state snapshot: {db} has a non-string key")
                    txn.put(db, key, value)
            _write_applied_index(txn, applied_index)


def _read_applied_index(txn: Transaction) -> int:
    return txn.get("meta", APPLIED_INDEX_KEY) or 0


def _write_applied_index(txn: Transaction, index: int) -> None:
    txn.put("meta", APPLIED_INDEX_KEY, index)


def _decode_snapshot(data: bytes) -> dict[str, Any]:
    try:
        snapshot = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # hostile or corrupt bytes: whatever the decoder raises
        raise ValueError(f"state snapshot does not decode: {exc}") from None
    if not isinstance(snapshot, dict) or snapshot.get("version") != SNAPSHOT_VERSION:
        raise ValueError("state snapshot: unknown version")
    dbs = snapshot.get("dbs")
    if not isinstance(dbs, dict) or not all(isinstance(dbs.get(db, {}), dict) for db in STATE_DATABASES):
        raise ValueError("state snapshot: expected a map of databases")
    return dbs


class LocalStateMachine:
    """Applies commands straight to the local store (a one-node cluster commits on proposal), and reads the
    replicated tables.

    Reads decode a table once per store snapshot: LMDB numbers every committed write transaction, and a read
    transaction's id is the number of the snapshot it sees, so a table decoded at snapshot N is the table of
    every later read that sees N. Any commit (on this object or not: a Raft apply in a thread) makes the next
    read decode again. The request path reads deployments and instances on every request; decoding them
    each time cost more than the rest of its routing."""

    def __init__(self, store: StateStore) -> None:
        self.store = store
        self._decoded: dict[str, tuple[int, dict[str, Any]]] = {}  # table -> (snapshot id, decoded rows)

    async def propose(self, command: dict[str, Any]) -> Any:
        with self.store.write() as txn:
            return apply(txn, command)

    def snapshot_id(self) -> int:
        """The store's current snapshot number: equal numbers, equal contents."""
        with self.store.read() as txn:
            return txn.snapshot_id

    def _table(self, db: str, decode: Callable[[Any], Any]) -> dict[str, Any]:
        """The rows of `db`, decoded; shared between reads of one snapshot, so callers must not change it."""
        with self.store.read() as txn:
            snapshot = txn.snapshot_id
            cached = self._decoded.get(db)
            if cached is not None and cached[0] == snapshot:
                return cached[1]
            rows = {key: decode(wire) for key, wire in txn.items(db)}
        self._decoded[db] = (snapshot, rows)
        return rows

    def deployments(self) -> dict[str, Deployment]:
        return dict(self._table("deployments", Deployment.from_wire))

    def deployment(self, name: str) -> Deployment | None:
        return self._table("deployments", Deployment.from_wire).get(name)

    def instances(self) -> list[InstanceRecord]:
        return list(self._table("instances", InstanceRecord.from_wire).values())

    def nodes(self) -> dict[str, NodeRecord]:
        return dict(self._table("nodes", NodeRecord.from_wire))


def result_to_wire(result: Any) -> dict[str, Any]:
    """What `apply` returned, as a forwarded write's answer carries it (`result_from_wire` reads it)."""
    if isinstance(result, Deployment):
        return {"deployment": result.to_wire()}
    if isinstance(result, InstanceRecord):
        return {"instance": result.to_wire()}
    if isinstance(result, NodeRecord):
        return {"node": result.to_wire()}
    return {"value": result}  # None, bool, int


def result_from_wire(wire: Any) -> Any:
    if not isinstance(wire, dict):
        return None
    if "deployment" in wire:
        return Deployment.from_wire(wire["deployment"])
    if "instance" in wire:
        return InstanceRecord.from_wire(wire["instance"])
    if "node" in wire:
        return NodeRecord.from_wire(wire["node"])
    return wire.get("value")
