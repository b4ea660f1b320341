"""Where a new instance starts: the leader's startup-time placement, asked by any node.

A node whose request needs a new instance (none of the model anywhere, or every one saturated) asks the
leader with PLACE {id, model}; the leader answers PLACED {id, node} or {id} alone for "no node can take it
now". The decision is `scheduler.placement.plan_new_instance` over every node's latest status (NODE_STATUS:
free device memory, DRAM and SSD contents, calibration, loads under way, running instances) and the replicated
instance records, so it picks the node where the model will be serving soonest, migrating a running
instance of another model away when that pays: the leader sends MIGRATE {instance, to} to the instance's
node, whose `migrate` hook carries it out (or runs the hook itself when the instance is its own). The
entry node then relays the request there and that node's worker starts the instance for it (its normal
lease path).

Between answering and the new instance's record reaching the leader's state, nothing shows the start
yet; the leader keeps the `Reservation`s `plan_new_instance` hands back to cover that gap.

Asking costs one peer round trip (~0.2 ms on loopback) and only happens on the cold path; a leader that
does not answer within PLACE_TIMEOUT_S makes the caller fall back to its own local rules.
Not thread-safe: one `Placer` per node, used from its event loop.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from sllmd.checkpoint.store import checkpoint_id, reads_store
from sllmd.scheduler.placement import InstanceSpec, Migration, NodeState, Reservation, plan_new_instance
from sllmd.scheduler.status import PeerInfo
from sllmd.scheduler.view import node_states
from sllmd.state.models import Deployment
from sllmd.tasks import TaskSet

if TYPE_CHECKING:
    from sllmd.cluster.replicated import ReplicatedStateMachine
    from sllmd.cluster.transport import Message

log = logging.getLogger(__name__)

PLACE_TIMEOUT_S = 1.0


class PlacementMessage(enum.StrEnum):
    PLACE = "place"
    PLACED = "placed"
    MIGRATE = "migrate"  # leader -> the node running the instance that a plan moves away


class Placer:
    def __init__(self, state: ReplicatedStateMachine, *, migrate: Callable[[Migration], Awaitable[Any]] | None = None,
                 memory_need: Callable[[Deployment], int] = lambda deployment: 0) -> None:
        """`migrate` carries out a planned migration of an instance on this node; None: plans never migrate.
        `memory_need(d)`: the device memory an instance of `d` asks for (this node's estimate, taken for all)."""
        self.state = state
        self.migrate = migrate
        self.memory_need = memory_need
        self._reservations: tuple[Reservation, ...] = ()
        self._ids = itertools.count(1)
        self._asked: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._tasks = TaskSet()  # planned migrations being carried out
        self._states: tuple[Any, list[NodeState]] | None = None  # (what they were computed from, node_states)
        state.cluster.add_handler(PlacementMessage.PLACE, self._on_place)
        state.cluster.add_handler(PlacementMessage.PLACED, self._on_placed)
        state.cluster.add_handler(PlacementMessage.MIGRATE, self._on_migrate)

    async def place(self, model: str) -> str | None:
        """The id of the node a request that wants a new instance of `model` goes to, by the leader's
        decision; None when the leader cannot be asked (no leader, no answer in time) or no node can take one
        now."""
        if self.state.is_leader:
            return self.plan(model, asked_by=self.state.node_id)
        leader = self.state.leader_id
        if leader is None:
            return None
        request_id = next(self._ids)
        future = self._asked[request_id] = asyncio.get_running_loop().create_future()
        try:
            if not self.state.cluster.send(leader, PlacementMessage.PLACE, {"id": request_id, "model": model}):
                return None
            async with asyncio.timeout(PLACE_TIMEOUT_S):
                reply = await future
        except TimeoutError:
            log.warning("the leader did not answer a placement in time", extra={"model": model, "leader": leader})
            return None
        finally:
            self._asked.pop(request_id, None)
        node_id = reply.get("node")
        return node_id if isinstance(node_id, str) else None  # None: "no node now", or a malformed answer

    def plan(self, model: str, *, asked_by: str) -> str | None:
        """The leader's decision (`plan_new_instance`) for a request that entered at node `asked_by`: the id
        of the node it goes to, or None. Starts the plan's migrations."""
        deployment = self.state.deployment(model)
        if deployment is None:
            return None
        spec = InstanceSpec(model, deployment.engine_kind, deployment.checkpoint_bytes,
                            deployment.autoscaling.max_instances, self.memory_need(deployment), deployment.num_gpus)
        placement, self._reservations = plan_new_instance(
            spec, self.node_states(self.state.cluster_view().nodes), self._reservations, asked_by=asked_by,
            now=time.monotonic(), allow_migration=self.migrate is not None)
        if placement is None:
            return None
        if (plan := placement.start) is not None:
            for migration in plan.migrations:
                self._tasks.spawn(self._run_migration(migration))
            log.info("placed a new instance", extra={
                "model": model, "node": plan.node_id, "tier": plan.tier.value,
                "estimated_s": round(plan.estimated_s, 3), "migrations": len(plan.migrations),
                "evictions": len(plan.evictions)})
        return placement.node_id

    def node_states(self, nodes: Sequence[PeerInfo]) -> list[NodeState]:
        """`nodes` (of the cluster view) as placement sees them, with the deployments and instance records now.
        Computed again only when the replicated state or one of the nodes (address, liveness, status) changed:
        every relayed request routes over them, and statuses arrive about once a second."""
        key = (self.state.snapshot_id(), tuple((n.id, n.http, n.is_alive, n.status) for n in nodes))
        if self._states is not None and self._states[0] == key:
            return list(self._states[1])
        deployments = self.state.deployments()
        models_of: dict[str, set[str]] = {}
        in_place = set()
        for name, deployment in deployments.items():
            if reads_store(deployment.backend, deployment.checkpoint):
                models_of.setdefault(checkpoint_id(deployment.checkpoint), set()).add(name)
            else:
                in_place.add(name)
        states = node_states(nodes, deployments, self.state.instances(), models_of=models_of,
                             in_place=frozenset(in_place), local_node_id=self.state.node_id)
        self._states = key, states
        return list(states)

    async def _run_migration(self, migration: Migration) -> None:
        """Carry out a planned migration: here, or by ordering the instance's node to."""
        if migration.from_node != self.state.node_id:
            body = {"instance": migration.instance_id, "model": migration.model, "to": migration.to_node,
                    "estimated_s": migration.estimated_s}
            if not self.state.cluster.send(migration.from_node, PlacementMessage.MIGRATE, body):
                log.warning("planned migration not sent: no link to the instance's node",
                            extra={"instance": migration.instance_id, "node": migration.from_node})
            return
        assert self.migrate is not None
        try:
            await self.migrate(migration)
        except Exception as exc:  # the planned start then waits for a slot like any queued request
            log.warning("planned migration failed", extra={"instance": migration.instance_id,
                                                           "to": migration.to_node, "error": repr(exc)})

    # -- messages -------------------------------------------------------------------------------

    def _on_place(self, message: Message) -> None:
        body = message.body
        if not isinstance(body, dict) or type(body.get("id")) is not int or not isinstance(body.get("model"), str):
            return
        reply: dict[str, Any] = {"id": body["id"]}
        if self.state.is_leader:
            node_id = self.plan(body["model"], asked_by=message.sender)
            if node_id is not None:
                reply["node"] = node_id
        self.state.cluster.send(message.sender, PlacementMessage.PLACED, reply)

    def _on_placed(self, message: Message) -> None:
        body = message.body
        if not isinstance(body, dict) or type(body.get("id")) is not int:
            return
        future = self._asked.get(body["id"])
        if future is not None and not future.done() and message.sender == self.state.leader_id:
            future.set_result(body)

    def _on_migrate(self, message: Message) -> None:
        body = message.body
        if (message.sender != self.state.leader_id or self.migrate is None or not isinstance(body, dict)
                or not all(isinstance(body.get(k), str) for k in ("instance", "model", "to"))
                or not isinstance(body.get("estimated_s"), int | float)):
            return  # only the current leader's plans move instances
        migration = Migration(body["instance"], body["model"], self.state.node_id, body["to"], body["estimated_s"])
        self._tasks.spawn(self._run_migration(migration))

    async def close(self) -> None:
        await self._tasks.close()
