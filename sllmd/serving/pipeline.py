"""Turns an OpenAI-level request into a token stream: resolve the model, tokenise, check the
context, get an instance (waiting through a cold start), generate, detokenise.

Everything that can be rejected is rejected in `prepare` or while opening the stream, before the
HTTP layer sends a status line, so errors keep their real status codes. `prepare` runs once, on the
entry node (4xx are answered there); `open_stream` then takes token ids from a local instance or from
the node that `scheduler.placement` picks (over the peer channel, `sllmd.serving.relay`),
and `_generate` turns them into text the same way for both sources: stop strings, finish reason, usage
and the request's metrics (TTFT and latency from its arrival here, tokens) are decided on the entry
node, once. The serving node of a relayed request only generates ids (`open_tokens`; one hop, no
loops). A node that failed a relay is avoided for SUSPECT_S.

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

import collections
import logging
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sllmd.errors import ModelNotFound
from sllmd.scheduler.placement import ModelLoad, NodeState, RunningInstance
from sllmd.scheduler.routing import AskLeader, ServeHere, has_room, route
from sllmd.serving.relay import Relay, RelayFailed
from sllmd.serving.request import GenerationRequest, TokenRequest
from sllmd.serving.textgen import TextStream, Tokenizer, resolve_max_tokens
from sllmd.serving.tokenizers import Tokenizers
from sllmd.state.models import Deployment
from sllmd.types import SamplingParams
from sllmd.worker.migration.movable import MovableRequest
from sllmd.worker.start_progress import StartWatch

if TYPE_CHECKING:  # the pipeline drives them; importing them would pull the worker's device code in here
    from sllmd.cluster.placer import Placer
    from sllmd.cluster.replicated import ReplicatedStateMachine
    from sllmd.metrics import Metrics
    from sllmd.worker.instance import ModelRuntime
    from sllmd.worker.manager import Worker

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
    """A request resolved on its entry node, which alone shapes its answer (text, stop strings, usage)."""

    request: GenerationRequest
    deployment: Deployment
    tokenizer: Tokenizer
    prompt_ids: list[int]
    params: SamplingParams
    arrived_at: float  # time.monotonic() on the entry node

    def tokens(self, generated: tuple[int, ...] = ()) -> TokenRequest:
        """What an instance generates for this request once `generated` tokens exist."""
        return TokenRequest(self.deployment.name, tuple(self.prompt_ids), self.params, generated)


class Router:
    def __init__(self, state: ReplicatedStateMachine, worker: Worker, tokenizers: Tokenizers,
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
    async def open_stream(self, prepared: PreparedRequest, watch: StartWatch | None = None
                          ) -> AsyncIterator[AsyncIterator[StreamEvent]]:
        """Holds a token source for the request (an instance here or, through a relay, on the serving
        node) while the caller consumes the yielded text events. Errors raised on entry come before any
        output; a relayed source that breaks off mid-stream is resumed elsewhere when configured. `watch`
        hears when entering waits for an instance, here or on the serving node, and sees the start it waits for."""
        if self.worker.warmer is not None:
            self.worker.warmer.note_request(prepared.deployment.name)
        async with AsyncExitStack() as source:
            tokens = await source.enter_async_context(self._source(prepared, (), watch))
            async with aclosing(self._generate(prepared, self._resuming(prepared, tokens, source))) as events:
                yield events

    @asynccontextmanager
    async def open_tokens(self, request: TokenRequest, watch: StartWatch | None = None
                          ) -> AsyncIterator[AsyncIterator[int]]:
        """A request another node prepared and relayed here: its generated token ids, from an instance on
        this node (the entry node detokenises them and records the request's metrics). `watch` as for
        `open_stream`."""
        if self.state.deployment(request.model) is None:
            raise ModelNotFound(request.model)
        async with self._local(request, watch) as tokens:
            yield tokens

    @asynccontextmanager
    async def _source(self, prepared: PreparedRequest, generated: tuple[int, ...], watch: StartWatch | None = None
                      ) -> AsyncIterator[AsyncIterator[int]]:
        """The request's tokens after `generated`, from the node placement picks now. A relay that
        could not connect is placed again; errors raised on entry come before any token."""
        async with AsyncExitStack() as stack:
            for _ in range(MAX_RELAY_ATTEMPTS):
                target = await self.place(prepared.deployment)
                if target is None or target[0] == self.worker.node_id:
                    break
                try:
                    tokens = await stack.enter_async_context(
                        self._relayed(*target, prepared.tokens(generated), watch))
                except RelayFailed as exc:
                    if not exc.is_connect:
                        raise
                    log.warning("relay could not connect; placing again", extra={"node": target[0]})
                    continue
                yield tokens
                return
            yield await stack.enter_async_context(self._local(prepared.tokens(generated), watch))

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
        "here" (queued if need be). `scheduler.routing.route` decides over this node (from its worker) and
        the others (their records and status); when it wants a new instance, the leader's
        `plan_new_instance` says where (`Placer`)."""
        model, policy = deployment.name, deployment.autoscaling
        runtime = self.worker.runtimes.get(model)
        if runtime is not None and (load := _load(runtime)).num_ready and has_room(load, load.num_requests, policy):
            return None  # `route` serves it here whatever the others are: no need to read the cluster's state
        peers = self.state.peers()
        now = time.monotonic()
        decision = route(model, policy, [self._local_state(model), *self.placer.node_states(peers)],
                         local_id=self.worker.node_id,
                         memory_bytes=self.worker.estimates.memory_need(deployment).total_bytes,
                         num_devices=deployment.num_gpus,
                         num_relayed=self._num_relayed,
                         avoid={node_id for node_id, until in self._suspect_until.items() if until > now})
        if isinstance(decision, AskLeader):
            decision = decision.then(await self.placer.place(model), local_id=self.worker.node_id)
        if isinstance(decision, ServeHere):
            return None
        # A node without an address is never routed to (it counts as dead, see `view.node_states`).
        return decision.node_id, {p.id: p.http or "" for p in peers}[decision.node_id]

    def _local_state(self, model: str) -> NodeState:
        """This node from its worker (exact, no replication lag), with the load of `model`."""
        worker = self.worker
        kept, now = worker.kept_instances(), time.monotonic()
        instances = tuple(
            RunningInstance(i.id, name, runtime.deployment.engine_kind, i.in_flight, i.num_tokens,
                            runtime.deployment.checkpoint_bytes, is_kept=i in kept,
                            devices=tuple(d.index for d in i.devices),
                            memory_bytes=i.memory_bytes, request_rate=runtime.request_rate.per_s(now))
            for name, runtime in worker.runtimes.items() for i in runtime.ready())
        runtime = worker.runtimes.get(model)
        loads = {} if runtime is None else {model: _load(runtime)}
        return NodeState(worker.node_id, is_alive=True, free_memory=worker.devices.free_by_device(),
                         topology=worker.devices.topology,
                         calibration=worker.estimates.calibration, instances=instances, loads=loads)

    @asynccontextmanager
    async def _relayed(self, node_id: str, address: str, request: TokenRequest, watch: StartWatch | None
                       ) -> AsyncIterator[AsyncIterator[int]]:
        log.debug("relaying", extra={"model": request.model, "node": node_id, "http": address})
        self._num_relayed[node_id] += 1
        try:
            async with (
                self.relay.open(address, request, watch) as tokens,
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
    async def _local(self, request: TokenRequest, watch: StartWatch | None) -> AsyncIterator[AsyncIterator[int]]:
        """`request`'s tokens from an instance on this node (waiting through a cold start); once a migration
        moved the request, from its destination (see `sllmd.worker.migration.movable`)."""
        async with self.worker.lease(request.model, watch) as instance:
            movable = MovableRequest(instance, request.sequence(), request.remaining_params())
            try:
                async with aclosing(movable.stream()) as tokens:
                    yield tokens
            finally:
                movable.close()

    async def _generate(self, prepared: PreparedRequest, tokens: AsyncIterator[int]) -> AsyncIterator[StreamEvent]:
        """Detokenises the request's tokens, wherever they were generated, applying stop strings; the
        last event is `Finished`. Records the request's metrics, and closes `tokens`, when done."""
        model = prepared.deployment.name
        text = TextStream(prepared.tokenizer, prepared.request.stop)
        num_generated = 0
        is_eos = False
        try:
            async with aclosing(tokens):
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
        finally:  # also when the client went away or the source failed
            self.metrics.tokens.labels(model, "in").inc(len(prepared.prompt_ids))
            self.metrics.tokens.labels(model, "out").inc(num_generated)
            self.metrics.latency.labels(model).observe(time.monotonic() - prepared.arrived_at)
        if not text.is_done:
            tail = text.finish()
            if tail:
                yield TextDelta(tail)
        finish_reason = "stop" if text.finish_reason == "stop" or is_eos else "length"
        yield Finished(finish_reason, len(prepared.prompt_ids), num_generated)


def _load(runtime: ModelRuntime) -> ModelLoad:
    """The runtime's model on this node: its ready and starting instances, its requests waiting or in flight."""
    return ModelLoad(len(runtime.ready()), runtime.num_starting(), runtime.demand())
