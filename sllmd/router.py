"""Turns an OpenAI-level request into a token stream: resolve the model, tokenise, check the
context, get an instance (waiting through a cold start), generate, detokenise.

Everything that can be rejected is rejected in `prepare` or while opening the stream, before the
HTTP layer sends a status line, so errors keep their real status codes. `prepare` always runs on the
entry node (4xx are answered there); `open_stream` then serves locally or relays to the node that
`scheduler.placement` picks, and yields the same events either way. A relayed request is always
served where it lands (one hop, no loops). A node that failed a relay is avoided for SUSPECT_S.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, aclosing, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sllmd.engine.base import SamplingParams
from sllmd.errors import ModelNotFound
from sllmd.http.schemas import GenerationRequest
from sllmd.metrics import Metrics
from sllmd.placer import Placer
from sllmd.relay import Relay, RelayFailed
from sllmd.scheduler.placement import NodeView, choose_node
from sllmd.state.models import Deployment, InstanceState
from sllmd.textgen import TextStream, Tokenizer, resolve_max_tokens
from sllmd.worker.manager import ModelRuntime, Worker
from sllmd.worker.movable import MovableRequest

if TYPE_CHECKING:
    from sllmd.cluster.replicated import ReplicatedStateMachine

log = logging.getLogger(__name__)

SUSPECT_S = 5.0  # a node that failed a relay is left out of placement this long (liveness lags ~2 s)
MAX_RELAY_ATTEMPTS = 2  # a relay that could not connect is retried once, placed again without that node


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str


@dataclass(frozen=True, slots=True)
class Finished:
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int


StreamEvent = TextDelta | Finished


@dataclass(frozen=True, slots=True)
class PreparedRequest:
    request: GenerationRequest
    deployment: Deployment
    tokenizer: Tokenizer
    prompt_ids: list[int]
    params: SamplingParams
    arrived_at: float
    relayed_from: str | None = None  # the entry node's id when another node relayed this request here


class TokenizerCache:
    """One loaded tokenizer per checkpoint directory; loading runs off the event loop."""

    def __init__(self) -> None:
        self._loaded: dict[str, asyncio.Future[Tokenizer]] = {}

    async def get(self, checkpoint: str) -> Tokenizer:
        future = self._loaded.get(checkpoint)
        if future is None:
            loop = asyncio.get_running_loop()
            future = self._loaded[checkpoint] = loop.run_in_executor(None, Tokenizer.from_dir, Path(checkpoint))
        try:
            return await asyncio.shield(future)
        except Exception:
            self._loaded.pop(checkpoint, None)  # let a later call retry (the files may be fixed)
            raise

    def forget(self, checkpoint: str) -> None:
        self._loaded.pop(checkpoint, None)


class Router:
    def __init__(self, state: ReplicatedStateMachine, worker: Worker, tokenizers: TokenizerCache,
                 metrics: Metrics, relay: Relay, placer: Placer) -> None:
        self.state = state
        self.worker = worker
        self.tokenizers = tokenizers
        self.metrics = metrics
        self.relay = relay
        self.placer = placer
        self._suspect_until: dict[str, float] = {}  # node id -> time.monotonic() until which to avoid it
        self._num_relayed: collections.Counter[str] = collections.Counter()  # node id -> relays in flight

    async def prepare(self, request: GenerationRequest, *, relayed_from: str | None = None) -> PreparedRequest:
        arrived_at = time.monotonic()
        deployment = self.state.deployment(request.model)
        if deployment is None:
            raise ModelNotFound(request.model)
        tokenizer = await self.tokenizers.get(deployment.checkpoint)
        if request.messages is not None:
            prompt_ids, param = tokenizer.render_chat(request.messages), "messages"
        elif isinstance(request.prompt, str):
            prompt_ids, param = tokenizer.encode(request.prompt), "prompt"
        else:
            prompt_ids, param = list(request.prompt or []), "prompt"
            tokenizer.check_prompt_ids(prompt_ids)
        max_tokens = resolve_max_tokens(len(prompt_ids), request.max_tokens, deployment.context_length, param=param)
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            # Fixed at admission, so a sampled request moved mid-stream draws the same tokens elsewhere
            # (greedy choice needs no seed).
            seed=request.seed if request.seed is not None or request.temperature == 0 else secrets.randbits(63),
            stop_token_ids=tokenizer.eos_token_ids,
        )
        return PreparedRequest(request, deployment, tokenizer, prompt_ids, params, arrived_at, relayed_from)

    @asynccontextmanager
    async def open_stream(self, prepared: PreparedRequest) -> AsyncIterator[AsyncIterator[StreamEvent]]:
        """Holds an instance (here or, through a relay, on the serving node) for the request while the
        caller consumes the yielded event stream. Errors raised on entry come before any output."""
        if self.worker.warmer is not None:
            self.worker.warmer.note_request(prepared.deployment.name)
        async with AsyncExitStack() as stack:
            # A relayed request is always served here: no relay loops.
            for _ in range(MAX_RELAY_ATTEMPTS if prepared.relayed_from is None else 0):
                target = await self.place(prepared.deployment)
                if target is None or target[0] == self.worker.node_id:
                    break
                try:
                    events = await stack.enter_async_context(self._relayed(*target, prepared))
                except RelayFailed as exc:
                    if not exc.is_connect:
                        raise
                    log.warning("relay could not connect; placing again", extra={"node": target[0]})
                    continue
                yield events
                return
            events = await stack.enter_async_context(self._local(prepared))
            yield events

    async def place(self, deployment: Deployment) -> tuple[str, str] | None:
        """(node id, HTTP address) of the node that should serve a request for `deployment` now, or None for
        "here, queued". Serving instances are found from the cluster's state here (`choose_node`); a new
        instance — none anywhere, or every one saturated with room for more — is placed by the leader's
        startup-time plan (`Placer`), and by `choose_node`'s local rules if the leader cannot answer."""
        model = deployment.name
        runtime = self.worker.runtimes.get(model)
        if runtime is not None and runtime.ready() and not self._is_saturated_here(runtime):
            return self.worker.node_id, ""  # rule 1, without reading the cluster's state
        local = self._local_view(model)
        now = time.monotonic()
        live = [r for r in self.state.instances() if r.model == model]
        counts = collections.Counter((r.node_id, r.state) for r in live)
        views, addresses = {local.id: local}, {self.worker.node_id: ""}
        for node in self.state.cluster_view(include_own_soft_state=False)["nodes"]:
            node_id = node["id"]
            if node_id == self.worker.node_id or not node["http"]:
                continue
            addresses[node_id] = node["http"]
            queue = node["queues"].get(model) or {}
            reported = sum(v for v in queue.values() if isinstance(v, int)) if isinstance(queue, dict) else 0
            views[node_id] = NodeView(
                node_id, is_alive=node["alive"] and self._suspect_until.get(node_id, 0.0) <= now,
                num_free_slots=node["free_slots"] or 0,
                ready_instances_of_model=counts[(node_id, InstanceState.READY)],
                starting_instances_of_model=counts[(node_id, InstanceState.STARTING)],
                in_flight_hint=max(self._num_relayed[node_id], reported))
        chosen = choose_node(model, local_node_id=self.worker.node_id, nodes=list(views.values()))
        view = views.get(chosen) if chosen is not None else None
        policy = deployment.autoscaling
        is_saturated = view is not None and view.ready_instances_of_model > 0 and (
            view.in_flight_hint >= view.ready_instances_of_model * policy.target_concurrency
            and len(live) < policy.max_instances)
        if view is None or is_saturated or not (view.ready_instances_of_model or view.starting_instances_of_model):
            placement = await self.placer.place(model)
            if placement is not None and placement.node_id in addresses and views[placement.node_id].is_alive:
                return placement.node_id, addresses[placement.node_id]
        return None if chosen is None else (chosen, addresses[chosen])

    def _is_saturated_here(self, runtime: ModelRuntime) -> bool:
        """Every local instance at target concurrency and no local room for another (no free slot, nothing
        idle to evict): then more instances must come from elsewhere, which is the leader's call."""
        policy = runtime.deployment.autoscaling
        return (runtime.demand() >= len(runtime.ready()) * policy.target_concurrency
                and len(runtime.instances) < policy.max_instances and self.worker.slots.num_free == 0
                and not self.worker.eviction_candidates(exclude=runtime))

    def _local_view(self, model: str) -> NodeView:
        """This node from its worker (exact, no replication lag)."""
        runtime = self.worker.runtimes.get(model)
        num_evictable = len(self.worker.eviction_candidates(exclude=runtime))
        return NodeView(
            self.worker.node_id, is_alive=True, num_free_slots=self.worker.slots.num_free,
            ready_instances_of_model=len(runtime.ready()) if runtime else 0,
            starting_instances_of_model=runtime.num_starting() if runtime else 0,
            in_flight_hint=runtime.demand() if runtime else 0, num_evictable=num_evictable)

    @asynccontextmanager
    async def _relayed(self, node_id: str, address: str, prepared: PreparedRequest
                       ) -> AsyncIterator[AsyncIterator[StreamEvent]]:
        log.debug("relaying", extra={"model": prepared.deployment.name, "node": node_id, "http": address})
        self._num_relayed[node_id] += 1
        try:
            async with (
                self.relay.open(address, prepared) as events,
                aclosing(self._watch(node_id, events)) as watched,
            ):
                yield watched
        except RelayFailed:
            self._suspect(node_id)
            raise
        finally:
            self._num_relayed[node_id] -= 1
            if not self._num_relayed[node_id]:
                del self._num_relayed[node_id]

    async def _watch(self, node_id: str, events: AsyncIterator[StreamEvent]) -> AsyncIterator[StreamEvent]:
        """Passes the relayed events on; a stream that broke off marks its node suspect (the HTTP layer
        turns the error into an SSE error event, so it never reaches `_relayed`)."""
        try:
            async for event in events:
                yield event
        except RelayFailed:
            self._suspect(node_id)
            raise

    def _suspect(self, node_id: str) -> None:
        now = time.monotonic()
        if self._suspect_until.get(node_id, 0.0) <= now:
            log.warning("relay to node failed; avoiding it for a while", extra={"node": node_id, "for_s": SUSPECT_S})
        self._suspect_until[node_id] = now + SUSPECT_S

    @asynccontextmanager
    async def _local(self, prepared: PreparedRequest) -> AsyncIterator[AsyncIterator[StreamEvent]]:
        async with self.worker.lease(prepared.deployment.name) as instance:
            request = MovableRequest(instance, prepared.prompt_ids, prepared.params)
            try:
                async with aclosing(self._generate(prepared, request)) as events:
                    yield events
            finally:
                request.close()

    async def _generate(self, prepared: PreparedRequest, request: MovableRequest) -> AsyncIterator[StreamEvent]:
        """Detokenises the request's tokens, which come from the local engine or, once a migration
        moved the request, from its destination (see `sllmd.worker.movable`)."""
        model = prepared.deployment.name
        text = TextStream(prepared.tokenizer, prepared.request.stop)
        num_generated = 0
        is_eos = False
        self.metrics.tokens.labels(model, "in").inc(len(prepared.prompt_ids))
        async with aclosing(request.stream()) as tokens:
            async for token in tokens:
                if num_generated == 0:
                    self.metrics.ttft.labels(model).observe(time.monotonic() - prepared.arrived_at)
                num_generated += 1
                is_eos = token in prepared.params.stop_token_ids
                delta = text.push(token)
                if delta:
                    yield TextDelta(delta)
                if text.is_done:
                    break
        self.metrics.tokens.labels(model, "out").inc(num_generated)
        if not text.is_done:
            tail = text.finish()
            if tail:
                yield TextDelta(tail)
        finish_reason = "stop" if text.finish_reason == "stop" or is_eos else "length"
        self.metrics.latency.labels(model).observe(time.monotonic() - prepared.arrived_at)
        yield Finished(finish_reason, len(prepared.prompt_ids), num_generated)
