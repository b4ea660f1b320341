"""Typed application state: one key per service the routes use."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from sllmd.cluster.replicated import ReplicatedStateMachine
    from sllmd.config import Config
    from sllmd.control.deployments import DeploymentService
    from sllmd.metrics import Metrics
    from sllmd.serving.pipeline import Router
    from sllmd.serving.relay import Relay
    from sllmd.worker.manager import Worker
    from sllmd.worker.migration.source import MigrationService

CONFIG: web.AppKey[Config] = web.AppKey("config")
STATE: web.AppKey[ReplicatedStateMachine] = web.AppKey("state")  # replicated deployments, nodes, cluster view
WORKER: web.AppKey[Worker] = web.AppKey("worker")  # this node's instances and checkpoint store
ROUTER: web.AppKey[Router] = web.AppKey("router")  # the serving pipeline
DEPLOYMENTS: web.AppKey[DeploymentService] = web.AppKey("deployments")
MIGRATIONS: web.AppKey[MigrationService] = web.AppKey("migrations")
RELAY: web.AppKey[Relay] = web.AppKey("relay")  # this node's client to the others
METRICS: web.AppKey[Metrics] = web.AppKey("metrics")
STARTED_AT: web.AppKey[float] = web.AppKey("started_at")  # time.time() when the node started
