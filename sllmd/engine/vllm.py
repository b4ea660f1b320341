"""`VllmEngine`: a vLLM `AsyncLLM` behind the `Engine` contract, its weights read by sllmd's loader.

Process model
-------------
vLLM runs the model outside the daemon: `AsyncLLM` starts an engine-core process, which starts a
worker process that builds the model and loads its weights. The weights come through the `sllmd` load
format (`sllmd.engine.vllm_loader`, registered in those processes by sllmd's `vllm.general_plugins`
entry point): an sllmd v1 checkpoint is read by `load_checkpoint` in the worker; a Hugging Face
directory by vLLM's own loader. The daemon's DRAM cache lives in the daemon's memory, which the worker
cannot see, so a vLLM load always reads the checkpoint files: its DRAM tier is the kernel's page cache,
which every process shares. A load reports tier "dram" when the files were wholly resident as it began,
else "ssd" (see `sllmd.engine.vllm_loader`); DRAM warming makes a vLLM deployment's files resident
instead of filling the DRAM cache (`sllmd.worker.warming`).

Child processes are started with `spawn` unless `VLLM_WORKER_MULTIPROC_METHOD` says otherwise: forking
a daemon that runs threads (event loop, loader, ZeroMQ) copies locks other threads may hold. Spawn
re-imports the main module in the child, so programs that start a vLLM engine guard `__main__`.

Requests
--------
Token ids in, token ids out (`skip_tokenizer_init`; text is handled above engines). Every request is
streamed with `RequestOutputKind.DELTA`, so each vLLM output carries only the new tokens. End of
generation follows the contract only: `max_tokens` or a stop token (yielded); the model's EOS ends a
request only when the caller lists it in `stop_token_ids` (`ignore_eos`). Closing the generator early
closes vLLM's stream, which aborts the request in the engine core. Prefix caching is on, so a
request resumed elsewhere from prompt + tokens so far (migration) re-prefills only what is not cached.

Sampling: temperature 0 is greedy (token-identical across engines in fp32, hence across migration).
A seeded sampled request draws each token by `sampling.choose_token` at (seed, absolute position), the
transformers backend's rule, applied inside vLLM's sampler by `vllm_sampling.PositionKeyedSampling`; so a
request resumed elsewhere from prompt + tokens so far continues the same sample. (The router gives every
sampled request a seed; a request without one uses vLLM's own sampler.)
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sllmd.engine.base import Engine, LoadReport, Prefill, SamplingParams, check_request, check_token_ids
from sllmd.errors import EngineFailed, InvalidRequest, UnsupportedArchitecture

PROCESSOR_NAME = "sllmd.engine.vllm_sampling:PositionKeyedSampling"  # imported by vLLM's engine-core process

if TYPE_CHECKING:
    from vllm.v1.engine.async_llm import AsyncLLM

    from sllmd.checkpoint.dram import DramCache

# Setting CUDA_VISIBLE_DEVICES for the children is process-wide: engines on CUDA start one at a time.
_cuda_env_lock = threading.Lock()


def _visible_device(index: int) -> str:
    """The CUDA_VISIBLE_DEVICES entry the daemon's device `cuda:index` stands for."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible.split(",")[index] if visible else str(index)


def _vllm_version() -> str:
    import vllm

    return vllm.__version__


class VllmPrefill(Prefill):
    """On vLLM a sequence's KV cache lives in the engine's prefix cache, shared by content: `extend` runs the
    ids so far as a one-token request (output dropped), so the blocks are cached for what comes next."""

    engine: VllmEngine

    async def _compute(self, token_ids: list[int]) -> None:
        await self.engine.fill_prefix_cache(self.token_ids + token_ids)
        self.token_ids += token_ids


class VllmEngine(Engine):
    """Serves one checkpoint directory with vLLM on `"cpu"` or `"cuda:N"`.

    `start()` and `stop()` are awaited from one event loop, which is also the loop every `generate()`
    runs on (vLLM's client binds its sockets to it).
    """

    def __init__(self, checkpoint_dir: Path, device: str = "cpu", *, dtype: str = "float32",
                 max_model_len: int | None = None, dram_cache: DramCache | None = None,
                 kv_cache_bytes: int | None = None) -> None:
        """`checkpoint_dir`: an sllmd v1 checkpoint or a Hugging Face directory. `dtype`: the serving dtype (a
        deployment's, resolved from the weights when it asked for "auto": vLLM's own "auto" would serve a float32
        checkpoint in 16 bits, unlike the transformers backend). `max_model_len`: None for the model's own.
        `dram_cache` is accepted for the common factory signature and not used: vLLM's worker process cannot see
        it (see the module docstring). `kv_cache_bytes`: KV cache size; None lets vLLM size it (GPU memory
        utilisation; on CPU `VLLM_CPU_KVCACHE_SPACE` GiB, which also overrides this)."""
        self.checkpoint_dir = Path(checkpoint_dir)
        self.device = device
        self.dtype = dtype
        self.max_model_len = max_model_len
        self.kv_cache_bytes = kv_cache_bytes
        self.context_length = 0
        self._vocab_size = 0
        self._llm: AsyncLLM | None = None
        self._num_active = 0

    @classmethod
    def check_model(cls, config: dict[str, Any]) -> None:
        """vLLM's model registry must list the architecture as a text-generation model: not pooling-only, and not
        unlisted (vLLM would then try its generic transformers fallback on it, which sllmd has not checked for
        that architecture; those it lists for that fallback, such as GPT-NeoX, are checked by the matrix tests)."""
        try:
            from vllm.model_executor.models import ModelRegistry
        except ImportError:
            raise InvalidRequest("backend vllm is not installed on this node (the sllmd[vllm] extra)",
                                 param="backend") from None
        archs = config.get("architectures") or []
        name = archs[0] if archs else str(config.get("model_type"))
        registered = ModelRegistry.models.get(name)
        if registered is None:
            raise UnsupportedArchitecture(f"{name} is not in vLLM {_vllm_version()}'s model registry", backend="vllm")
        if not registered.inspect_model_cls().is_text_generation_model:
            raise UnsupportedArchitecture(f"{name} is not a text-generation model in vLLM", backend="vllm")

    @property
    def num_active(self) -> int:
        return self._num_active

    # ---- lifecycle -------------------------------------------------------------------------------

    def _engine_args(self, report_path: Path) -> Any:
        from vllm.engine.arg_utils import AsyncEngineArgs

        from sllmd.engine.vllm_loader import LOAD_FORMAT, REPORT_PATH_KEY

        return AsyncEngineArgs(
            model=str(self.checkpoint_dir),
            load_format=LOAD_FORMAT,
            model_loader_extra_config={REPORT_PATH_KEY: str(report_path)},
            skip_tokenizer_init=True,
            dtype=self.dtype,
            max_model_len=self.max_model_len,
            enable_prefix_caching=True,
            logits_processors=[PROCESSOR_NAME],
            kv_cache_memory_bytes=self.kv_cache_bytes,
            disable_log_stats=True,
        )

    def _create(self, report_path: Path) -> AsyncLLM:
        """Blocking: starts vLLM's processes, loads the weights, sizes the KV cache, warms up."""
        from vllm.v1.engine.async_llm import AsyncLLM

        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        args = self._engine_args(report_path)
        if not self.device.startswith("cuda"):
            return AsyncLLM.from_engine_args(args)
        index = int(self.device.partition(":")[2] or 0)
        with _cuda_env_lock:
            saved = os.environ.get("CUDA_VISIBLE_DEVICES")
            os.environ["CUDA_VISIBLE_DEVICES"] = _visible_device(index)
            try:
                return AsyncLLM.from_engine_args(args)
            finally:
                if saved is None:
                    del os.environ["CUDA_VISIBLE_DEVICES"]
                else:
                    os.environ["CUDA_VISIBLE_DEVICES"] = saved

    async def start(self) -> LoadReport:
        """Start vLLM on the checkpoint; `load_s` is the worker's checkpoint-to-parameters time, `init_s` the
        rest of the wall time until the engine serves (processes, imports, KV cache, warm-up)."""
        if self._llm is not None:
            raise RuntimeError("engine already started")
        from sllmd.engine.vllm_loader import read_report

        t0 = time.perf_counter()
        fd, name = tempfile.mkstemp(prefix="sllmd-vllm-load-", suffix=".json")
        os.close(fd)
        report_path = Path(name)
        try:
            # Off the event loop: construction blocks until vLLM is ready (seconds to minutes).
            self._llm = await asyncio.to_thread(self._create, report_path)
            loaded = read_report(report_path)
        except Exception as e:
            raise EngineFailed(f"could not start vLLM on {self.checkpoint_dir}: {e!r}") from e
        finally:
            report_path.unlink(missing_ok=True)
        model_config = self._llm.model_config
        self.context_length = int(model_config.max_model_len)
        self._vocab_size = int(model_config.get_vocab_size())
        total_s = time.perf_counter() - t0
        return LoadReport(loaded.source_tier, loaded.num_bytes, load_s=loaded.load_s, init_s=total_s - loaded.load_s)

    async def stop(self) -> None:
        """Shut vLLM's processes down and drop the engine. Running requests fail with `EngineFailed`: vLLM's
        output handler sees the engine core go and fails every open stream."""
        llm, self._llm = self._llm, None
        if llm is None:
            return
        if not self._num_active and llm.output_handler is not None:
            llm.output_handler.cancel()  # nobody to fail: spare the log a "handler failed" traceback
        await asyncio.to_thread(llm.shutdown)

    # ---- requests --------------------------------------------------------------------------------

    def _new_prefill(self) -> Prefill:
        return VllmPrefill(self)

    async def fill_prefix_cache(self, token_ids: list[int]) -> None:
        """Compute `token_ids`' KV blocks into vLLM's prefix cache: a one-token greedy request, output dropped."""
        check_token_ids(token_ids, len(token_ids) + 1, vocab_size=self._vocab_size, context_length=self.context_length)
        async for _ in self.generate(token_ids, SamplingParams(max_tokens=1, temperature=0.0)):
            pass

    def _vllm_params(self, params: SamplingParams) -> Any:
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.sampling_params import RequestOutputKind

        from sllmd.engine.vllm_sampling import extra_args

        # A seeded sampled request is drawn by sllmd's position-keyed rule (vllm_sampling): vLLM sees it as
        # greedy over logits where only the chosen token is left. Unseeded ones use vLLM's own sampler.
        is_keyed = params.temperature > 0 and params.seed is not None
        return VllmSamplingParams(
            max_tokens=params.max_tokens,
            temperature=0.0 if is_keyed else params.temperature,
            top_p=1.0 if is_keyed else params.top_p,
            seed=None if is_keyed else params.seed,
            extra_args=extra_args(params) if is_keyed else None,
            # vLLM refuses ids outside the vocabulary; such an id can never be generated, so never stops anything.
            stop_token_ids=sorted(t for t in params.stop_token_ids if 0 <= t < self._vocab_size),
            ignore_eos=True,
            detokenize=False,
            output_kind=RequestOutputKind.DELTA,
        )

    async def generate(self, prompt_ids: list[int], params: SamplingParams, *,
                       prefilled: Prefill | None = None) -> AsyncIterator[int]:
        """Yield new token ids in order. Validation errors are raised before anything is queued. A `prefilled`
        handle's blocks are in the prefix cache already; vLLM finds them by content."""
        llm = self._llm
        if llm is None:
            raise EngineFailed("engine is not running")
        check_request(prompt_ids, params, vocab_size=self._vocab_size, context_length=self.context_length)
        if prefilled is not None:
            prefilled.take(self, prompt_ids)
            prefilled.close()
        from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

        (prompt,) = llm.renderer.render_cmpl([{"prompt_token_ids": list(prompt_ids)}])
        stream = llm.generate(prompt, self._vllm_params(params), request_id=uuid.uuid4().hex)
        self._num_active += 1
        try:
            async for output in stream:
                for token in output.outputs[0].token_ids:
                    yield token
        except (EngineDeadError, EngineGenerateError) as e:
            raise EngineFailed(f"generation failed: {e!r}") from e
        finally:
            self._num_active -= 1
            await stream.aclose()  # unfinished: vLLM aborts the request in the engine core
