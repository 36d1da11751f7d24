"""The scan's progress bar on stderr, drawn with ``rich``: only on a terminal, only once a scan passes ~1 s.

Short scans and redirected output stay silent, so logs and ``--json`` pipelines never see it. On a
terminal the bar is in colour unless ``NO_COLOR`` is set (then plain). ``rich`` is imported only when
a bar is about to be drawn, so ``import nanguard`` and short scans never load it.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO


def size_text(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


class Progress:
    """Counts bytes done against a known total; shows a rich bar once ``delay`` seconds have passed."""

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
        self._bar: Any = None
        self._task: Any = None
        self._last_draw = float("-inf")

    def file(self, label: str) -> None:
        self.label = label
        if self._bar is not None:
            self._bar.update(self._task, description=f"scanning {label}")

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        if not self.enabled:
            return
        now = self.clock()
        if self._bar is None:
            if now - self.started < self.delay:
                return
            self._start()
        self._bar.update(self._task, completed=min(self.done, self.total))
        if now - self._last_draw >= 0.1:  # redraw at most ten times a second
            self._last_draw = now
            self._bar.refresh()

    def _start(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            TaskProgressColumn,
            TextColumn,
            TransferSpeedColumn,
        )
        from rich.progress import Progress as RichProgress

        no_color = "NO_COLOR" in os.environ
        console = Console(file=self.stream, force_terminal=True, no_color=no_color, highlight=False)
        self._bar = RichProgress(
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            DownloadColumn(binary_units=False),
            TransferSpeedColumn(),
            console=console,
            transient=True,
            auto_refresh=False,
        )
        self._bar.start()
        self._task = self._bar.add_task(f"scanning {self.label}", total=self.total, completed=self.done)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.refresh()
            self._bar.stop()
            self._bar = None
