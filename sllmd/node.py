"""The parts of one running node, wired together. `daemon.py` owns when they start and stop."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sllmd.checkpoint.store import open_dram_cache, open_store
from sllmd.cluster.replicated import ReplicatedStateMachine
from sllmd.config import Config
from sllmd.deployments import CheckpointTokenizers, DeploymentService
from sllmd.metrics import Metrics
from sllmd.relay import READ_SLACK_S, Relay
from sllmd.router import Router
from sllmd.state.machine import Op
from sllmd.state.store import StateStore
from sllmd.worker.manager import EngineFactory, Worker, default_engine_factory
from sllmd.worker.migration import MigrationService
from sllmd.worker.slots import SlotPool, detect_slots, free_device_memory

log = logging.getLogger(__name__)


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

    @classmethod
    def open(cls, config: Config, engine_factory: EngineFactory = default_engine_factory) -> Node:
        """Open the data dir's state and detect devices; starts nothing yet."""
        store = StateStore(config.data_dir / "state")
        node_id = _node_id(store, config.server.node_id)
        state = ReplicatedStateMachine.open(config, store, node_id)
        metrics = Metrics()
        checkpoints = open_store(config.data_dir, config.store)
        worker = Worker(node_id, SlotPool(detect_slots(config.devices)), state, config.serving, metrics, checkpoints,
                        engine_factory, dram_cache=open_dram_cache(config.store))
        tokenizers = CheckpointTokenizers(checkpoints)
        relay = Relay(node_id, api_key=next(iter(config.server.api_keys), None),
                      read_timeout_s=config.serving.queue_timeout_s + READ_SLACK_S)
        router = Router(state, worker, tokenizers, metrics, relay)
        deployments = DeploymentService(state, worker, tokenizers, checkpoints)
        migrations = MigrationService(state.cluster, worker, config.serving)
        node = cls(config, node_id, store, state, worker, router, deployments, metrics, relay, migrations)
        state.on_applied = node._adopt
        state.soft_state = node._soft_state
        return node

    async def start(self) -> None:
        """Join the cluster, forget instances a previous run left behind, then adopt every deployment."""
        await self.state.start()
        num_stale = await self.state.propose({"op": Op.DELETE_NODE_INSTANCES, "node_id": self.node_id})
        if num_stale:
            log.info("cleared instances of a previous run", extra={"count": num_stale})
        for deployment in self.state.deployments().values():
            self.worker.sync_deployment(deployment)

    async def close(self) -> None:
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
        if command["op"] in (Op.DEPLOY, Op.UPDATE_DEPLOYMENT):
            self.worker.sync_deployment(result)
        elif command["op"] == Op.UNDEPLOY:
            return self.worker.remove_deployment(command["name"])
        elif command["op"] == Op.DELETE_NODE_INSTANCES and command["node_id"] == self.node_id and result:
            # The leader took us for dead (a partition outlasted the timeout): say again what we run.
            return self.worker.record_all()
        return None

    def _soft_state(self) -> dict[str, Any]:
        """Facts that change too often for the Raft log; sent to every node in NODE_STATUS: slots with
        their free memory, checkpoints in the DRAM cache (store ids), per-model queue and in-flight
        counts, and measured load bandwidth by source tier (GB/s)."""
        worker, slots = self.worker, self.worker.slots
        dram = worker.dram_cache
        return {
            "slots": [{"index": s.index, "device": s.device, "memory_bytes": s.memory_bytes,
                       "free_memory_bytes": free_device_memory(s) if slots.holder(s) is None else 0,
                       "instance": slots.holder(s)} for s in slots.slots],
            "free_slots": slots.num_free,
            "dram_cached": [Path(path).name for path, _ in dram.lru_keys()] if dram is not None else [],
            "queues": {name: {"waiting": runtime.num_waiting, "in_flight": runtime.num_in_flight()}
                       for name, runtime in worker.runtimes.items()},
            "load_gbps": {tier: round(gbps, 3) for tier, gbps in worker.measured_gbps.items()},
        }


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
