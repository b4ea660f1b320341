"""What the worker knows of one instance on this node, and of one model's instances (its runtime).

Plain state shared by the worker's parts (admission, lifecycle) and by a live migration; the only I/O is
waking the tasks that wait on a runtime. Not thread-safe: the event loop only.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Protocol

from sllmd.engine.base import Engine
from sllmd.scheduler.eviction import RequestRate
from sllmd.state.models import Deployment, InstanceRecord, InstanceState
from sllmd.types import LoadReport
from sllmd.worker.devices import Device, engine_device
from sllmd.worker.start_progress import StartProgress


class RunningRequest(Protocol):
    """A request generating on an instance's engine (a migration's `MovableRequest` registers itself)."""

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens: what moving the request elsewhere would prefill."""
        ...


@dataclass(eq=False)
class Instance:
    id: str
    deployment: Deployment
    devices: tuple[Device, ...]  # one, or several for a model spanning GPUs (its num_gpus)
    memory_bytes: int  # held on each of `devices` from its start until its stop ends
    engine: Engine | None = None  # created off the event loop when the start begins
    state: InstanceState = InstanceState.STARTING
    in_flight: int = 0
    started_at: float = field(default_factory=time.time)
    idle_since: float = field(default_factory=time.monotonic)
    load_report: LoadReport | None = None
    estimated_start_s: float = 0.0  # what the estimators predicted for this start, when it began
    estimated_transfer_s: float = 0.0  # ... of which moving bytes over the SSD or the network
    idle_timer: asyncio.TimerHandle | None = None
    starting: asyncio.Task | None = None
    stopped: asyncio.Task | None = None  # set once stopping begins; done when its memory is free again
    requests: set[RunningRequest] = field(default_factory=set)  # generating on this instance's engine now
    is_draining: bool = False  # a migration is cutting its requests over: take no new ones
    progress: StartProgress = field(default_factory=StartProgress)  # how far its start has come

    @property
    def num_tokens(self) -> int:
        """Prompt + generated tokens of every request generating here: what a migration would move
        (its cost is about a·num_tokens + b)."""
        return sum(request.num_tokens for request in self.requests)

    def disarm_idle_timer(self) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None

    def to_record(self, node_id: str) -> InstanceRecord:
        """The replicated record of this instance as it is now, on node `node_id`."""
        return InstanceRecord(self.id, self.deployment.name, node_id, engine_device(self.devices), self.state,
                              self.started_at)


@dataclass(frozen=True, slots=True)
class NoRoom:
    """Why no instance of a model can start on this node now: `reason` names the memory it needs, what the
    devices have free and what holds the rest; `will_free` says whether busy (or starting) instances hold some
    of it, which their requests' end frees, or only instances nobody may evict (kept for min_instances)."""

    reason: str
    will_free: bool


@dataclass(eq=False)
class ModelRuntime:
    """This node's instances of one deployment and the requests waiting for one."""

    deployment: Deployment
    instances: list[Instance] = field(default_factory=list)  # starting or ready; never stopping
    num_waiting: int = 0
    start_error: BaseException | None = None
    is_removed: bool = False
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    # An engine prestarting for it (`Worker.prestart`): (estimated seconds, time.time() it began). Its first
    # instance waits for it and takes the engine it parks.
    prestarting: tuple[float, float] | None = None
    request_rate: RequestRate = field(default_factory=RequestRate)  # arrivals here (what evicting it costs)
    no_room: NoRoom | None = None  # why its last scaling could not start an instance it wanted; None: it could

    def ready(self) -> list[Instance]:
        return [i for i in self.instances if i.state is InstanceState.READY and not i.is_draining]

    def num_starting(self) -> int:
        return sum(1 for i in self.instances if i.state is InstanceState.STARTING)

    def num_in_flight(self) -> int:
        return sum(i.in_flight for i in self.instances)

    def demand(self) -> int:
        return self.num_waiting + self.num_in_flight()

    async def notify(self) -> None:
        """Wake every request waiting on `changed` to look at the runtime again."""
        async with self.changed:
            self.changed.notify_all()
