"""Admin routes: deploy, inspect, update and remove models; inspect the cluster."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Sequence
from typing import Any

from aiohttp import web

from sllmd.checkpoint.store import checkpoint_id, reads_store
from sllmd.control.deployments import DeploySpec
from sllmd.engine.base import AUTO_DTYPE, DTYPE_ALIASES, SERVING_DTYPES, START_MODES, serving_dtype
from sllmd.errors import EngineFailed, InvalidRequest, ModelNotFound
from sllmd.http.keys import CONFIG, DEPLOYMENTS, MIGRATIONS, RELAY, STATE, WORKER
from sllmd.http.schemas import parse_json_object
from sllmd.scheduler.memory import MemoryNeed
from sllmd.scheduler.status import PeerInfo
from sllmd.serving.relay import RelayFailed
from sllmd.state.machine import Op
from sllmd.state.models import Deployment, InstanceRecord, InstanceState
from sllmd.types import AutoscalingPolicy, Backend
from sllmd.worker.devices import engine_device
from sllmd.worker.instance import Instance, ModelRuntime
from sllmd.worker.manager import Worker

DEPLOY_FIELDS = frozenset({"name", "checkpoint", "backend", "autoscaling", "dtype", "max_model_len", "start_mode",
                           "num_gpus"})
MAX_NUM_GPUS = 64
POLICY_TYPES: dict[str, tuple[type, ...]] = {
    "min_instances": (int,),
    "max_instances": (int,),
    "target_concurrency": (int,),
    "keep_alive_s": (int, float),
}


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_post("/admin/models", deploy)
    router.add_get("/admin/models", list_models)
    router.add_get("/admin/models/{name}", get_model)
    router.add_patch("/admin/models/{name}", patch_model)
    router.add_delete("/admin/models/{name}", delete_model)
    router.add_get("/admin/instances", list_instances)
    router.add_get("/admin/cluster", cluster)
    router.add_delete("/admin/cluster/nodes/{id}", remove_node)
    router.add_post("/admin/instances/{id}/migrate", migrate_instance)


FORWARDED_HEADER = "X-Sllmd-Forwarded"  # a forwarded admin call is answered where it lands (no loops)


def parse_policy(raw: Any, base: AutoscalingPolicy) -> AutoscalingPolicy:
    """`base` with the fields present in `raw` replaced; every field type- and range-checked."""
    if not isinstance(raw, dict):
        raise InvalidRequest("autoscaling must be an object", param="autoscaling")
    changes = {}
    for key, value in raw.items():
        if key not in POLICY_TYPES:
            raise InvalidRequest(f"unknown autoscaling field '{key}'", param=f"autoscaling.{key}")
        if isinstance(value, bool) or not isinstance(value, POLICY_TYPES[key]):
            raise InvalidRequest(f"autoscaling.{key} must be a number", param=f"autoscaling.{key}")
        changes[key] = value
    policy = dataclasses.replace(base, **changes)
    problems = policy.problems()
    if problems:
        key, message = problems[0]
        raise InvalidRequest(f"autoscaling.{key} {message}", param=f"autoscaling.{key}")
    return policy


def parse_deploy(body: dict[str, Any], defaults: AutoscalingPolicy) -> DeploySpec:
    unknown = set(body) - DEPLOY_FIELDS
    if unknown:
        raise InvalidRequest(f"unknown field '{sorted(unknown)[0]}'", param=sorted(unknown)[0])
    name = body.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidRequest("name is required and must be a non-empty string", param="name")
    checkpoint = body.get("checkpoint")
    if not isinstance(checkpoint, str) or not checkpoint:
        raise InvalidRequest("checkpoint is required: a Hugging Face Hub id (org/model[@revision]), an absolute "
                             "path of a Hugging Face or sllmd checkpoint directory or of a .gguf file, or an "
                             "http(s):// URL of an sllmd checkpoint", param="checkpoint")
    backend_name = body.get("backend", Backend.TRANSFORMERS.value)
    if backend_name not in {b.value for b in Backend}:
        choices = ", ".join(b.value for b in Backend)
        raise InvalidRequest(f"backend must be one of: {choices}", param="backend")
    policy = parse_policy(body.get("autoscaling", {}), defaults)
    dtype = body.get("dtype", AUTO_DTYPE)
    if not isinstance(dtype, str) or serving_dtype(dtype) is None:
        choices = ", ".join([AUTO_DTYPE, *SERVING_DTYPES, *DTYPE_ALIASES])
        raise InvalidRequest(f"dtype must be one of: {choices}", param="dtype", code="unsupported_dtype")
    max_model_len = body.get("max_model_len")
    if max_model_len is not None and (isinstance(max_model_len, bool) or not isinstance(max_model_len, int)
                                      or max_model_len < 2):
        raise InvalidRequest("max_model_len must be an integer >= 2 (tokens of prompt + completion)",
                             param="max_model_len")
    start_mode = body.get("start_mode", START_MODES[0])
    if start_mode not in START_MODES:
        raise InvalidRequest(f"start_mode must be one of: {', '.join(START_MODES)}", param="start_mode")
    if start_mode != START_MODES[0] and backend_name != Backend.VLLM.value:
        raise InvalidRequest("start_mode applies to backend vllm only (the others always start eagerly)",
                             param="start_mode")
    num_gpus = body.get("num_gpus", 1)
    if isinstance(num_gpus, bool) or not isinstance(num_gpus, int) or not 1 <= num_gpus <= MAX_NUM_GPUS:
        raise InvalidRequest(f"num_gpus must be an integer in 1..{MAX_NUM_GPUS} (the devices each instance spans)",
                             param="num_gpus")
    if num_gpus > 1 and backend_name == Backend.TRANSFORMERS.value:
        raise InvalidRequest("backend transformers runs each instance on one device; num_gpus > 1 (tensor "
                             "parallelism) needs backend vllm", param="num_gpus", code="unsupported_num_gpus")
    return DeploySpec(name, checkpoint, Backend(backend_name), policy, serving_dtype(dtype) or AUTO_DTYPE,
                      max_model_len, start_mode, num_gpus)


def deployment_view(worker: Worker, deployment: Deployment, nodes: Sequence[PeerInfo]) -> dict[str, Any]:
    """A deployment, the nodes holding its checkpoint (`checkpoint_tiers`, from `nodes`: the cluster view's)
    and this node's instances of it (each node reports its own; `GET /admin/instances` lists every node's)."""
    view = deployment.to_wire() | {"status": "deployed", "max_model_len": deployment.context_length,
                                   "checkpoint_tiers": checkpoint_tiers(deployment, nodes),
                                   "memory": _memory_view(worker.estimates.memory_need(deployment))}
    runtime = worker.runtimes.get(deployment.name)
    now = time.monotonic()
    # "progress": how far a starting instance's start has come (`StartView`); None once it is ready.
    view["instances"] = [instance_view(worker, runtime, i, now) | {"progress": _start_progress(i)}
                         for i in runtime.instances] if runtime else []
    view["queued"] = runtime.num_waiting if runtime else 0
    return view


def _memory_view(need: MemoryNeed) -> dict[str, int]:
    """What one instance asks of a device on this node, by what for."""
    return dataclasses.asdict(need) | {"total_bytes": need.total_bytes}


def _start_progress(instance: Instance) -> dict[str, Any] | None:
    return instance.progress.view().to_wire() if instance.state is InstanceState.STARTING else None


def checkpoint_tiers(deployment: Deployment, nodes: Sequence[PeerInfo]) -> dict[str, list[str]]:
    """The ids of the nodes whose DRAM cache (or page cache, whole) and whose SSD store hold `deployment`'s
    checkpoint, as their latest statuses say: {"dram": [...], "ssd": [...]}, in node id order. Both are empty
    for a deployment read where it is (the dummy backend on a local directory)."""
    tiers: dict[str, list[str]] = {"dram": [], "ssd": []}
    if not reads_store(deployment.backend, deployment.checkpoint):
        return tiers
    stored_as = checkpoint_id(deployment.checkpoint)
    for node in nodes:
        if node.status is not None:
            if stored_as in node.status.dram_cached:
                tiers["dram"].append(node.id)
            if stored_as in node.status.ssd_cached:
                tiers["ssd"].append(node.id)
    return tiers


def instance_view(worker: Worker, runtime: ModelRuntime, instance: Instance, now: float) -> dict[str, Any]:
    """One of this node's instances; `now` is time.monotonic(). `idle_s`: seconds since its last request
    ended (since it was created, if it has served none); None unless it is ready with no request in flight.
    `unload_in_s`: the seconds its keep-alive leaves it; None unless it is idle and spare (not one of this
    node's share of min_instances). `memory_bytes`: what it holds on its device."""
    is_idle = instance.state is InstanceState.READY and instance.in_flight == 0
    idle_s = now - instance.idle_since if is_idle else None
    is_spare = len(runtime.instances) > worker.min_instances_here(runtime.deployment)
    unload_in_s = None
    if idle_s is not None and is_spare:
        unload_in_s = max(0.0, runtime.deployment.autoscaling.keep_alive_s - idle_s)
    report = instance.load_report
    return {
        "id": instance.id,
        "model": runtime.deployment.name,
        "node_id": worker.node_id,
        "device": engine_device(instance.devices),
        "memory_bytes": instance.memory_bytes,
        "state": instance.state.value,
        "in_flight": instance.in_flight,
        "num_tokens": instance.num_tokens,
        "started_at": instance.started_at,
        "idle_s": idle_s,
        "unload_in_s": unload_in_s,
        "load": dataclasses.asdict(report) if report else None,
    }


def remote_instance_views(records: Iterable[InstanceRecord], nodes: Sequence[PeerInfo], local_node_id: str
                          ) -> list[dict[str, Any]]:
    """The live instances of the nodes other than `local_node_id`, as this node knows them: each shows up in
    the replicated records or in its node's latest status, whichever has it first (records are written in the
    background; while the cluster has no leader only statuses arrive). The status's state and requests win.
    A field neither tells is None: always `idle_s`, `unload_in_s` and `load`; `device` and `started_at` while
    only the status has it; `in_flight`, `num_tokens` and `memory_bytes` while only the record has it."""
    views: dict[str, dict[str, Any]] = {}
    for record in records:
        if record.is_live and record.node_id != local_node_id:
            views[record.id] = _unknown_instance(record.id, record.model, record.node_id) | {
                "device": record.device, "state": record.state.value, "started_at": record.started_at}
    for node in nodes:
        if node.id == local_node_id or node.status is None:
            continue
        for status in node.status.instances:
            if status.state is InstanceState.STOPPING:
                continue
            view = views.setdefault(status.id, _unknown_instance(status.id, status.model, node.id))
            view |= {"node_id": node.id, "state": status.state.value, "in_flight": status.num_requests,
                     "num_tokens": status.num_tokens, "memory_bytes": status.memory_bytes}
    return list(views.values())


def _unknown_instance(instance_id: str, model: str, node_id: str) -> dict[str, Any]:
    """An instance view with only its identity known (the keys and order of `instance_view`)."""
    return {"id": instance_id, "model": model, "node_id": node_id, "device": None, "memory_bytes": None,
            "state": None, "in_flight": None, "num_tokens": None, "started_at": None, "idle_s": None,
            "unload_in_s": None, "load": None}


def _view(request: web.Request, deployment: Deployment) -> dict[str, Any]:
    return deployment_view(request.app[WORKER], deployment, request.app[STATE].cluster_view().nodes)


def _deployment(request: web.Request, name: str) -> Deployment:
    deployment = request.app[STATE].deployment(name)
    if deployment is None:
        raise ModelNotFound(name)
    return deployment


async def deploy(request: web.Request) -> web.Response:
    spec = parse_deploy(parse_json_object(await request.read()), request.app[CONFIG].autoscaling)
    deployment = await request.app[DEPLOYMENTS].deploy(spec)
    return web.json_response(_view(request, deployment), status=201)


async def list_models(request: web.Request) -> web.Response:
    """Every deployment, then those this node is still preparing (status "deploying", with progress)."""
    deployed = request.app[STATE].deployments()
    nodes = request.app[STATE].cluster_view().nodes
    views = [deployment_view(request.app[WORKER], d, nodes) for d in deployed.values()]
    views += [p.to_wire() for name, p in request.app[DEPLOYMENTS].preparing.items() if name not in deployed]
    return web.json_response({"models": views})


async def get_model(request: web.Request) -> web.Response:
    """A deployment; or, while this node prepares it, its progress (status "deploying"): phase "download" and
    "convert" count bytes (`fraction` of `bytes_total`)."""
    name = request.match_info["name"]
    preparing = request.app[DEPLOYMENTS].preparing.get(name)
    if preparing is not None and request.app[STATE].deployment(name) is None:
        return web.json_response(preparing.to_wire())
    return web.json_response(_view(request, _deployment(request, name)))


async def patch_model(request: web.Request) -> web.Response:
    body = parse_json_object(await request.read())
    current = _deployment(request, request.match_info["name"])
    unknown = set(body) - {"autoscaling"}
    if unknown:
        field = sorted(unknown)[0]
        raise InvalidRequest(f"'{field}' cannot be changed; only autoscaling can (redeploy to change others)",
                             param=field)
    policy = parse_policy(body.get("autoscaling", {}), current.autoscaling)
    updated = await request.app[DEPLOYMENTS].update_autoscaling(current.name, policy)
    return web.json_response(_view(request, updated))


async def delete_model(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    await request.app[DEPLOYMENTS].remove(name)
    return web.json_response({"deleted": name})


async def list_instances(request: web.Request) -> web.Response:
    """Every live instance in the cluster, ordered by model, node and id: this node's as it knows them
    (`instance_view`), the other nodes' from the replicated records and their statuses
    (`remote_instance_views`). One call answers for the whole cluster; no other node is asked."""
    state, worker = request.app[STATE], request.app[WORKER]
    now = time.monotonic()
    views = [instance_view(worker, runtime, instance, now)
             for runtime in worker.runtimes.values() for instance in runtime.instances]
    views += remote_instance_views(state.instances(), state.cluster_view().nodes, worker.node_id)
    views.sort(key=lambda view: (view["model"], view["node_id"], view["id"]))
    return web.json_response({"instances": views})


async def cluster(request: web.Request) -> web.Response:
    """The cluster as this node sees it: leader, term, and every member with its addresses, role, liveness
    (recent messages) and, once known, its status fields (`NodeStatus.to_wire`: slots, caches, queues,
    calibration, instances; this node's exact, others' from their last status message)."""
    view = request.app[STATE].cluster_view()
    nodes = [{"id": n.id, "http": n.http, "peer": n.peer, "role": n.role, "alive": n.is_alive, "voter": n.is_voter,
              "last_seen_s": n.last_seen_s, **(n.status.to_wire() if n.status is not None else {})}
             for n in view.nodes]
    return web.json_response({"leader": view.leader_id, "term": view.term, "nodes": nodes})


async def remove_node(request: web.Request) -> web.Response:
    """Remove a member for good: it leaves the voters, its record and instance records are deleted (one
    REMOVE_NODE through the replicated state machine). 404 node_not_found if it is not a member. To come
    back, the node starts on an empty data dir with --join."""
    node_id = request.match_info["id"]
    num_instances = await request.app[STATE].propose({"op": Op.REMOVE_NODE, "node_id": node_id})
    return web.json_response({"removed": node_id, "instances_deleted": num_instances})


async def migrate_instance(request: web.Request) -> web.Response:
    """Move a running instance's requests to another node: {"to": NODE_ID}. Any node takes the call and
    forwards it to the node running the instance; 200 with the MigrationResult (outcome "moved" or
    "aborted"), 404 instance_not_found, 400 for a bad body or unknown node, 409 when it cannot start."""
    state = request.app[STATE]
    instance_id = request.match_info["id"]
    body = parse_json_object(await request.read())
    unknown = set(body) - {"to"}
    if unknown:
        raise InvalidRequest(f"unknown field '{sorted(unknown)[0]}'", param=sorted(unknown)[0])
    to_node = body.get("to")
    if not isinstance(to_node, str) or not to_node:
        raise InvalidRequest("to is required: the id of the node to move the instance to", param="to")
    nodes = state.nodes()
    if to_node not in nodes:
        raise InvalidRequest(f"no node '{to_node}' in the cluster", param="to", code="unknown_node")
    owner = next((r.node_id for r in state.instances() if r.id == instance_id), None)
    if owner is None or owner == state.node_id or request.headers.get(FORWARDED_HEADER):
        result = await request.app[MIGRATIONS].migrate(instance_id, to_node)
        return web.json_response(result.to_json())
    return await _forward(request, nodes[owner].http, body)


async def _forward(request: web.Request, address: str, body: dict[str, Any]) -> web.Response:
    headers = {FORWARDED_HEADER: request.app[STATE].node_id}
    if "Authorization" in request.headers:
        headers["Authorization"] = request.headers["Authorization"]
    try:
        status, answer = await request.app[RELAY].call(address, request.path, body, headers)
    except RelayFailed as exc:
        raise EngineFailed(f"the node at {address} running the instance did not answer: {exc}",
                           code="forward_failed") from None
    return web.json_response(answer, status=status)
