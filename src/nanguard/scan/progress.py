"""A progress line on stderr for long scans: only on a terminal, and only once a scan passes ~1 s.

Short scans and redirected output stay silent, so logs and ``--json`` pipelines never see it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


class Progress:
    """Counts bytes done against a known total and redraws one line at most ten times a second."""

    def __init__(
        self,
        total_bytes: int,
        stream: TextIO | None = None,
        *,
        delay: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = max(1, total_bytes)
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.delay = delay
        self.clock = clock
        self.started = clock()
        self.done = 0
        self.label = ""
        self._last_draw = 0.0
        self._drawn = False

    def file(self, label: str) -> None:
        self.label = label

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        if not self.enabled:
            return
        now = self.clock()
        if now - self.started < self.delay or now - self._last_draw < 0.1:
            return
        self._last_draw = now
        fraction = min(1.0, self.done / self.total)
        bar = "#" * int(fraction * 20)
        rate = self.done / max(now - self.started, 1e-9)
        line = f"\rscanning [{bar:<20}] {fraction:4.0%} {_size(self.done)}/{_size(self.total)} {_size(rate)}/s {self.label}"
        self.stream.write(line[:120])
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\r" + " " * 120 + "\r")
            self.stream.flush()
            self._drawn = False
