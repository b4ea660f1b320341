"""Turns an OpenAI-level request into a token stream: resolve the model, tokenise, check the
context, get an instance (waiting through a cold start), generate, detokenise.

Everything that can be rejected is rejected in `prepare` or while opening the stream, before the
HTTP layer sends a status line, so errors keep their real status codes. `prepare` always runs on the
entry node (4xx are answered there); `open_stream` then takes token ids from a local instance or from
the node that `scheduler.placement` picks (through `sllmd.serving.relay`), and `_generate` turns them into
text the same way for both sources: stop strings, finish reason and usage are decided on the entry
node. The serving node of a relayed request only generates ids (`open_tokens`; one hop, no loops). A
node that failed a relay is avoided for SUSPECT_S.

Resuming (`serving.resume_on_node_failure`, off by default): when a relayed token stream breaks off
(the serving node died or became unreachable, before or after its first token), the entry node places
the request again and continues from the tokens it already has: prompt + those tokens, `max_tokens`
less by their number, the same seed. Sampling is keyed by (seed, absolute position) and every request
that samples gets a seed at admission, so the client's one SSE stream carries exactly the text of an
uninterrupted run (given equal logits: the same model and dtype on both nodes). At most MAX_RESUMES
times per request; otherwise, or when no node can take it, the stream ends with an error event. A
request served on the entry node itself cannot be resumed: when that node dies, the client's
connection dies with it.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, aclosing, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sllmd.control.placer import Placer
from sllmd.engine.base import SamplingParams
from sllmd.errors import ModelNotFound
from sllmd.http.schemas import GenerationRequest
from sllmd.metrics import Metrics
from sllmd.scheduler.placement import NodeView, choose_node
from sllmd.serving.relay import Relay, RelayFailed
from sllmd.serving.textgen import TextStream, Tokenizer, resolve_max_tokens
from sllmd.state.models import Deployment, InstanceState
from sllmd.worker.manager import ModelRuntime, Worker
from sllmd.worker.migration.movable import MovableRequest

if TYPE_CHECKING:
    from sllmd.cluster.replicated import ReplicatedStateMachine

log = logging.getLogger(__name__)

SUSPECT_S = 5.0  # a node that failed a relay is left out of placement this long (liveness lags ~2 s)
MAX_RELAY_ATTEMPTS = 2  # a relay that could not connect is retried once, placed again without that node
MAX_RESUMES = 2  # times one request continues on another node after its serving node failed


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

    async def prepare(self, request: GenerationRequest) -> PreparedRequest:
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
        return PreparedRequest(request, deployment, tokenizer, prompt_ids, params, arrived_at)

    @asynccontextmanager
    async def open_stream(self, prepared: PreparedRequest) -> AsyncIterator[AsyncIterator[StreamEvent]]:
        """Holds a token source for the request (an instance here or, through a relay, on the serving
        node) while the caller consumes the yielded text events. Errors raised on entry come before any
        output; a relayed source that breaks off mid-stream is resumed elsewhere when configured."""
        if self.worker.warmer is not None:
            self.worker.warmer.note_request(prepared.deployment.name)
        async with AsyncExitStack() as source:
            tokens = await source.enter_async_context(self._source(prepared, ()))
            async with aclosing(self._generate(prepared, self._resuming(prepared, tokens, source))) as events:
                yield events

    @asynccontextmanager
    async def open_tokens(self, prepared: PreparedRequest) -> AsyncIterator[AsyncIterator[int]]:
        """A request another node relayed here: its generated token ids, from an instance on this node
        (the entry node detokenises them)."""
        if self.worker.warmer is not None:
            self.worker.warmer.note_request(prepared.deployment.name)
        async with self._local(prepared, ()) as tokens:
            yield tokens

    @asynccontextmanager
    async def _source(self, prepared: PreparedRequest, generated: Sequence[int]) -> AsyncIterator[AsyncIterator[int]]:
        """The request's tokens after `generated`, from the node placement picks now. A relay that
        could not connect is placed again; errors raised on entry come before any token."""
        async with AsyncExitStack() as stack:
            for _ in range(MAX_RELAY_ATTEMPTS):
                target = await self.place(prepared.deployment)
                if target is None or target[0] == self.worker.node_id:
                    break
                try:
                    tokens = await stack.enter_async_context(self._relayed(*target, prepared, generated))
                except RelayFailed as exc:
                    if not exc.is_connect:
                        raise
                    log.warning("relay could not connect; placing again", extra={"node": target[0]})
                    continue
                yield tokens
                return
            yield await stack.enter_async_context(self._local(prepared, generated))

    async def _resuming(self, prepared: PreparedRequest, tokens: AsyncIterator[int], source: AsyncExitStack
                        ) -> AsyncIterator[int]:
        """`tokens` (held open by `source`), then, each time a relayed source breaks off (or a new one
        cannot be opened) and resuming is on, those of a source placed now that continues from the
        tokens so far."""
        generated: list[int] = []
        for num_resumes in range(MAX_RESUMES + 1):
            try:
                if num_resumes:
                    await source.aclose()  # the broken relay
                    tokens = await source.enter_async_context(self._source(prepared, tuple(generated)))
                async for token in tokens:
                    generated.append(token)
                    yield token
                return
            except RelayFailed as failure:
                if not self.worker.serving.resume_on_node_failure or num_resumes == MAX_RESUMES:
                    raise
                if len(generated) == prepared.params.max_tokens or (
                        generated and generated[-1] in prepared.params.stop_token_ids):
                    return  # every token arrived, only the end event was lost
                log.warning("relayed stream broke off; resuming it elsewhere", extra={
                    "model": prepared.deployment.name, "num_tokens": len(generated), "error": failure.message})

    async def place(self, deployment: Deployment) -> tuple[str, str] | None:
        """(node id, HTTP address) of the node that should serve a request for `deployment` now, or None for
        "here, queued". Serving instances are found from the cluster's state here (`choose_node`); a new
        instance — none anywhere, or every one saturated with room for more — is placed by the leader's
        startup-time plan (`Placer`), and by `choose_node`'s local rules if the leader cannot answer."""
        model = deployment.name
        runtime = self.worker.runtimes.get(model)
        if runtime is not None and runtime.ready() and not self._wants_another_instance(runtime):
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

    def _wants_another_instance(self, runtime: ModelRuntime) -> bool:
        """Every local instance (ready or starting) at target concurrency and the cluster below the model's
        max_instances: where the next instance starts is the leader's call (often here, by its entry-node
        preference, but another node may have the checkpoint in DRAM or the only free slot)."""
        policy = runtime.deployment.autoscaling
        if runtime.demand() < len(runtime.instances) * policy.target_concurrency:
            return False
        model = runtime.deployment.name
        num_live = sum(1 for r in self.state.instances() if r.model == model and r.is_live)
        return num_live < policy.max_instances

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
    async def _relayed(self, node_id: str, address: str, prepared: PreparedRequest, generated: Sequence[int]
                       ) -> AsyncIterator[AsyncIterator[int]]:
        log.debug("relaying", extra={"model": prepared.deployment.name, "node": node_id, "http": address})
        self._num_relayed[node_id] += 1
        try:
            async with (
                self.relay.open(address, prepared, generated) as tokens,
                aclosing(self._watch(node_id, tokens)) as watched,
            ):
                yield watched
        except RelayFailed:
            self._suspect(node_id)
            raise
        finally:
            self._num_relayed[node_id] -= 1
            if not self._num_relayed[node_id]:
                del self._num_relayed[node_id]

    async def _watch(self, node_id: str, tokens: AsyncIterator[int]) -> AsyncIterator[int]:
        """Passes the relayed tokens on; a stream that broke off marks its node suspect (the error goes
        to the consumer, `_resuming`, so it never reaches `_relayed`)."""
        try:
            async for token in tokens:
                yield token
        except RelayFailed:
            self._suspect(node_id)
            raise

    def _suspect(self, node_id: str) -> None:
        now = time.monotonic()
        if self._suspect_until.get(node_id, 0.0) <= now:
            log.warning("relay to node failed; avoiding it for a while", extra={"node": node_id, "for_s": SUSPECT_S})
        self._suspect_until[node_id] = now + SUSPECT_S

    @asynccontextmanager
    async def _local(self, prepared: PreparedRequest, generated: Sequence[int]) -> AsyncIterator[AsyncIterator[int]]:
        """The request's tokens after `generated`, from an instance on this node (waiting through a
        cold start)."""
        async with self.worker.lease(prepared.deployment.name) as instance:
            params = dataclasses.replace(prepared.params, max_tokens=prepared.params.max_tokens - len(generated))
            request = MovableRequest(instance, [*prepared.prompt_ids, *generated], params)
            try:
                async with aclosing(self._counted(prepared, request)) as tokens:
                    yield tokens
            finally:
                request.close()

    async def _counted(self, prepared: PreparedRequest, request: MovableRequest) -> AsyncIterator[int]:
        """The request's tokens, which come from the local engine or, once a migration moved the
        request, from its destination (see `sllmd.worker.migration.movable`), counted in this node's metrics:
        the node that generates tokens counts them, wherever they are detokenised."""
        model = prepared.deployment.name
        num_generated = 0
        self.metrics.tokens.labels(model, "in").inc(len(request.prompt_ids))
        try:
            async with aclosing(request.stream()) as tokens:
                async for token in tokens:
                    if num_generated == 0:
                        self.metrics.ttft.labels(model).observe(time.monotonic() - prepared.arrived_at)
                    num_generated += 1
                    yield token
        finally:  # also when the consumer stopped early (a stop string)
            self.metrics.tokens.labels(model, "out").inc(num_generated)
            self.metrics.latency.labels(model).observe(time.monotonic() - prepared.arrived_at)

    async def _generate(self, prepared: PreparedRequest, tokens: AsyncIterator[int]) -> AsyncIterator[StreamEvent]:
        """Detokenises the request's tokens, wherever they were generated, applying stop strings; the
        last event is `Finished`. Closes `tokens` when done."""
        text = TextStream(prepared.tokenizer, prepared.request.stop)
        num_generated = 0
        is_eos = False
        async with aclosing(tokens):
            async for token in tokens:
                num_generated += 1
                is_eos = token in prepared.params.stop_token_ids
                delta = text.push(token)
                if delta:
                    yield TextDelta(delta)
                if text.is_done:
                    break
        if not text.is_done:
            tail = text.finish()
            if tail:
                yield TextDelta(tail)
        finish_reason = "stop" if text.finish_reason == "stop" or is_eos else "length"
        yield Finished(finish_reason, len(prepared.prompt_ids), num_generated)
