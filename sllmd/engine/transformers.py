"""`TransformersEngine`: a Hugging Face causal LM behind the `Engine` contract.

Concurrency model
-----------------
* One dedicated worker thread per engine owns the model and runs every forward pass, under
  `torch.inference_mode()`. Nothing else touches the model, so no locking around it is needed.
* Each request keeps its own KV cache (`DynamicCache`). Requests are not batched: at the start of
  each round the thread takes every newly arrived request, then gives every active request ONE step
  in arrival order — a prefill (prompt -> first token) for a new one, a single-token decode for the
  others. Concurrent streams therefore all progress at the same rate.
* When no request is pending or active the thread blocks on a condition variable (no polling).
* Tokens cross to asyncio through `loop.call_soon_threadsafe` into a per-request `asyncio.Queue`
  on the consumer's own loop, so they arrive in generation order. A model exception becomes an
  `EngineFailed` raised from that request's generator; other requests carry on.
* Closing a generator early (`aclose()`, task cancelled) sets the request's `cancelled` flag; the
  thread drops the request and its KV cache before spending another step on it.

Token choice is `sampling.choose_token`, keyed by (seed, absolute position) only, so resuming a
request elsewhere from prompt + tokens-so-far with the same seed continues identically.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import secrets
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, DynamicCache, PreTrainedModel
from transformers.utils import logging as transformers_logging

from sllmd.engine.base import Engine, LoadReport, SamplingParams
from sllmd.engine.sampling import choose_token
from sllmd.errors import ContextLengthExceeded, EngineFailed, InvalidRequest

_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")


def _is_last(params: SamplingParams, produced: int, token: int) -> bool:
    """The one stopping rule, shared by the worker and the generator so they agree."""
    return produced >= params.max_tokens or token in params.stop_token_ids


@dataclass(eq=False)
class _Request:
    prompt: list[int]
    params: SamplingParams
    seed: int
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[int | BaseException] = field(default_factory=asyncio.Queue)
    tokens: list[int] = field(default_factory=list)
    cache: DynamicCache | None = None
    # Written by the event loop, read by the worker. A bool store is atomic under the GIL; a stale
    # read costs at most one extra step.
    cancelled: bool = False


class TransformersEngine(Engine):
    """Serves one checkpoint directory on one torch device (`"cpu"`, `"cuda:N"`).

    `start()` and `stop()` must be awaited from one event loop; `generate()` may be called
    concurrently from any loop once `start()` has returned.
    """

    def __init__(self, checkpoint_dir: Path, device: str = "cpu", *, dtype: torch.dtype = torch.float32):
        self.checkpoint_dir = Path(checkpoint_dir)
        self.device = torch.device(device)
        self.dtype = dtype
        self.context_length = 0
        self._model: PreTrainedModel | None = None
        self._vocab_size = 0
        self._cond = threading.Condition()
        self._pending: list[_Request] = []  # guarded by _cond
        self._live: set[_Request] = set()  # admitted and not yet released by the worker; under _cond
        self._stopping = False
        self._closed_reason: str | None = None  # set once the worker has exited
        self._thread: threading.Thread | None = None

    @property
    def num_active(self) -> int:
        """Requests admitted and not yet released by the worker. A finished request is released
        before its last token is handed over; a closed one within one step of closing."""
        return len(self._live)

    # ---- lifecycle -------------------------------------------------------------------------------

    def _load_weights(self) -> PreTrainedModel:
        """Checkpoint bytes -> model on `self.device`. The single place a faster loader plugs in."""
        # device_map= would load straight to the device but needs `accelerate`; .to() is a no-op on CPU.
        transformers_logging.disable_progress_bar()  # a daemon's log is no terminal
        model = AutoModelForCausalLM.from_pretrained(self.checkpoint_dir, dtype=self.dtype)
        return model.to(self.device)

    def _load_and_init(self) -> LoadReport:
        t0 = time.perf_counter()
        model = self._load_weights()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # count asynchronous copies as loading, not init
        t1 = time.perf_counter()
        model.eval()
        text_config = model.config.get_text_config()
        self.context_length = int(text_config.max_position_embeddings)
        self._vocab_size = model.get_input_embeddings().num_embeddings
        with torch.inference_mode():  # warm-up: first-call kernel/allocator setup counts as init
            model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=self.device))
        self._model = model
        num_bytes = sum(p.stat().st_size for pat in _WEIGHT_PATTERNS for p in self.checkpoint_dir.glob(pat))
        return LoadReport(source_tier="ssd", num_bytes=num_bytes, load_s=t1 - t0, init_s=time.perf_counter() - t1)

    async def start(self) -> LoadReport:
        if self._thread is not None:
            raise RuntimeError("engine already started")
        t0 = time.perf_counter()
        try:
            report = await asyncio.to_thread(self._load_and_init)
        except Exception as e:
            raise EngineFailed(f"could not load {self.checkpoint_dir}: {e!r}") from e
        self._thread = threading.Thread(target=self._run, name=f"engine-{self.checkpoint_dir.name}", daemon=True)
        self._thread.start()
        # init_s also covers the thread hop and startup; load_s stays the pure weight-reading time.
        return dataclasses.replace(report, init_s=time.perf_counter() - t0 - report.load_s)

    async def stop(self) -> None:
        """End the worker (after its current step), fail every unfinished request, free the model."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        self._model = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- request side (event loop) ---------------------------------------------------------------

    def _validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise InvalidRequest("prompt must contain at least one token", param="messages")
        if params.max_tokens < 1:
            raise InvalidRequest("max_tokens must be at least 1", param="max_tokens")
        if params.temperature < 0:
            raise InvalidRequest("temperature must be >= 0", param="temperature")
        if not 0 < params.top_p <= 1:
            raise InvalidRequest("top_p must be in (0, 1]", param="top_p")
        if len(prompt_ids) + params.max_tokens > self.context_length:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {self.context_length} tokens; the prompt has "
                f"{len(prompt_ids)} and max_tokens is {params.max_tokens}."
            )
        # An out-of-range id would trip a device-side assert on CUDA, poisoning the whole context.
        if min(prompt_ids) < 0 or max(prompt_ids) >= self._vocab_size:
            raise InvalidRequest(f"token ids must be in [0, {self._vocab_size})", param="prompt")

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[int]:
        """Yield new token ids in order. Validation errors are raised before anything is queued."""
        if self._model is None:
            raise EngineFailed(self._closed_reason or "engine is not running")
        self._validate(prompt_ids, params)
        seed = params.seed if params.seed is not None else secrets.randbits(64)
        req = _Request(list(prompt_ids), params, seed, asyncio.get_running_loop())
        with self._cond:
            if self._thread is None or self._stopping or self._closed_reason is not None:
                raise EngineFailed(self._closed_reason or "engine is not running")
            self._pending.append(req)
            self._live.add(req)
            self._cond.notify()
        produced = 0
        try:
            while True:
                item = await req.queue.get()
                if isinstance(item, BaseException):
                    raise item
                produced += 1
                yield item
                if _is_last(params, produced, item):
                    return
        finally:
            req.cancelled = True  # no-op if the worker already released it

    # ---- worker thread ---------------------------------------------------------------------------

    def _post(self, req: _Request, item: int | BaseException) -> None:
        try:
            req.loop.call_soon_threadsafe(req.queue.put_nowait, item)
        except RuntimeError:  # the consumer's loop is closed: nobody will ever read this request
            req.cancelled = True

    def _release(self, req: _Request) -> None:
        req.cache = None  # drop the KV cache now rather than whenever the generator is collected
        with self._cond:
            self._live.discard(req)

    def _step(self, req: _Request) -> int:
        """Prefill (first call) or decode one token for `req`; returns the chosen token."""
        assert self._model is not None
        if req.cache is None:
            req.cache = DynamicCache(config=self._model.config)
            new_ids = req.prompt
        else:
            new_ids = req.tokens[-1:]
        input_ids = torch.tensor([new_ids], dtype=torch.long, device=self.device)
        # The cache supplies the positions (position_ids default to cache length + arange).
        out = self._model(input_ids=input_ids, past_key_values=req.cache, use_cache=True, logits_to_keep=1)
        token = choose_token(out.logits[0, -1], req.params, len(req.prompt) + len(req.tokens), req.seed)
        req.tokens.append(token)
        return token

    def _run(self) -> None:
        active: list[_Request] = []
        reason = "engine stopped"
        try:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)  # the current device is per thread
            with torch.inference_mode():
                while True:
                    with self._cond:
                        while not (self._pending or active or self._stopping):
                            self._cond.wait()
                        if self._stopping:
                            return
                        active.extend(self._pending)
                        self._pending.clear()
                    for req in list(active):
                        if self._stopping:
                            break
                        item: int | BaseException | None = None
                        if not req.cancelled:
                            try:
                                item = self._step(req)
                            except Exception as e:  # this request fails; the others carry on
                                item = EngineFailed(f"generation failed: {e!r}")
                        if not isinstance(item, int) or _is_last(req.params, len(req.tokens), item):
                            # Release before handing over the last item, so that num_active has
                            # already dropped when the consumer sees its stream end.
                            active.remove(req)
                            self._release(req)
                        if item is not None:
                            self._post(req, item)
        except BaseException as e:  # a bug in the loop itself: fail everyone rather than hang them
            reason = f"engine thread died: {e!r}"
            raise
        finally:
            with self._cond:
                self._closed_reason = reason
                leftover = active + self._pending
                self._pending.clear()
            for req in leftover:
                self._release(req)
                self._post(req, EngineFailed(reason))
