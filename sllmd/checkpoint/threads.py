"""The loader's reader threads: a few threads taking work items in order, the first failure cancelling the rest.

`start_threads` hands items out in the order given (the loader gives them in file order, so the disk sees
near-sequential reads); `ReaderThreads` is what the caller holds to fail, join and re-raise. The threads are
daemons named `sllmd-reader-N`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(eq=False)
class ReaderThreads:
    """Running threads, their shared cancel event and the errors they (or the caller, through `fail`) raised."""

    workers: list[threading.Thread]
    cancel: threading.Event
    errors: list[BaseException]

    def fail(self, exc: BaseException) -> None:
        """Record `exc` and cancel: every thread stops taking items."""
        self.errors.append(exc)
        self.cancel.set()

    def join(self) -> None:
        for worker in self.workers:
            worker.join()

    def raise_first(self) -> None:
        if self.errors:
            raise self.errors[0]


def start_threads(items: Sequence[T], num_threads: int, work: Callable[[T, threading.Event], None],
                  on_exit: Callable[[], None] = lambda: None) -> ReaderThreads:
    """Up to `num_threads` threads taking items in order until none is left or one fails (the first
    failure cancels the rest). `on_exit` runs once in each thread as it ends, whatever happened."""
    lock, todo = threading.Lock(), iter(items)
    threads = ReaderThreads([], threading.Event(), [])

    def loop() -> None:
        try:
            while not threads.cancel.is_set():
                with lock:
                    item = next(todo, None)
                if item is None:
                    return
                work(item, threads.cancel)
        except BaseException as exc:
            threads.fail(exc)
        finally:
            on_exit()

    for i in range(max(1, min(num_threads, len(items)))):
        worker = threading.Thread(target=loop, name=f"sllmd-reader-{i}", daemon=True)
        threads.workers.append(worker)
        worker.start()
    return threads


def run_threads(items: Sequence[T], num_threads: int, work: Callable[[T, threading.Event], None]) -> None:
    """`start_threads`, then wait for them all; raises the first failure."""
    threads = start_threads(items, num_threads, work)
    threads.join()
    threads.raise_first()
