"""A set of background tasks owned by one object: spawned, kept alive until done, and ended together.

The event loop holds only weak references to tasks, so an owner must keep each one until it finishes;
`TaskSet` does that and drops it when done. A task's exception is left where asyncio puts it (retrieved by
whoever awaits the task, else logged by asyncio), and `close` swallows exceptions.

Not thread-safe: the event loop only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class TaskSet:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, coroutine: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Run `coroutine` as a task of this set; the task is returned for the caller to await or keep."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self, *, cancel: bool = True) -> None:
        """Cancel every task (with `cancel=False`: let them finish) and wait until none is left, including
        tasks spawned meanwhile by the ones ending."""
        while self._tasks:
            tasks = list(self._tasks)
            if cancel:
                for task in tasks:
                    task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
