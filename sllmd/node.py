"""The parts of one running node, wired together. `daemon.py` owns when they start and stop."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

from sllmd.checkpoint.dram import open_dram_cache
from sllmd.checkpoint.errors import CheckpointError
from sllmd.checkpoint.store import checkpoint_id, open_store, peer_url, reads_store
from sllmd.cluster.membership import ALIVE_WINDOW_S
from sllmd.cluster.placer import Placer
from sllmd.cluster.replicated import ReplicatedStateMachine
from sllmd.config import Config
from sllmd.control.deployments import DeploymentService
from sllmd.engine import EngineResources
from sllmd.engine.vllm_pool import EnginePool
from sllmd.metrics import Metrics
from sllmd.scheduler.estimate import Calibration, DeviceKind
from sllmd.scheduler.placement import Migration, min_instances_share, plan_checkpoint_homes
from sllmd.scheduler.status import DeviceStatus, InstanceStatus, NodeStatus, QueueStatus
from sllmd.serving.pipeline import Router
from sllmd.serving.relay import READ_SLACK_S, Relay
from sllmd.serving.tokenizers import Tokenizers
from sllmd.state.machine import Op
from sllmd.state.models import Deployment
from sllmd.state.store import StateStore
from sllmd.tasks import TaskSet
from sllmd.types import Tier
from sllmd.worker.devices import DevicePool, detect_devices, read_topology
from sllmd.worker.lifecycle import EngineFactory, default_engine_factory
from sllmd.worker.manager import Worker
from sllmd.worker.migration.source import MigrationService
from sllmd.worker.warming import dram_cache_ids, page_cached_checkpoints

log = logging.getLogger(__name__)

MIN_INSTANCES_CHECK_S = 2.0
PEER_PROBE_POLL_S = 1.0  # how often a node without a live peer looks again for one to probe its link with


@dataclass
class Node:
    config: Config
    node_id: str
    store: StateStore
    state: ReplicatedStateMachine
    worker: Worker
    router: Router
    deployments: DeploymentService
    metrics: Metrics
    relay: Relay  # this node's HTTP client to the others (one session)
    migrations: MigrationService  # `await migrations.migrate(instance_id, to_node)`; `on_migrated` hook
    started_at: float = field(default_factory=time.time)
    _tasks: TaskSet = field(default_factory=TaskSet)  # background work (fetches, min_instances upkeep)
    _dead_node_ids: frozenset[str] = frozenset()  # members min_instances are not dealt to (_keep_min_instances)

    @classmethod
    def open(cls, config: Config, engine_factory: EngineFactory = default_engine_factory) -> Node:
        """Open the data dir's state and detect devices; starts nothing yet."""
        # The parts call back into the node (`node`, bound below), which needs them all: the callbacks are
        # passed at construction as closures over it, and run only once the node has started.
        node: Node
        store = StateStore(config.data_dir / "state")
        node_id = _node_id(store, config.server.node_id)
        state = ReplicatedStateMachine.open(config, store, node_id, on_applied=lambda c, r: node._adopt(c, r),
                                            soft_state=lambda: node._soft_state())
        metrics = Metrics()
        api_key = next(iter(config.server.api_keys), None)
        checkpoints = open_store(config.data_dir, config.store, api_key=api_key,
                                 peer_sources=lambda cid: node._peer_sources(cid),
                                 on_fetched=lambda tier, report: node.worker.on_fetched(tier, report),
                                 eviction_cost=lambda cid, size: node.worker.checkpoint_eviction_cost(cid, size))
        devices = detect_devices(config.devices)  # all CUDA devices or all CPU devices
        device = DeviceKind.CUDA if any(d.name.startswith("cuda") for d in devices) else DeviceKind.CPU
        resources = EngineResources(dram_cache=open_dram_cache(config.store),
                                    max_batch_size=config.serving.max_batch_size,
                                    max_batch_kv_bytes=int(config.serving.max_batch_kv_gb * (1 << 30)),
                                    vllm_pool=EnginePool(config.serving.vllm_parked_engines),
                                    vllm_dir=config.data_dir / "vllm")
        worker = Worker(node_id, DevicePool(devices, read_topology(devices)), state, config.serving, metrics,
                        checkpoints, engine_factory, resources=resources,
                        calibration=Calibration.defaults(device, peer_gbps=config.cluster.peer_link_gbps),
                        instances_elsewhere=lambda model: node._instances_elsewhere(model),
                        min_instances_here=lambda deployment: node._min_instances_here(deployment))
        tokenizers = Tokenizers(checkpoints)
        relay = Relay(node_id, api_key=api_key, read_timeout_s=config.serving.max_start_wait_s + READ_SLACK_S)
        migrations = MigrationService(state.cluster, worker, config.serving, on_migrated=lambda result: (
            worker.estimates.observe_migration(result.num_tokens, result.duration_s)))
        placer = Placer(state, migrate=lambda migration: node._migrate_for_plan(migration),
                        memory_need=lambda deployment: worker.estimates.memory_need(deployment).total_bytes)
        router = Router(state, worker, tokenizers, metrics, relay, placer)
        deployments = DeploymentService(state, worker, tokenizers, checkpoints,
                                        cluster_budgets=lambda: node._cluster_budgets())
        node = cls(config, node_id, store, state, worker, router, deployments, metrics, relay, migrations)
        return node

    async def start(self) -> None:
        """Join the cluster, forget instances a previous run left behind, then adopt every deployment."""
        await self.state.start()
        num_stale = await self.state.propose({"op": Op.DELETE_NODE_INSTANCES, "node_id": self.node_id})
        if num_stale:
            log.info("cleared instances of a previous run", extra={"count": num_stale})
        for deployment in self.state.deployments().values():
            self.worker.sync_deployment(deployment)
        self._tasks.spawn(self._keep_min_instances())

    async def close(self) -> None:
        await self._tasks.close()
        await self.router.placer.close()
        await self.relay.close()
        await self.migrations.destination.close()
        await self.worker.close()
        await self.worker.store.close()
        await self.state.close()
        self.store.close()

    def _adopt(self, command: dict[str, Any] | None, result: Any) -> Awaitable[Any] | None:
        """Every node's worker follows the committed deployments (None: a snapshot replaced them all)."""
        if command is None:
            current = self.state.deployments()
            for deployment in current.values():
                runtime = self.worker.runtimes.get(deployment.name)
                if runtime is None or runtime.deployment != deployment:
                    self.worker.sync_deployment(deployment)
            gone = [name for name in self.worker.runtimes if name not in current]
            return asyncio.gather(*(self.worker.remove_deployment(name) for name in gone))
        if command["op"] == Op.DEPLOY:
            self.worker.sync_deployment(result)
            self._fetch_if_home(result)
        elif command["op"] == Op.UPDATE_DEPLOYMENT:
            self.worker.sync_deployment(result)
        elif command["op"] == Op.UNDEPLOY:
            return self.worker.remove_deployment(command["name"])
        elif command["op"] == Op.DELETE_NODE_INSTANCES and command["node_id"] == self.node_id and result:
            # The leader took us for dead (a partition outlasted the timeout): say again what we run.
            return self.worker.record_all()
        return None

    def start_peer_link_probe(self) -> None:
        """In the background: once a peer is up, time a copy of its probe checkpoint (`worker.probe`) and
        make that this node's peer fetch bandwidth. Until then `cluster.peer_link_gbps` stands."""
        self._tasks.spawn(self._probe_peer_link())

    async def _probe_peer_link(self) -> None:
        from sllmd.worker.probe import probe_peer_fetch, with_probed_fetch

        while not (peers := [(p.id, p.http) for p in self.state.peers() if p.is_alive and p.http]):
            await asyncio.sleep(PEER_PROBE_POLL_S)
        peer_id, peer_http = peers[0]
        try:
            report = await probe_peer_fetch(self.config.data_dir, peer_http, self.worker.store.peer_settings)
        except (CheckpointError, OSError) as exc:
            log.warning("peer link probe failed; cluster.peer_link_gbps stands",
                        extra={"peer": peer_id, "error": repr(exc)})
            return
        estimates = self.worker.estimates
        estimates.set_calibration(with_probed_fetch(estimates.calibration, Tier.PEER, report))
        log.info("probed peer fetch bandwidth", extra={"peer": peer_id, "bytes": report.num_bytes,
                                                       "peer_gbps": round(report.gb_per_s, 3)})

    def _min_instances_here(self, deployment: Deployment) -> int:
        """This node's share of `deployment`'s min_instances: they are dealt over the cluster's members but
        those found dead (until liveness is known, e.g. just after a restart, every member counts)."""
        min_instances = deployment.autoscaling.min_instances
        if not min_instances:
            return 0
        members = (set(self.state.nodes()) | {self.node_id}) - self._dead_node_ids
        return min_instances_share(deployment.name, self.node_id, sorted(members), min_instances)

    async def _keep_min_instances(self) -> None:
        """Every MIN_INSTANCES_CHECK_S: which members are dead now, and each min_instances share kept."""
        await asyncio.sleep(ALIVE_WINDOW_S)  # let every live member be heard from once
        while True:
            self._dead_node_ids = frozenset(p.id for p in self.state.peers() if not p.is_alive)
            try:
                self.worker.keep_min_instances()
            except Exception:  # a bug here must not end the upkeep for good
                log.exception("keeping min_instances failed")
            await asyncio.sleep(MIN_INSTANCES_CHECK_S)

    def _instances_elsewhere(self, model: str) -> int:
        """Starting or ready instances of `model` on other nodes that are alive (a dead node's records stay
        until the leader drops them, and must not hold a replacement back)."""
        alive = {p.id for p in self.state.peers() if p.is_alive}
        return sum(1 for r in self.state.instances() if r.model == model and r.node_id != self.node_id
                   and r.node_id in alive and r.is_live)

    async def _migrate_for_plan(self, migration: Migration) -> None:
        """Carry out a migration of an instance on this node that the leader's placement planned."""
        result = await self.migrations.migrate(migration.instance_id, migration.to_node)
        log.info("planned migration done", extra={"instance": migration.instance_id, "outcome": result.outcome})

    def _fetch_if_home(self, deployment: Deployment) -> None:
        """Fetch a new deployment's checkpoint into this node's SSD store (from a peer or the repository) if
        this node is one of its `cluster.checkpoint_copies` homes, so cold starts rarely reach the repository;
        then, or at once where the store has it already, have the worker prestart its engine (see `prestart`)."""
        checkpoints = self.worker.store
        if not reads_store(deployment.backend, deployment.checkpoint):
            return
        if checkpoints.contains(checkpoint_id(deployment.checkpoint)):
            self.worker.prestart(deployment)
            return
        states = self.router.placer.node_states(self.state.cluster_view().nodes)
        homes = plan_checkpoint_homes(deployment.name, deployment.checkpoint_bytes, states,
                                      self.config.cluster.checkpoint_copies)
        if self.node_id not in homes:
            return

        async def fetch() -> None:
            try:
                await checkpoints.ensure(deployment.checkpoint)
            except Exception as exc:  # a cold start fetches it again, and reports the error to its request
                log.warning("could not fetch a checkpoint this node is a home of",
                            extra={"model": deployment.name, "error": repr(exc)})
                return
            self.worker.prestart(deployment)

        self._tasks.spawn(fetch())

    def _cluster_budgets(self) -> list[tuple[int, ...]]:
        """The device budgets of this node and of every alive peer that reported its status."""
        own = tuple(d.budget_bytes for d in self.worker.devices.devices)
        return [own, *(tuple(d.budget_bytes for d in peer.status.devices) for peer in self.state.peers()
                       if peer.is_alive and peer.status is not None)]

    def _soft_state(self) -> NodeStatus:
        """This node's status, sent to every node in NODE_STATUS: devices with their free memory, checkpoints in
        DRAM (store ids: the DRAM cache's, and vLLM deployments' wholly in the page cache), per-model queue and
        in-flight counts, the estimator constants, the estimated seconds of starts under way, every instance
        with its requests in flight, and the DRAM budget's bytes free for warming and free SSD-store bytes:
        the scheduler's view of this node."""
        worker, devices = self.worker, self.worker.devices
        in_dram_cache = dram_cache_ids(worker.dram_cache)
        in_page_cache = page_cached_checkpoints(worker.store, (r.deployment for r in worker.runtimes.values()))
        pool = worker.resources.vllm_pool
        kept, now = worker.kept_instances(), time.monotonic()
        return NodeStatus(
            devices=tuple(DeviceStatus(d.index, d.name, d.budget_bytes, devices.free_bytes(d))
                          for d in devices.devices),
            topology=devices.topology,
            dram_cached=(*in_dram_cache, *sorted(in_page_cache - set(in_dram_cache))),
            ssd_cached=tuple(entry.id for entry in worker.store.entries()),
            queues={name: QueueStatus(runtime.num_waiting, runtime.num_in_flight())
                    for name, runtime in worker.runtimes.items()},
            calibration=worker.estimates.calibration,
            pending_load_s=round(worker.pending_load_s(), 4),
            instances=tuple(InstanceStatus(i.id, name, i.state, i.in_flight, i.num_tokens,
                                           tuple(d.index for d in i.devices),
                                           i.memory_bytes, i in kept, round(runtime.request_rate.per_s(now), 6))
                            for name, runtime in worker.runtimes.items() for i in runtime.instances),
            free_dram_bytes=worker.warmer.free_bytes() if worker.warmer is not None else 0,
            free_ssd_bytes=max(0, worker.store.budget_bytes - worker.store.used_bytes),
            parked_models=tuple(worker.parked_models()),
            parked_host_bytes=pool.host_bytes if pool else 0,
        )

    def _peer_sources(self, cid: str) -> list[str]:
        """Base URLs of the alive peers whose SSD store holds checkpoint `cid`, in node-id order, then those that
        deployed a model of it (they had it when they did; their status may not say so yet: a home fetches
        the moment the deployment commits)."""
        peers = [p for p in self.state.peers() if p.is_alive and p.http]  # in id order
        origins = {d.origin_node for d in self.state.deployments().values() if checkpoint_id(d.checkpoint) == cid}
        holders = [p for p in peers if p.status is not None and cid in p.status.ssd_cached]
        holders += [p for p in peers if p.id in origins and p not in holders]
        return [peer_url(p.http, cid) for p in holders if p.http]


def _node_id(store: StateStore, configured: str) -> str:
    """The configured id, else the one kept in the store, else a new one (kept for next time)."""
    with store.write() as txn:
        kept = txn.get("meta", "node_id")
        if configured:
            if kept != configured:
                txn.put("meta", "node_id", configured)
            return configured
        if kept is None:
            kept = f"node-{secrets.token_hex(4)}"
            txn.put("meta", "node_id", kept)
        return kept
