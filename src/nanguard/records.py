"""Where a run is written down: one :class:`RunRecords` per run directory, for a Guard and zero-code alike.

It owns the out dir (an earlier run's files are set aside into ``previous/<time>/`` first), the sinks
(``events.jsonl``, ``history.csv``, the live console, TensorBoard, and any the caller adds), the
``summary.json`` and the report. Only the writer rank writes; every rank keeps the same tallies.

``events.jsonl`` gets one JSON object per event, flushed at once, so a run that dies still leaves its
events. ``history.csv`` gets one row per step (or per ``history_every`` steps), flushed in batches
because it is written on the hot path. Consoles and TensorBoard implement the same :class:`Sink`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from nanguard.config import GuardConfig
from nanguard.events import Event

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
# What a run writes into its out dir; an earlier run's copies are set aside, never overwritten.
RUN_FILES = ("events.jsonl", "history.csv", "summary.json", "report.html", "report.md", "emergency_checkpoint.pt")
RUN_FOLDERS = ("report_files", "tensorboard")


class Sink(Protocol):
    """Receives every history row and every event; ``close`` is called once at the end of the run."""

    def on_step(self, row: dict[str, Any]) -> None: ...

    def on_event(self, event: dict[str, Any]) -> None: ...

    def close(self, summary: dict[str, Any] | None = None) -> None: ...


class NullSink:
    """The do-nothing sink."""

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
    """Writes ``history.csv`` in batches: rows are kept as they come and formatted and written every
    ``flush_every`` rows, before each event, and on close (the hot path only appends a row)."""

    def __init__(self, path: str | os.PathLike[str], flush_every: int = 50) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "w", newline="", encoding="utf-8")  # noqa: SIM115
        self._writer = csv.writer(self._file)
        self._writer.writerow(HISTORY_COLUMNS)
        self._rows: list[dict[str, Any]] = []
        self._flush_every = flush_every

    def on_step(self, row: dict[str, Any]) -> None:
        self._rows.append(row)
        if len(self._rows) >= self._flush_every:
            self.flush()

    def flush(self) -> None:
        if self._file.closed:
            return
        for row in self._rows:
            self._writer.writerow([_format_cell(row.get(column)) for column in HISTORY_COLUMNS])
        self._rows.clear()
        self._file.flush()

    def on_event(self, event: dict[str, Any]) -> None:
        self.flush()

    def close(self, summary: dict[str, Any] | None = None) -> None:
        self.flush()
        if not self._file.closed:
            self._file.close()


def write_json_atomic(path: str | os.PathLike[str], payload: Any) -> None:
    """Write JSON so that a reader never sees a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, path)


def set_aside_previous_run(out_dir: Path) -> Path | None:
    """Move an earlier run's files into ``previous/<time>/`` so this run starts clean and nothing is lost."""
    existing = [out_dir / name for name in RUN_FILES if (out_dir / name).exists()]
    folders = [out_dir / name for name in RUN_FOLDERS if (out_dir / name).is_dir()]
    if not existing and not folders:
        return None
    target = out_dir / "previous" / time.strftime("%Y%m%d-%H%M%S")
    suffix = 0
    while target.exists():
        suffix += 1
        target = target.with_name(f"{target.name.split('.')[0]}.{suffix}")
    target.mkdir(parents=True)
    for path in existing + folders:
        path.rename(target / path.name)
    return target


@dataclass
class Tally:
    """A guard's running totals: what history rows and the summary report."""

    steps: int = 0
    skipped: int = 0
    rollbacks: int = 0
    clipped: int = 0

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("steps", "skipped", "rollbacks", "clipped"):
            setattr(self, key, int(state.get(key, getattr(self, key))))


def merge_summaries(summaries: Sequence[dict[str, Any]], status: str) -> dict[str, Any]:
    """One summary for a run with several guards (zero-code mode guards every optimizer it sees)."""
    if len(summaries) == 1:
        return {**summaries[0], "status": status}
    merged: dict[str, Any] = {"status": status, "optimizers": len(summaries)}
    for key in ("steps", "skipped", "rollbacks", "clipped", "events"):
        merged[key] = sum(s.get(key, 0) for s in summaries)
    merged["causes"] = sorted({c for s in summaries for c in s.get("causes", [])})
    merged["aborted"] = any(s.get("aborted") for s in summaries)
    merged["seconds"] = max((s.get("seconds", 0.0) for s in summaries), default=0.0)
    return merged


class RunRecords:
    """The out dir and every sink of one run. Several guards may share one (zero-code mode)."""

    def __init__(self, out_dir: str | os.PathLike[str], config: GuardConfig, *, writer: bool = True,
                 sinks: Iterable[Sink] = ()) -> None:
        self.out_dir = Path(out_dir)
        self.config = config
        self.writer = writer
        self.started = time.time()
        self.sinks: list[Sink] = []
        self._closed = False
        if writer:
            set_aside_previous_run(self.out_dir)
            self.sinks = [EventLog(self.out_dir / "events.jsonl"), HistoryLog(self.out_dir / "history.csv")]
            self.sinks += _optional_sinks(config, self.out_dir)
        self.sinks += list(sinks)

    @property
    def events_path(self) -> Path:
        return self.out_dir / "events.jsonl"

    def elapsed(self) -> float:
        return round(time.time() - self.started, 4)

    def on_step(self, row: dict[str, Any]) -> None:
        if self.writer:
            for sink in self.sinks:
                sink.on_step(row)

    def on_event(self, event: Event) -> None:
        if self.writer:
            payload = event.to_dict()
            for sink in self.sinks:
                sink.on_event(payload)

    def close(self, summary: dict[str, Any], *, announce: bool = False) -> None:
        """Write ``summary.json``, finish the file sinks, render the report, then close the other sinks (once).

        The report is rendered from the finished ``events.jsonl``/``history.csv`` and before the other sinks
        close, so W&B and MLflow can upload it and the console can say where it is.
        """
        if self._closed:
            return
        self._closed = True
        if not self.writer:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.out_dir / "summary.json", summary)
        files, others = self.sinks[:2], self.sinks[2:]
        for sink in files:
            sink.close(summary)
        report = self._write_report() if self.config.report else None
        if report is not None:
            summary = {**summary, "report": str(report)}
        for sink in others:
            sink.close(summary)
        if announce and report is not None and not self.config.console:
            print(f"[nanguard] report: {report}", file=sys.stderr)

    def _write_report(self) -> Path | None:
        try:
            from nanguard.report import render_report
        except ImportError:
            return None
        try:
            return Path(render_report(self.out_dir))
        except Exception as exc:  # a report must never turn a finished run into a failed one
            warnings.warn(f"nanguard: could not write the report in {self.out_dir}: {exc}", stacklevel=3)
            return None


def _optional_sinks(config: GuardConfig, out_dir: Path) -> list[Sink]:
    from nanguard.sinks import optional_sinks

    return optional_sinks(out_dir, console=config.console, tensorboard=config.tensorboard, wandb=config.wandb,
                          mlflow=config.mlflow)


__all__ = ["HISTORY_COLUMNS", "RUN_FILES", "EventLog", "HistoryLog", "NullSink", "RunRecords", "Sink", "Tally",
           "merge_summaries", "set_aside_previous_run", "write_json_atomic"]
