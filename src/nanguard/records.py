"""Where a run is written down: one :class:`RunRecords` per run directory, for a Guard and zero-code alike.

It owns the out dir (taken through :mod:`nanguard.outdir`: one writer, a manifest, an earlier run's files
set aside into ``previous/<time>/``, nothing of the user's touched), the sinks (``events.jsonl``,
``history.csv``, the live console, TensorBoard, and any the caller adds), the ``summary.json`` and the
report. Only the writer rank writes; every rank keeps the same tallies. No record can stop training: a
failed write is warned about once, that sink stops, and the summary says what is missing.

``events.jsonl`` gets one JSON object per event, flushed at once, so a run that dies still leaves its
events. ``history.csv`` gets one row per step (or per ``history_every`` steps), flushed in batches
because it is written on the hot path. Consoles and TensorBoard implement the same :class:`Sink`.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from nanguard.config import GuardConfig
from nanguard.events import Event
from nanguard.outdir import OutDir, open_out_dir, write_json_atomic
from nanguard.sinks._safe import FailSafe, describe_failure, warn_once

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
# What a run may write into its out dir (see ``planned_names``); an earlier run's copies are set aside
# (only those its manifest lists), never overwritten.
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


class EventLog(FailSafe):
    """Appends events to ``events.jsonl``; each line is complete and flushed before the call returns.

    A failed write (a full disk) stops this log with one warning; training goes on (:mod:`nanguard.sinks._safe`).
    """

    sink_name = "events.jsonl"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.sink_path = str(self.path)
        self._file: io.TextIOWrapper | None = None
        self._safely("create", _make_parent, self.path)

    def on_step(self, row: dict[str, Any]) -> None:
        pass

    def on_event(self, event: dict[str, Any]) -> None:
        if self.failed is None:
            self._safely("write", self._append, json.dumps(event, allow_nan=False, default=str) + "\n")

    def _append(self, line: str) -> None:
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        self._file.write(line)
        self._file.flush()

    def close(self, summary: dict[str, Any] | None = None) -> None:
        if self._file is None:
            if self.failed is None:
                self._safely("create", self.path.touch)
            return
        handle, self._file = self._file, None
        _close_quietly(handle)


class HistoryLog(FailSafe):
    """Writes ``history.csv`` in batches: rows are kept as they come and formatted and written every
    ``flush_every`` rows, before each event, and on close (the hot path only appends a row).

    A failed write (a full disk) stops this log with one warning and drops the rows it held; training goes on.
    """

    sink_name = "history.csv"

    def __init__(self, path: str | os.PathLike[str], flush_every: int = 50) -> None:
        self.path = Path(path)
        self.sink_path = str(self.path)
        self._rows: list[dict[str, Any]] = []
        self._flush_every = flush_every
        self._file: io.TextIOWrapper | None = None
        self._safely("create", self._open)

    def _open(self) -> None:
        _make_parent(self.path)
        self._file = open(self.path, "w", newline="", encoding="utf-8")  # noqa: SIM115
        self._writer = csv.writer(self._file)
        self._writer.writerow(HISTORY_COLUMNS)

    def on_step(self, row: dict[str, Any]) -> None:
        if self.failed is not None:
            return
        self._rows.append(row)
        if len(self._rows) >= self._flush_every:
            self.flush()

    def flush(self) -> None:
        if self._file is None or self._file.closed or self.failed is not None:
            self._rows.clear()
            return
        self._safely("write", self._write_rows)
        self._rows.clear()

    def _write_rows(self) -> None:
        assert self._file is not None
        for row in self._rows:
            self._writer.writerow([_format_cell(row.get(column)) for column in HISTORY_COLUMNS])
        self._file.flush()

    def on_event(self, event: dict[str, Any]) -> None:
        self.flush()

    def close(self, summary: dict[str, Any] | None = None) -> None:
        self.flush()
        if self._file is not None and not self._file.closed:
            _close_quietly(self._file)

    def _fail(self, what: str, exc: BaseException) -> None:
        super()._fail(what, exc)
        if self._file is not None:
            _close_quietly(self._file)


def _make_parent(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)


def _close_quietly(handle: IO[Any]) -> None:
    """Close a file whose last write may have failed: the flush inside ``close`` would fail again."""
    try:
        handle.close()
    except OSError:
        with contextlib.suppress(OSError, ValueError):
            handle.close()


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
    """The out dir and every sink of one run. Several guards may share one (zero-code mode).

    Nothing here may stop the training it records: a sink that raises (a full disk, a broken pipe, a
    caller's sink with a bug) is warned about once and dropped, ``summary.json`` and the report are
    best-effort, and :attr:`failures` lists what went unrecorded (it goes into the summary and one
    closing line on stderr). The out dir itself follows :mod:`nanguard.outdir`: one writer, a manifest,
    nothing of the user's touched; an out dir that can never work is a ``UsageError`` here, before training.
    """

    def __init__(self, out_dir: str | os.PathLike[str], config: GuardConfig, *, writer: bool = True,
                 sinks: Iterable[Sink] = ()) -> None:
        self.requested_dir = Path(out_dir)
        self.out_dir = self.requested_dir
        self.config = config
        self.writer = writer
        self.started = time.time()
        self._dir: OutDir | None = None
        self._files: list[Sink] = []
        self._others: list[Sink] = []
        self._dropped: list[str] = []
        self._closed = False
        if writer:
            self._open()
        self._others += list(sinks)
        self._live: list[Sink] = [*self._files, *self._others]

    def _open(self) -> None:
        try:
            self._dir, notes = open_out_dir(self.requested_dir, planned_names(self.config))
        except OSError as exc:  # a full disk (a configuration problem is a UsageError and propagates)
            self._drop_all(describe_failure("creation", exc, str(self.requested_dir)))
            self._others = _optional_sinks(self.config, self.out_dir, tensorboard=False)
            return
        self.out_dir = self._dir.path
        for line in notes:
            tell(f"[nanguard] {line}")
        events, history = self._dir.claim("events.jsonl"), self._dir.claim("history.csv")
        self._files = [EventLog(events) if events else NullSink(), HistoryLog(history) if history else NullSink()]
        tensorboard = bool(self.config.tensorboard) and self._dir.claim("tensorboard") is not None
        try:
            self._others = _optional_sinks(self.config, self.out_dir, tensorboard=tensorboard)
        except OSError as exc:  # TensorBoard could not create its folder: the other sinks still work
            self._dropped.append(f"TensorBoard: {describe_failure('creation', exc, str(self.out_dir / 'tensorboard'))}")
            self._others = _optional_sinks(self.config, self.out_dir, tensorboard=False)

    def _drop_all(self, failure: str) -> None:
        self._dropped.append(f"out dir: {failure}")
        warn_once(f"nanguard: records stopped after {failure}; training continues without events.jsonl, "
                  "history.csv and the report")

    @property
    def sinks(self) -> list[Sink]:
        """The sinks still receiving records, file sinks first."""
        return list(self._live)

    @property
    def events_path(self) -> Path:
        return self.out_dir / "events.jsonl"

    @property
    def failures(self) -> list[str]:
        """What could not be recorded: one line per sink or file that stopped, with the path and errno."""
        lines = [f"{getattr(sink, 'sink_name', type(sink).__name__)}: {failed}"
                 for sink in [*self._files, *self._others] if (failed := getattr(sink, "failed", None))]
        return lines + self._dropped

    def elapsed(self) -> float:
        return round(time.time() - self.started, 4)

    def on_step(self, row: dict[str, Any]) -> None:
        if self.writer:
            for sink in self._live:
                try:
                    sink.on_step(row)
                except Exception as exc:  # a record must never stop the training it records
                    self._drop(sink, "history row", exc)

    def on_event(self, event: Event) -> None:
        if self.writer:
            payload = event.to_dict()
            for sink in self._live:
                try:
                    sink.on_event(payload)
                except Exception as exc:
                    self._drop(sink, "event", exc)

    def _drop(self, sink: Sink, what: str, exc: BaseException) -> None:
        self._live = [s for s in self._live if s is not sink]
        name = getattr(sink, "sink_name", type(sink).__name__)
        failure = describe_failure(what, exc)
        self._dropped.append(f"{name}: {failure}")
        warn_once(f"nanguard: {name} stopped after {failure}; training continues without it")

    def checkpoint_path(self) -> Path | None:
        """Where the emergency checkpoint goes (claimed in the manifest first); None without an out dir."""
        if not self.writer or self._dir is None:
            return None
        return self._dir.unique("emergency_checkpoint.pt")

    def close(self, summary: dict[str, Any], *, announce: bool = False) -> None:
        """Finish the file sinks, write ``summary.json``, render the report, then close the other sinks (once).

        The report is rendered from the finished ``events.jsonl``/``history.csv`` and before the other sinks
        close, so W&B and MLflow can upload it and the console can say where it is. The out dir's lock is
        released last, whatever failed on the way.
        """
        if self._closed:
            return
        self._closed = True
        if not self.writer:
            return
        try:
            self._finish(summary, announce)
        finally:
            if self._dir is not None:
                self._dir.release()

    def _finish(self, summary: dict[str, Any], announce: bool) -> None:
        for sink in self._files:
            self._close_sink(sink, summary)
        summary = dict(summary)
        if self.failures:
            summary["records_incomplete"] = self.failures
        if self._dir is not None:
            self._write_summary(summary)
        report = self._write_report() if self.config.report and self._dir is not None else None
        if report is not None:
            summary = {**summary, "report": str(report)}
        for sink in self._others:
            self._close_sink(sink, summary)
        if self.failures:
            tell(f"[nanguard] records incomplete ({'; '.join(self.failures)}); training itself was not affected")
        if announce and report is not None and not self.config.console:
            tell(f"[nanguard] report: {report}")

    def _close_sink(self, sink: Sink, summary: dict[str, Any]) -> None:
        if not any(sink is live for live in self._live):
            return
        try:
            sink.close(summary)
        except Exception as exc:
            self._drop(sink, "close", exc)

    def _write_summary(self, summary: dict[str, Any]) -> None:
        assert self._dir is not None
        path = self._dir.claim("summary.json")
        if path is None:
            self._dropped.append(f"summary.json: {self.out_dir / 'summary.json'} is not nanguard's; left as it is")
            return
        try:
            write_json_atomic(path, summary)
        except OSError as exc:
            failure = describe_failure("write", exc, str(path))
            self._dropped.append(f"summary.json: {failure}")
            warn_once(f"nanguard: summary.json not written after {failure}")

    def _write_report(self) -> Path | None:
        assert self._dir is not None
        try:
            from nanguard.report import render_report
        except ImportError:
            return None
        names = ("report.html", "report.md", "report_files")
        if any(self._dir.claim(name) is None for name in names):
            self._dropped.append(f"report: {self.out_dir} holds report files nanguard did not write; left as they are")
            return None
        try:
            return Path(render_report(self.out_dir))
        except Exception as exc:  # a report must never turn a finished run into a failed one
            failure = describe_failure("report", exc, str(self.out_dir))
            self._dropped.append(f"report: {failure}")
            warn_once(f"nanguard: could not write the report after {failure}")
            return None


def planned_names(config: GuardConfig) -> list[str]:
    """Every name a run with ``config`` may create in its out dir (set aside from an earlier run, never a user's)."""
    names = ["events.jsonl", "history.csv", "summary.json", "emergency_checkpoint.pt"]
    if config.report:
        names += ["report.html", "report.md", "report_files"]
    if config.tensorboard:
        names.append("tensorboard")
    return names


def tell(line: str) -> None:
    """One line on stderr; a closed or broken stderr is not a reason to stop training."""
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def _optional_sinks(config: GuardConfig, out_dir: Path, *, tensorboard: bool) -> list[Sink]:
    from nanguard.sinks import optional_sinks

    return optional_sinks(out_dir, console=config.console, tensorboard=tensorboard, wandb=config.wandb,
                          mlflow=config.mlflow)


__all__ = ["HISTORY_COLUMNS", "RUN_FILES", "EventLog", "HistoryLog", "NullSink", "RunRecords", "Sink", "Tally",
           "merge_summaries", "planned_names", "tell", "write_json_atomic"]
