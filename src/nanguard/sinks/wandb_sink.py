"""Guard scalars, events and the report in Weights & Biases, in the run people already watch.

In a run the user started (``wandb.init`` before the guard), nanguard only adds to it: its scalars go
in under ``nanguard/`` with ``commit=False``, so they join the row of the user's next ``wandb.log``
and never advance the run's step (a ``wandb.log(..., step=global_step)`` of theirs keeps working).
They are plotted against ``nanguard/step``, the optimizer step. A run that logs every N steps shows
nanguard's values every N steps; the full record stays in ``history.csv``. With no W&B run active,
``WandbSink`` starts one of its own (project ``WANDB_PROJECT`` or "nanguard"), logs every row and
finishes that run at close.

Events go to a table ``nanguard/events`` (one row per event: step, problem letter, trigger, action,
cause, where, the first evidence line and fix), a cumulative scalar ``nanguard/events_total``, and
the run summary; at close the report, events.jsonl, history.csv and summary.json are logged as an
artifact of type ``nanguard-report``. Works offline (``WANDB_MODE=offline``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from nanguard._optional import require
from nanguard.errors import UsageError
from nanguard.report.signature import SignatureTracker
from nanguard.report.text import where_phrase
from nanguard.sinks._safe import FailSafe
from nanguard.sinks.tensorboard import finite_scalars

PREFIX = "nanguard"
EVENT_COLUMNS = ["step", "problem", "same_as_step", "trigger", "action", "cause", "phase", "where", "loss",
                 "evidence", "fix"]
RUN_FILES = ("report.html", "report.md", "events.jsonl", "history.csv", "summary.json")
SUMMARY_KEYS = ("steps", "events", "skipped", "rollbacks", "clipped", "aborted", "status")


def active_run() -> Any | None:
    """The user's W&B run, if ``wandb`` is already imported and a run is active; never imports ``wandb``."""
    import sys

    module = sys.modules.get("wandb")
    return getattr(module, "run", None) if module is not None else None


def event_row(event: dict[str, Any], problem: str, first_step: int | None) -> list[Any]:
    raw = event.get("diagnosis")
    diagnosis: dict[str, Any] = raw if isinstance(raw, dict) else {}
    evidence, fixes = diagnosis.get("evidence") or [""], diagnosis.get("fixes") or [""]
    loss = event.get("loss")
    return [event.get("step"), problem, first_step, event.get("trigger"), event.get("action"),
            diagnosis.get("cause", "unknown"), diagnosis.get("phase", "unknown"), where_phrase(diagnosis),
            loss if isinstance(loss, (int, float)) else event.get("loss_repr"), str(evidence[0]), str(fixes[0])]


class WandbSink(FailSafe):
    """A :class:`~nanguard.records.Sink` for W&B: the user's active run, or one of its own (see the module doc)."""

    sink_name = "W&B logging"

    def __init__(self, out_dir: str | os.PathLike[str], *, run: Any | None = None, project: str | None = None) -> None:
        self._wandb = require("wandb", extra="wandb", feature="W&B logging")
        self.out_dir = Path(out_dir)
        run = run if run is not None else self._wandb.run
        self.owns_run = run is None
        if run is None:
            run = self._start_run(project)
        self.run = run
        self._tracker = SignatureTracker()
        self._rows: list[list[Any]] = []
        self._closed = False
        try:
            self._define_metrics()
        except Exception as exc:
            raise UsageError(f"wandb: could not set up logging to W&B run {getattr(run, 'id', '?')} "
                             f"({type(exc).__name__}: {exc}); pass wandb=False to run without it") from exc

    def _start_run(self, project: str | None) -> Any:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        try:
            return self._wandb.init(project=project or os.environ.get("WANDB_PROJECT") or "nanguard",
                                    dir=str(self.out_dir), job_type="nanguard")
        except Exception as exc:
            raise UsageError(f"wandb=True: could not start a W&B run ({type(exc).__name__}: {exc}); run `wandb login`, "
                             "set WANDB_MODE=offline, or start your own run with wandb.init() first") from exc

    def _define_metrics(self) -> None:
        self.run.define_metric(f"{PREFIX}/step", hidden=True)
        self.run.define_metric(f"{PREFIX}/*", step_metric=f"{PREFIX}/step")

    def _log(self, data: dict[str, Any]) -> None:
        # Never advance the user's step: their next wandb.log() commits our values with theirs.
        self.run.log(data, commit=self.owns_run)

    def on_step(self, row: dict[str, Any]) -> None:
        step = row.get("step")
        if step is None:
            return
        data: dict[str, Any] = {f"{PREFIX}/{key}": value for key, value in finite_scalars(row).items()}
        data[f"{PREFIX}/step"] = int(step)
        self._safely("log", self._log, data)

    def on_event(self, event: dict[str, Any]) -> None:
        sighting = self._tracker.see(event)
        self._rows.append(event_row(event, sighting.label, None if sighting.is_first else sighting.first_step))
        step = event.get("step")
        if isinstance(step, int):
            self._safely("log", self._log, {f"{PREFIX}/step": step, f"{PREFIX}/events_total": len(self._rows)})

    def close(self, summary: dict[str, Any] | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        self._safely("events table", self._log_events_table)
        self._safely("summary", self._write_summary, summary or {})
        self._safely("report artifact", self._log_artifact)
        if self.owns_run:
            self._safely("finish", self.run.finish)

    def _log_events_table(self) -> None:
        if self._rows:
            table = self._wandb.Table(columns=EVENT_COLUMNS, data=self._rows)
            self.run.log({f"{PREFIX}/events": table}, commit=self.owns_run)

    def _write_summary(self, summary: dict[str, Any]) -> None:
        values = {f"{PREFIX}/{key}": summary[key] for key in SUMMARY_KEYS if key in summary}
        values[f"{PREFIX}/problems"] = self._tracker.groups
        values[f"{PREFIX}/events_total"] = len(self._rows)
        self.run.summary.update(values)

    def _log_artifact(self) -> None:
        files = [self.out_dir / name for name in RUN_FILES if (self.out_dir / name).is_file()]
        if not files:
            return
        artifact = self._wandb.Artifact(f"nanguard-report-{self.run.id}", type="nanguard-report",
                                        description="nanguard's report and records of this run")
        for path in files:
            artifact.add_file(str(path), name=path.name)
        if (self.out_dir / "report_files").is_dir():
            artifact.add_dir(str(self.out_dir / "report_files"), name="report_files")
        self.run.log_artifact(artifact)
