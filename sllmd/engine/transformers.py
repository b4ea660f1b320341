# long: one job, the worker thread that owns the model and the request side it answers; split, their hand-over
# protocol (per-request queues, the cancelled flag, release before the last item) would span files.
"""`TransformersEngine`: a Hugging Face causal LM behind the `Engine` contract.

Concurrency model
-----------------
* One dedicated worker thread per engine owns the model and runs every forward pass, under
  `torch.inference_mode()`. Nothing else touches the model, so no locking around it is needed.
* Continuous batching. Each round the thread prefills the requests that arrived, oldest first, while
  the decode batch has room for them (`max_batch_size` requests, and `max_batch_kv_bytes` of KV cache for
  the batch's longest possible padded length; a request that does not fit waits for the next round,
  and one alone always fits). A prefilled request (prompt -> first token, in its own `DynamicCache`)
  joins the decode batch (`kv_batch.DecodeBatch`), which then decodes ONE token for every member in one
  forward pass; finished and cancelled requests leave it at the round's boundary. A model whose cache
  has layers the batch cannot merge (`kv_batch.can_batch`) decodes each request in its own pass instead.
  transformers' own continuous batching (`generate_batch`, its paged cache) is not used: it samples with
  its own generator, while sllmd's token choice is keyed by (seed, position) for migration, and it
  cannot take over a cache prefilled elsewhere (a migration's catch-up).
* When no request is pending or active the thread blocks on a condition variable (no polling).
* Tokens cross to asyncio through `loop.call_soon_threadsafe` into a per-request `asyncio.Queue`
  on the consumer's own loop, so they arrive in generation order. A model exception becomes an
  `EngineFailed` raised from that request's generator: a prefill's fails that request, a batched
  decode step's every request in the batch; the others carry on.
* Closing a generator early (`aclose()`, task cancelled) sets the request's `cancelled` flag; the
  thread drops the request and its KV cache before spending another step on it.

Token choice is `sampling.choose_token`, keyed by (seed, absolute position) only, so resuming a
request elsewhere from prompt + tokens-so-far with the same seed continues identically.

Prefill handles (live migration's catch-up) hold a `DynamicCache` and the last position's logits. Their
`extend` jobs run on the same worker thread, at the start of a round before the decode steps, and are
answered through a future on the caller's loop. A request started from a handle takes over its cache
and computes only the ids the handle does not cover (none: it samples from the kept logits).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import secrets
import threading
import time
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel

from sllmd.checkpoint.dram import DramCache
from sllmd.engine.base import Engine, Prefill, check_request, check_token_ids
from sllmd.engine.hf_model import check_architecture, load_model, resident_bytes
from sllmd.engine.kv_batch import DecodeBatch, can_batch, kv_bytes
from sllmd.engine.sampling import choose_token
from sllmd.errors import EngineFailed
from sllmd.types import LoadReport, SamplingParams


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
    num_cached: int = 0  # leading prompt ids already in `cache` (taken over from a prefill handle)
    cached_logits: torch.Tensor | None = None  # next-token logits after those ids
    # Written by the event loop, read by the worker. A bool store is atomic under the GIL; a stale
    # read costs at most one extra step.
    cancelled: bool = False


class TransformersPrefill(Prefill):
    """A prefill handle of a TransformersEngine. Its cache and logits are written only by the worker
    thread while an `extend` job runs, and read by it when a request takes the handle over."""

    engine: TransformersEngine

    def __init__(self, engine: TransformersEngine) -> None:
        super().__init__(engine)
        self.cache: DynamicCache | None = None
        self.last_logits: torch.Tensor | None = None

    async def _compute(self, token_ids: list[int]) -> None:
        self.engine.check_ids(token_ids, self.num_tokens + len(token_ids))
        if not token_ids:
            return
        future = asyncio.get_running_loop().create_future()
        self.engine.submit_prefill(_PrefillJob(self, list(token_ids), future))
        await future

    def close(self) -> None:
        super().close()
        self.cache = self.last_logits = None


@dataclass(eq=False)
class _PrefillJob:
    handle: TransformersPrefill
    token_ids: list[int]
    future: asyncio.Future[None]


class TransformersEngine(Engine):
    """Serves one checkpoint directory on one torch device (`"cpu"`, `"cuda:N"`).

    `start()` and `stop()` must be awaited from one event loop; `generate()` may be called
    concurrently from any loop once `start()` has returned.
    """

    def __init__(self, checkpoint_dir: Path, device: str = "cpu", *, dtype: str = "float32",
                 max_model_len: int | None = None, dram_cache: DramCache | None = None,
                 max_batch_size: int = 32, max_batch_kv_bytes: int = 2 << 30):
        """`checkpoint_dir` is an sllmd v1 checkpoint (it has a manifest.json: loaded by the sllmd loader,
        through `dram_cache` if given) or a plain Hugging Face model directory (`from_pretrained`). The model
        computes in `dtype` (a serving dtype: weights stored otherwise are converted at load) and serves at
        most `max_model_len` tokens of prompt + completion (None: its own context length). At most
        `max_batch_size` requests decode together, their KV cache within `max_batch_kv_bytes` (see above)."""
        if max_batch_size < 1 or max_batch_kv_bytes < 0:
            raise ValueError(f"bad batch limits: {max_batch_size} requests, {max_batch_kv_bytes} bytes")
        self.checkpoint_dir = Path(checkpoint_dir)
        self.device = torch.device(device)
        self.dtype: torch.dtype = getattr(torch, dtype)
        self.max_model_len = max_model_len
        self.dram_cache = dram_cache
        self.max_batch_size = max_batch_size
        self.max_batch_kv_bytes = max_batch_kv_bytes
        self.context_length = 0
        self._kv_bytes_per_token = 0  # measured at warm-up
        self._batchable = False  # whether the model's cache merges into a DecodeBatch; found at warm-up
        self._model: PreTrainedModel | None = None
        self._vocab_size = 0
        self._cond = threading.Condition()
        self._pending: list[_Request] = []  # guarded by _cond
        self._prefills: list[_PrefillJob] = []  # guarded by _cond
        self._live: set[_Request] = set()  # admitted and not yet released by the worker; under _cond
        self._stopping = False
        self._closed_reason: str | None = None  # set once the worker has exited
        self._thread: threading.Thread | None = None

    @classmethod
    def check_model(cls, config: dict[str, Any]) -> None:
        check_architecture(config)

    @property
    def has_died(self) -> bool:
        return self._closed_reason is not None and not self._stopping

    @property
    def num_active(self) -> int:
        """Requests admitted and not yet released by the worker. A finished request is released
        before its last token is handed over; a closed one within one step of closing."""
        return len(self._live)

    # ---- lifecycle -------------------------------------------------------------------------------

    def _load_and_init(self) -> LoadReport:
        model, report = load_model(self.checkpoint_dir, self.device, self.dtype, self.dram_cache)
        t1 = time.perf_counter()
        model.eval()
        text_config = model.config.get_text_config()
        self.context_length = int(text_config.max_position_embeddings)
        if self.max_model_len is not None:
            self.context_length = min(self.context_length, self.max_model_len)
        self._vocab_size = model.get_input_embeddings().num_embeddings
        with torch.inference_mode():  # warm-up: first-call kernel/allocator setup counts as init
            cache = DynamicCache(config=model.config)
            model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=self.device), past_key_values=cache,
                  use_cache=True)
        self._batchable = can_batch(cache)
        self._kv_bytes_per_token = kv_bytes(cache) if self._batchable else 0
        self._model = model
        return dataclasses.replace(report, init_s=report.init_s + time.perf_counter() - t1,
                                   weights_bytes=resident_bytes(model))

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
        model = weakref.ref(self._model) if self._model is not None else None
        self._model = None
        # A full collection holds the GIL for ~0.2-0.4 s, stalling every stream this process serves;
        # only a model kept alive by reference cycles needs one.
        if model is not None and model() is not None:
            gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- request side (event loop) ---------------------------------------------------------------

    def check_ids(self, token_ids: list[int], num_total: int) -> None:
        """Ids in the vocabulary and a sequence of `num_total` tokens within the context length."""
        if self._model is None:
            raise EngineFailed(self._closed_reason or "engine is not running")
        check_token_ids(token_ids, num_total, vocab_size=self._vocab_size, context_length=self.context_length)

    def submit_prefill(self, job: _PrefillJob) -> None:
        with self._cond:
            if self._thread is None or self._stopping or self._closed_reason is not None:
                raise EngineFailed(self._closed_reason or "engine is not running")
            self._prefills.append(job)
            self._cond.notify()

    def _new_prefill(self) -> Prefill:
        return TransformersPrefill(self)

    async def generate(self, prompt_ids: list[int], params: SamplingParams, *,
                       prefilled: Prefill | None = None) -> AsyncIterator[int]:
        """Yield new token ids in order. Validation errors are raised before anything is queued."""
        if self._model is None:
            raise EngineFailed(self._closed_reason or "engine is not running")
        check_request(prompt_ids, params, vocab_size=self._vocab_size, context_length=self.context_length)
        seed = params.seed if params.seed is not None else secrets.randbits(64)
        req = _Request(list(prompt_ids), params, seed, asyncio.get_running_loop())
        if prefilled is not None:
            prefilled.take(self, prompt_ids)
            assert isinstance(prefilled, TransformersPrefill)
            req.cache, req.cached_logits, req.num_cached = prefilled.cache, prefilled.last_logits, prefilled.num_tokens
            prefilled.close()
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

    def _forward(self, new_ids: list[int], cache: DynamicCache) -> torch.Tensor:
        """The next-token logits after appending `new_ids` to `cache` (which grows by them)."""
        assert self._model is not None
        input_ids = torch.tensor([new_ids], dtype=torch.long, device=self.device)
        # The cache supplies the positions (position_ids default to cache length + arange).
        out = self._model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1]

    def _step(self, req: _Request) -> int:
        """Prefill (first call) or decode one token for `req`; returns the chosen token."""
        assert self._model is not None
        if req.cache is None:
            req.cache = DynamicCache(config=self._model.config)
        new_ids = req.tokens[-1:] if req.tokens else req.prompt[req.num_cached:]
        if new_ids:
            logits = self._forward(new_ids, req.cache)
        else:  # a prefill handle covered the whole prompt: its last logits choose the first token
            assert req.cached_logits is not None
            logits = req.cached_logits
        req.cached_logits = None
        token = choose_token(logits, req.params, len(req.prompt) + len(req.tokens), req.seed)
        req.tokens.append(token)
        return token

    def _run_prefill(self, job: _PrefillJob) -> None:
        """Extend a handle's cache (skipped if it was closed meanwhile); answer on the caller's loop."""
        handle, error = job.handle, None
        if handle.is_open:
            try:
                assert self._model is not None
                cache = handle.cache if handle.cache is not None else DynamicCache(config=self._model.config)
                handle.last_logits = self._forward(job.token_ids, cache)
                handle.cache = cache
                handle.token_ids += job.token_ids
            except Exception as e:  # the cache may be half-updated: the handle is unusable now
                handle.close()
                error = EngineFailed(f"prefill failed: {e!r}")
        else:
            error = EngineFailed("prefill handle was closed")
        _settle_threadsafe(job.future, error)

    def _decode_step(self, batch: DecodeBatch[_Request]) -> list[int | BaseException]:
        """One token for every request of `batch`, in one forward pass."""
        assert self._model is not None
        rows = batch.rows
        try:
            out = self._model(**batch.step_inputs([req.tokens[-1] for req in rows]), logits_to_keep=1)
            logits = out.logits[:, -1].to("cpu")  # one device-to-host copy for the whole batch
            tokens: list[int | BaseException] = []
            for i, req in enumerate(rows):
                req.tokens.append(choose_token(logits[i], req.params, len(req.prompt) + len(req.tokens), req.seed))
                tokens.append(req.tokens[-1])
            return tokens
        except Exception as e:  # the batch's cache may be half-updated: every request in it fails
            return [EngineFailed(f"generation failed: {e!r}")] * len(rows)

    def _has_room(self, decoding: list[_Request], req: _Request) -> bool:
        """Whether `req` may join the `decoding` requests now (see the module doc; one alone always may)."""
        if not decoding:
            return True
        if len(decoding) >= self.max_batch_size:
            return False
        # Left-padded, every row is as long as the longest: bound the batch by its longest possible row.
        longest = max(len(r.prompt) + r.params.max_tokens for r in (*decoding, req))
        return (len(decoding) + 1) * longest * self._kv_bytes_per_token <= self.max_batch_kv_bytes

    def _hand_over(self, req: _Request, item: int | BaseException | None) -> bool:
        """Post `item` (None: the request was cancelled) to `req`'s consumer; whether `req` goes on. A request
        that ends is released before its last item is handed over, so that num_active has already dropped
        when the consumer sees its stream end."""
        goes_on = isinstance(item, int) and not _is_last(req.params, len(req.tokens), item)
        if not goes_on:
            self._release(req)
        if item is not None:
            self._post(req, item)
        return goes_on

    def _own_step(self, req: _Request) -> int | BaseException | None:
        """`req`'s next token from a pass of its own (its prefill, or a decode step of a model that cannot
        batch); the error if that failed; None if it was cancelled."""
        if req.cancelled:
            return None
        try:
            return self._step(req)
        except Exception as e:  # this request fails; the others carry on
            return EngineFailed(f"generation failed: {e!r}")

    def _run(self) -> None:
        waiting: list[_Request] = []  # admitted, not prefilled yet: they join when there is room
        batch: DecodeBatch[_Request] = DecodeBatch()
        solo: list[_Request] = []  # decoding one per pass: a model whose cache the batch cannot merge
        reason = "engine stopped"
        try:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)  # the current device is per thread
            with torch.inference_mode():
                while True:
                    with self._cond:
                        while not (self._pending or self._prefills or waiting or batch.rows or solo
                                   or self._stopping):
                            self._cond.wait()
                        if self._stopping:
                            return
                        waiting.extend(self._pending)
                        self._pending.clear()
                        prefills, self._prefills = self._prefills, []
                    for job in prefills:
                        self._run_prefill(job)
                    for req in [r for r in waiting if r.cancelled]:
                        waiting.remove(req)
                        self._hand_over(req, None)
                    cancelled = [r for r in batch.rows if r.cancelled]
                    for req in cancelled:
                        self._hand_over(req, None)
                    batch.remove(cancelled)
                    while waiting and not self._stopping and self._has_room([*batch.rows, *solo], waiting[0]):
                        req = waiting.pop(0)
                        if self._hand_over(req, self._own_step(req)):
                            if self._batchable:
                                assert req.cache is not None
                                batch.add(req, req.cache)
                                req.cache = None  # the batch's now
                            else:
                                solo.append(req)
                    for req in list(solo):
                        if not self._hand_over(req, self._own_step(req)):
                            solo.remove(req)
                    if batch.rows and not self._stopping:
                        rows = list(batch.rows)
                        items = self._decode_step(batch)
                        batch.remove([req for req, item in zip(rows, items, strict=True)
                                      if not self._hand_over(req, item)])
        except BaseException as e:  # a bug in the loop itself: fail everyone rather than hang them
            reason = f"engine thread died: {e!r}"
            raise
        finally:
            with self._cond:
                self._closed_reason = reason
                leftover = waiting + batch.rows + solo + self._pending
                self._pending.clear()
                jobs, self._prefills = self._prefills, []
            for req in leftover:
                self._release(req)
                self._post(req, EngineFailed(reason))
            for job in jobs:
                _settle_threadsafe(job.future, EngineFailed(reason))


def _settle_threadsafe(future: asyncio.Future[None], error: BaseException | None) -> None:
    """Resolve `future` on its own loop from the worker thread (unless the waiter gave up)."""
    def settle() -> None:
        if not future.done():
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)

    with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody waits any more
        future.get_loop().call_soon_threadsafe(settle)
