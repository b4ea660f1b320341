"""Where a new instance starts: the leader's startup-time placement, asked by any node.

A node whose request needs a new instance (none of the model anywhere, or every one saturated) asks the
leader with PLACE {id, model}; the leader answers PLACED {id, node, http, tier, estimated_s} or {id}
alone for "no node can take it now". The leader plans with `scheduler.placement.plan_start` over every
node's latest soft state (NODE_STATUS: free slots, DRAM and SSD contents, calibration, loads under way,
running instances), so it picks the node where the model will be serving soonest, migrating a running
instance of another model away when that pays (`migrate` hook). The entry node then relays the request
there and that node's worker starts the instance for it (its normal lease path).

Between answering and the new instance's record reaching the leader's state, soft state does not show
the start yet; the leader's own reservations cover that gap: a reserved slot is not offered again, its
load counts as queued on that node, and a model with `max_instances` live or reserved instances
cluster-wide gets the least-loaded node already running or starting it instead of a new start. A
reservation ends when a new record of the model appears on its node, or after its estimate plus
RESERVATION_SLACK_S.

Asking costs one peer round trip (~0.2 ms on loopback) and only happens on the cold path; a leader that
does not answer within PLACE_TIMEOUT_S makes the caller fall back to its own local rules.
Not thread-safe: one `Placer` per node, used from its event loop.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import enum
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sllmd.checkpoint.store import checkpoint_id, reads_store
from sllmd.scheduler.estimate import Tier, transfer_time_s
from sllmd.scheduler.placement import Migration, NodeState, plan_start
from sllmd.scheduler.view import node_states

if TYPE_CHECKING:
    from sllmd.cluster.replicated import ReplicatedStateMachine
    from sllmd.cluster.transport import Message

log = logging.getLogger(__name__)

PLACE_TIMEOUT_S = 1.0
RESERVATION_SLACK_S = 5.0
# The asking (entry) node gets the start when its estimate is this close to the best: no relay hop, and the
# client's own node, for a difference within the estimators' noise.
ENTRY_PREFERENCE = (0.05, 0.005)  # (relative, absolute seconds)


class PlacementMessage(enum.StrEnum):
    PLACE = "place"
    PLACED = "placed"


@dataclass(frozen=True, slots=True)
class Placement:
    node_id: str
    http: str  # the node's HTTP address ("" for the asking node itself is never needed: it compares ids)
    tier: Tier
    estimated_s: float


@dataclass(slots=True)
class _Reservation:
    model: str
    node_id: str
    estimated_s: float  # until it serves
    transfer_s: float  # of which the node's SSD or network is busy (what other starts there queue behind)
    made_at: float  # time.monotonic()
    num_records_before: int  # the model's instance records on the node when it was made

    def remaining_transfer_s(self, now: float) -> float:
        return max(0.0, self.transfer_s - (now - self.made_at))

    def is_expired(self, now: float) -> bool:
        return now - self.made_at > self.estimated_s + RESERVATION_SLACK_S


class Placer:
    def __init__(self, state: ReplicatedStateMachine) -> None:
        self.state = state
        # Starts `migration` (leader side); None: plans never migrate (set when migration is wired).
        self.migrate: Callable[[Migration], Awaitable[Any]] | None = None
        self._reservations: list[_Reservation] = []
        self._ids = itertools.count(1)
        self._asked: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._tasks: set[asyncio.Task] = set()
        state.cluster.add_handler(PlacementMessage.PLACE, self._on_place)
        state.cluster.add_handler(PlacementMessage.PLACED, self._on_placed)

    async def place(self, model: str) -> Placement | None:
        """Where a new instance of `model` should start, by the leader's plan; None when the leader cannot
        be asked (no leader, no answer in time) or no node can take one now."""
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
        try:
            return Placement(str(reply["node"]), str(reply["http"]), Tier(reply["tier"]), float(reply["estimated_s"]))
        except (KeyError, ValueError, TypeError):
            return None  # "no node now", or a malformed answer

    def plan(self, model: str, *, asked_by: str) -> Placement | None:
        """The leader's decision (see the module doc) for a request that entered at node `asked_by`; starts
        the plan's migrations."""
        deployment = self.state.deployment(model)
        if deployment is None:
            return None
        now = time.monotonic()
        records = [r for r in self.state.instances() if r.is_live]
        num_records = collections.Counter((r.model, r.node_id) for r in records)
        self._reservations = [r for r in self._reservations if not r.is_expired(now)
                              and num_records[(r.model, r.node_id)] <= r.num_records_before]
        nodes = self.state.cluster_view()["nodes"]
        addresses = {n["id"]: n["http"] or "" for n in nodes}
        states = self._with_reservations(self.node_states(nodes), now)
        live = collections.Counter(r.node_id for r in records if r.model == model)
        live.update(r.node_id for r in self._reservations if r.model == model)
        if sum(live.values()) >= deployment.autoscaling.max_instances:
            # No new instance: the node with the fewest live instances of the model takes the request.
            node_id = min(live, key=lambda n: (live[n], n))
            return Placement(node_id, addresses.get(node_id, ""), Tier.DEVICE, 0.0)
        allow_migration = self.migrate is not None
        kind, num_bytes = deployment.engine_kind, deployment.checkpoint_bytes
        plan = plan_start(model, kind, num_bytes, states, allow_migration=allow_migration)
        if plan is None:
            return None
        if plan.node_id != asked_by:
            # The same planning with only the entry node able to take the start (the others still hold copies).
            only_entry = [s if s.id == asked_by else dataclasses.replace(s, num_free_slots=0, instances=())
                          for s in states]
            entry_plan = plan_start(model, kind, num_bytes, only_entry, allow_migration=allow_migration)
            relative, absolute = ENTRY_PREFERENCE
            if entry_plan is not None and entry_plan.estimated_s <= plan.estimated_s * (1 + relative) + absolute:
                plan = entry_plan
        node = next(s for s in states if s.id == plan.node_id)
        busy_s = 0.0 if plan.tier is Tier.DRAM else transfer_time_s(deployment.checkpoint_bytes, plan.tier,
                                                                     node.calibration)
        self._reservations.append(_Reservation(model, plan.node_id, plan.estimated_s, busy_s, now,
                                               num_records[(model, plan.node_id)]))
        for migration in plan.migrations:
            assert self.migrate is not None
            self._spawn(self._run_migration(migration))
        log.info("placed a new instance", extra={"model": model, "node": plan.node_id, "tier": plan.tier.value,
                                                 "estimated_s": round(plan.estimated_s, 3),
                                                 "migrations": len(plan.migrations), "evictions": len(plan.evictions)})
        return Placement(plan.node_id, addresses.get(plan.node_id, ""), plan.tier, plan.estimated_s)

    def node_states(self, nodes: list[dict[str, Any]] | None = None) -> list[NodeState]:
        """Every node of the cluster view (`nodes`, default: the current one) as the scheduler sees it."""
        if nodes is None:
            nodes = self.state.cluster_view()["nodes"]
        deployments = self.state.deployments()
        models_of: dict[str, set[str]] = {}
        in_place = set()
        for name, deployment in deployments.items():
            if reads_store(deployment.backend, deployment.checkpoint):
                models_of.setdefault(checkpoint_id(deployment.checkpoint), set()).add(name)
            else:
                in_place.add(name)
        return node_states(nodes, deployments, models_of=models_of, in_place=frozenset(in_place),
                           local_node_id=self.state.node_id)

    def _with_reservations(self, states: list[NodeState], now: float) -> list[NodeState]:
        """Reserved slots taken out of `num_free_slots`, their remaining estimates added to `pending_load_s`."""
        held = collections.Counter(r.node_id for r in self._reservations)
        queued: collections.defaultdict[str, float] = collections.defaultdict(float)
        for r in self._reservations:
            queued[r.node_id] += r.remaining_transfer_s(now)
        return [dataclasses.replace(s, num_free_slots=max(0, s.num_free_slots - held[s.id]),
                                    pending_load_s=s.pending_load_s + queued[s.id]) if s.id in held else s
                for s in states]

    async def _run_migration(self, migration: Migration) -> None:
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
            placement = self.plan(body["model"], asked_by=message.sender)
            if placement is not None:
                reply |= {"node": placement.node_id, "http": placement.http, "tier": placement.tier.value,
                          "estimated_s": placement.estimated_s}
        self.state.cluster.send(message.sender, PlacementMessage.PLACED, reply)

    def _on_placed(self, message: Message) -> None:
        body = message.body
        if not isinstance(body, dict) or type(body.get("id")) is not int:
            return
        future = self._asked.get(body["id"])
        if future is not None and not future.done() and message.sender == self.state.leader_id:
            future.set_result(body)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
