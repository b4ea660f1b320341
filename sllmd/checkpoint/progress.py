"""Progress of a long byte-moving job, for people: a one-line bar on a terminal and byte counts in text."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TextIO


def human_bytes(nbytes: float) -> str:
    """`nbytes` for people: "512 B", "1.5 MiB", "16.0 GiB"."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError


class ProgressBar:
    """One line on `stream`: a bar, bytes done / total and the rate; redrawn at most 10 times a second.
    `callback(done, total)` hears the same, as often."""

    def __init__(self, total: int, stream: TextIO | None, label: str = "converting",
                 callback: Callable[[int, int], None] | None = None) -> None:
        self._total, self._stream, self._label, self._callback = max(total, 1), stream, label, callback
        self._done, self._start, self._drawn = 0, time.monotonic(), 0.0

    def advance(self, nbytes: int) -> None:
        self._done += nbytes
        if time.monotonic() - self._drawn >= 0.1:
            self._draw()

    def _draw(self) -> None:
        self._drawn = time.monotonic()
        if self._callback is not None:
            self._callback(self._done, self._total)
        if self._stream is not None:
            self._draw_bar()

    def _draw_bar(self) -> None:
        assert self._stream is not None
        fraction = min(self._done / self._total, 1.0)
        bar = "#" * int(fraction * 30)
        rate = self._done / max(self._drawn - self._start, 1e-9)
        self._stream.write(f"\r{self._label} [{bar:<30}] {fraction:6.1%} {human_bytes(self._done)} / "
                           f"{human_bytes(self._total)}  {human_bytes(rate)}/s ")
        self._stream.flush()

    def close(self) -> None:
        self._draw()
        if self._stream is not None:
            self._stream.write("\n")
            self._stream.flush()
