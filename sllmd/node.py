"""The parts of one running node, wired together. `daemon.py` owns when they start and stop."""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass, field

from sllmd.config import Config
from sllmd.deployments import DeploymentService
from sllmd.metrics import Metrics
from sllmd.router import Router, TokenizerCache
from sllmd.state.machine import LocalStateMachine, Op
from sllmd.state.store import StateStore
from sllmd.worker.manager import EngineFactory, Worker, default_engine_factory
from sllmd.worker.slots import SlotPool, detect_slots

log = logging.getLogger(__name__)


@dataclass
class Node:
    config: Config
    node_id: str
    store: StateStore
    state: LocalStateMachine
    worker: Worker
    router: Router
    deployments: DeploymentService
    metrics: Metrics
    started_at: float = field(default_factory=time.time)

    @classmethod
    def open(cls, config: Config, engine_factory: EngineFactory = default_engine_factory) -> Node:
        """Open the data dir's state and detect devices; starts nothing yet."""
        store = StateStore(config.data_dir / "state")
        node_id = _node_id(store, config.server.node_id)
        state = LocalStateMachine(store)
        metrics = Metrics()
        worker = Worker(node_id, SlotPool(detect_slots(config.devices)), state, config.serving, metrics, engine_factory)
        tokenizers = TokenizerCache()
        router = Router(state, worker, tokenizers, metrics)
        deployments = DeploymentService(state, worker, tokenizers)
        return cls(config, node_id, store, state, worker, router, deployments, metrics)

    async def start(self) -> None:
        """Forget instances a previous run left behind, then adopt every deployment."""
        num_stale = await self.state.propose({"op": Op.DELETE_NODE_INSTANCES, "node_id": self.node_id})
        if num_stale:
            log.info("cleared instances of a previous run", extra={"count": num_stale})
        for deployment in self.state.deployments().values():
            self.worker.sync_deployment(deployment)

    async def close(self) -> None:
        await self.worker.close()
        self.store.close()


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
