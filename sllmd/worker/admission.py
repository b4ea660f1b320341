"""Requests to ready instances: which instance a request gets, and how long it may wait for one.

A request takes the least-loaded ready instance of its model (`pick_instance`). With none ready it waits,
in a bounded queue (`serving.max_queue_per_model`) for a bounded time: `serving.queue_timeout_s`, or longer
while a start of the model is within its estimate, up to `serving.max_start_wait_s` (`cold_start_wait_s`).
Whether an instance starts for it is the scaler's decision (`scale`), asked whenever demand changes.

Not thread-safe: the event loop only.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager

from sllmd.checkpoint.errors import as_store_full
from sllmd.config import ServingConfig
from sllmd.errors import EngineFailed, ModelNotFound, Overloaded, QueueFull, SllmdError
from sllmd.metrics import Metrics
from sllmd.scheduler.autoscale import cold_start_wait_s, pick_instance
from sllmd.state.models import InstanceState
from sllmd.worker.instance import Instance, ModelRuntime
from sllmd.worker.start_progress import StartView, StartWatch


class Admission:
    def __init__(self, runtimes: Mapping[str, ModelRuntime], serving: ServingConfig, metrics: Metrics, *,
                 scale: Callable[[ModelRuntime], None], keep_alive: Callable[[ModelRuntime, Instance], None],
                 engine_died: Callable[[ModelRuntime, Instance], None]) -> None:
        """`runtimes`: the worker's, by model name (the worker adds and removes them). `scale(runtime)` starts
        the instances the model's demand calls for; `keep_alive(runtime, instance)` arms the keep-alive timer
        of an instance that just went idle; `engine_died(runtime, instance)` stops an instance whose engine
        died under a request."""
        self.runtimes = runtimes
        self.serving = serving
        self.metrics = metrics
        self.scale = scale
        self.keep_alive = keep_alive
        self.engine_died = engine_died

    @asynccontextmanager
    async def lease(self, model: str, watch: StartWatch | None = None) -> AsyncIterator[Instance]:
        """A ready instance of `model` for one request, held until the block exits. ModelNotFound for a
        model not deployed (or removed while waiting), QueueFull (429) when the queue is full, Overloaded
        when the wait ran out, EngineFailed when the start it waited for failed. `watch` hears when the
        request begins to wait, and sees the start it waits for."""
        runtime = self.runtimes.get(model)
        if runtime is None:
            raise ModelNotFound(model)
        if runtime.start_error is not None and not runtime.num_starting():
            runtime.start_error = None  # a new request earns a new attempt; waiters of the failed one got the error
        runtime.request_rate.observe(time.monotonic())
        self._admit(runtime)
        instance = self._pick(runtime)
        if instance is None:
            if watch is not None:
                watch.waiting(lambda: _first_start(runtime))
            instance = await self._wait_for_instance(runtime)
        async with self.hold(runtime, instance):
            yield instance

    @asynccontextmanager
    async def hold(self, runtime: ModelRuntime, instance: Instance) -> AsyncIterator[Instance]:
        """Count one request on `instance` (no keep-alive stop meanwhile) until the block exits. A
        migration's destination holds the instance its prefilled caches live on this way."""
        instance.in_flight += 1
        instance.disarm_idle_timer()
        self.scale(runtime)
        try:
            yield instance
        finally:
            instance.in_flight -= 1
            if instance.state is InstanceState.READY and instance.engine is not None and instance.engine.has_died:
                self.engine_died(runtime, instance)  # its requests failed; the next ones get a new instance
            elif instance.in_flight == 0 and instance.state is InstanceState.READY:
                instance.idle_since = time.monotonic()
                self.keep_alive(runtime, instance)

    def _pick(self, runtime: ModelRuntime) -> Instance | None:
        ready = runtime.ready()
        if not ready:
            return None
        return ready[pick_instance([i.in_flight for i in ready], runtime.deployment.autoscaling.target_concurrency)]

    @property
    def _retry_after_s(self) -> int:
        return max(1, round(self.serving.queue_timeout_s / 4))

    def _admit(self, runtime: ModelRuntime) -> None:
        """Bound a model's load: its ready instances at target concurrency, plus `max_queue_per_model`
        more (waiting through a cold start, or over target on a ready instance). Beyond that: 429."""
        policy = runtime.deployment.autoscaling
        capacity = len(runtime.ready()) * policy.target_concurrency + self.serving.max_queue_per_model
        if runtime.demand() >= capacity:
            raise QueueFull(runtime.deployment.name, capacity)

    async def _wait_for_instance(self, runtime: ModelRuntime) -> Instance:
        name = runtime.deployment.name
        loop = asyncio.get_running_loop()
        began = loop.time()
        runtime.num_waiting += 1
        self.metrics.queued.labels(name).set(runtime.num_waiting)
        try:
            self.scale(runtime)

            def outcome() -> Instance | BaseException | None:
                if runtime.is_removed:
                    return ModelNotFound(name)
                picked = self._pick(runtime)
                if picked is not None:
                    return picked
                if runtime.start_error is not None and not runtime.num_starting():
                    return start_failure(name, runtime.start_error)
                if runtime.no_room is not None and not runtime.no_room.will_free and not _starts(runtime, 0.0):
                    # Only instances nobody may evict hold the memory: waiting would not change that.
                    return Overloaded(f"model '{name}' cannot start: {runtime.no_room.reason}",
                                      retry_after_s=self._retry_after_s, code="no_capacity")
                return None

            async with runtime.changed:
                # The bound is asked again on every change and once it passes: a start that began meanwhile
                # moves it later, one that went away earlier.
                while (result := outcome()) is None:
                    waited_s, starts = loop.time() - began, _starts(runtime, time.time())
                    bound_s = cold_start_wait_s(self.serving.queue_timeout_s, self.serving.max_start_wait_s,
                                                waited_s=waited_s, starts=starts)
                    if waited_s >= bound_s:
                        # The start itself carries on: a slow one that ends serves the next requests and
                        # corrects its engine kind's estimate; stopping it would not (the next start would be
                        # as slow and stopped again), nor could it end a start hung inside its engine (a stop
                        # waits for the start).
                        if not starts and runtime.no_room is not None:
                            raise Overloaded(f"model '{name}' could not start within {bound_s:.1f}s: "
                                             f"{runtime.no_room.reason}", retry_after_s=self._retry_after_s,
                                             code="no_capacity")
                        raise Overloaded(f"model '{name}' did not become ready within {bound_s:.1f}s: "
                                         + _describe_starts(starts), retry_after_s=self._retry_after_s,
                                         code="cold_start_timeout")
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(bound_s - waited_s):
                            await runtime.changed.wait()
        finally:
            runtime.num_waiting -= 1
            self.metrics.queued.labels(name).set(runtime.num_waiting)
        if isinstance(result, BaseException):
            raise result
        return result


def _starts(runtime: ModelRuntime, now: float) -> list[tuple[float, float]]:
    """(estimated seconds, seconds since it began) of each instance of the model starting here, and of an
    engine prestarting for it, at time.time() `now`."""
    starts = [(i.estimated_start_s, now - i.started_at) for i in runtime.instances
              if i.state is InstanceState.STARTING]
    if runtime.prestarting is not None:
        estimated_s, began = runtime.prestarting
        starts.append((estimated_s, now - began))
    return starts


def _first_start(runtime: ModelRuntime) -> StartView | None:
    """The progress of the start a waiter of `runtime` most likely gets first, its oldest; None when none of
    its instances is starting here."""
    starting = [i for i in runtime.instances if i.state is InstanceState.STARTING]
    return min(starting, key=lambda i: i.progress.began).progress.view() if starting else None


def _describe_starts(starts: list[tuple[float, float]]) -> str:
    """Why a request gave up waiting, for its 503: each start it waited for, its estimate and how long it ran."""
    if not starts:
        return "no instance of it is starting here"
    return "; ".join(f"its start, estimated at {estimated_s:.1f}s, has run {running_s:.1f}s"
                     for estimated_s, running_s in starts)


def start_failure(model: str, error: BaseException) -> SllmdError:
    """The client's error for a start of `model` that failed with `error`: a capacity condition of the node (its
    store is full) is itself (503, retry later); any other is a 500 naming the cause without a server path."""
    if (full := as_store_full(error)) is not None:
        return full
    # An OSError's str() names the file it failed on: the client gets only what went wrong.
    reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    return EngineFailed(f"model '{model}' failed to start: {reason}")
