"""Where the guard writes down what it saw and did: sinks behind one small protocol.

``events.jsonl`` gets one JSON object per event, flushed at once, so a run that dies still leaves its
events. ``history.csv`` gets one row per step (or per ``history_every`` steps), flushed in batches
because it is written on the hot path. Consoles and TensorBoard implement the same protocol.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Protocol

HISTORY_COLUMNS = (
    "step",
    "time",
    "loss",
    "grad_norm",
    "lr",
    "lr_multiplier",
    "loss_scale",
    "action",
    "trigger",
    "skipped_total",
    "rollbacks_total",
    "clipped_total",
)


class Sink(Protocol):
    """Receives every history row and every event; ``close`` is called once at the end of the run."""

    def on_step(self, row: dict[str, Any]) -> None: ...

    def on_event(self, event: dict[str, Any]) -> None: ...

    def close(self, summary: dict[str, Any] | None = None) -> None: ...


class NullSink:
    """The do-nothing sink: lets the guard call sinks unconditionally."""

    def on_step(self, row: dict[str, Any]) -> None:
        pass

    def on_event(self, event: dict[str, Any]) -> None:
        pass

    def close(self, summary: dict[str, Any] | None = None) -> None:
        pass


def _format_cell(value: Any) -> Any:
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    return "" if value is None else value


class EventLog:
    """Appends events to ``events.jsonl``; each line is complete and flushed before the call returns."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: io.TextIOWrapper | None = None

    def on_step(self, row: dict[str, Any]) -> None:
        pass

    def on_event(self, event: dict[str, Any]) -> None:
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        self._file.write(json.dumps(event, allow_nan=False, default=str) + "\n")
        self._file.flush()

    def close(self, summary: dict[str, Any] | None = None) -> None:
        if self._file is None:
            self.path.touch()
        else:
            self._file.close()
            self._file = None


class HistoryLog:
    """Writes ``history.csv``; buffered, flushed every ``flush_every`` rows and on close."""

    def __init__(self, path: str | os.PathLike[str], flush_every: int = 50) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "w", newline="", encoding="utf-8")  # noqa: SIM115
        self._writer = csv.writer(self._file)
        self._writer.writerow(HISTORY_COLUMNS)
        self._pending = 0
        self._flush_every = flush_every

    def on_step(self, row: dict[str, Any]) -> None:
        self._writer.writerow([_format_cell(row.get(column)) for column in HISTORY_COLUMNS])
        self._pending += 1
        if self._pending >= self._flush_every:
            self._file.flush()
            self._pending = 0

    def on_event(self, event: dict[str, Any]) -> None:
        self._file.flush()

    def close(self, summary: dict[str, Any] | None = None) -> None:
        if not self._file.closed:
            self._file.close()


def write_json_atomic(path: str | os.PathLike[str], payload: Any) -> None:
    """Write JSON so that a reader never sees a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, path)
