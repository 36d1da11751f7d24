"""Guard metrics, events and the report in MLflow, in the run people already track.

With an active MLflow run in the process (``mlflow.start_run()`` before the guard), nanguard logs
into it; otherwise it creates a run of its own through ``MlflowClient`` (experiment
``MLFLOW_EXPERIMENT_NAME``/``MLFLOW_EXPERIMENT_ID``, else the default one), without touching the
process's active-run stack, and ends it at close. Metrics are ``nanguard/loss``, ``nanguard/grad_norm``,
``nanguard/lr_multiplier``, ... at the optimizer step, sent in batches (every ``flush_every`` steps,
at each event and at close) so the training loop does not wait on the tracking store per step.

Events: ``nanguard/events_total`` counts them at their step (a point on the chart where each
happened), the first event of each problem is logged as text under ``nanguard/events/``, and at
close the report, events.jsonl, history.csv and summary.json go in as artifacts under ``nanguard/``
and the counts as ``nanguard.*`` tags. Works with a local ``file:`` tracking URI (MLflow 3 asks
for ``MLFLOW_ALLOW_FILE_STORE=true`` to use one) or any server.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from nanguard._optional import require
from nanguard.errors import UsageError
from nanguard.report.signature import SignatureTracker
from nanguard.report.text import event_block
from nanguard.sinks._safe import FailSafe
from nanguard.sinks.tensorboard import finite_scalars

PREFIX = "nanguard"
RUN_FILES = ("report.html", "report.md", "events.jsonl", "history.csv", "summary.json")
SUMMARY_KEYS = ("steps", "events", "skipped", "rollbacks", "clipped", "aborted", "status")
MAX_EVENT_TEXTS = 50
"""Problems whose first event is logged as its own text artifact; every event is in events.jsonl."""
MAX_BATCH = 1000
"""MLflow's limit of metrics per ``log_batch`` call."""


def active_run_id() -> str | None:
    """The run id of the process's active MLflow run, if ``mlflow`` is already imported; never imports it."""
    module = sys.modules.get("mlflow")
    if module is None:
        return None
    run = module.active_run()
    return run.info.run_id if run is not None else None


def _first_line(exc: BaseException) -> str:
    """MLflow's messages run to paragraphs; the error line keeps the first sentence."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text.split(". ")[0]


def _experiment_id(client: Any) -> str:
    if os.environ.get("MLFLOW_EXPERIMENT_ID"):
        return os.environ["MLFLOW_EXPERIMENT_ID"]
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME")
    if name:
        experiment = client.get_experiment_by_name(name)
        return experiment.experiment_id if experiment is not None else client.create_experiment(name)
    return "0"


class MlflowSink(FailSafe):
    """A :class:`~nanguard.records.Sink` for MLflow: the active run, or one of its own (see the module doc)."""

    sink_name = "MLflow logging"

    def __init__(self, out_dir: str | os.PathLike[str], *, run_id: str | None = None, flush_every: int = 50) -> None:
        require("mlflow", extra="mlflow", feature="MLflow logging", package="mlflow-skinny")
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        self._metric = Metric
        self.out_dir = Path(out_dir)
        run_id = run_id or active_run_id()
        self.owns_run = run_id is None
        try:
            self.client = MlflowClient()
            self.run_id = run_id if run_id is not None else self._create_run()
        except Exception as exc:
            what = "create an MLflow run" if self.owns_run else f"log to MLflow run {run_id}"
            raise UsageError(f"mlflow=True: could not {what} ({type(exc).__name__}: {_first_line(exc)}); set "
                             "MLFLOW_TRACKING_URI (for a local folder also MLFLOW_ALLOW_FILE_STORE=true) or call "
                             "mlflow.start_run() first") from exc
        self.flush_every = max(1, flush_every)
        self._pending: list[Any] = []
        self._tracker = SignatureTracker()
        self._events = 0
        self._closed = False

    def _create_run(self) -> str:
        run = self.client.create_run(_experiment_id(self.client), run_name="nanguard", tags={"nanguard": "true"})
        return str(run.info.run_id)

    def _add(self, key: str, value: float, step: int) -> None:
        self._pending.append(self._metric(f"{PREFIX}/{key}", value, int(time.time() * 1000), step))

    def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
            self.client.log_batch(self.run_id, metrics=batch)

    def on_step(self, row: dict[str, Any]) -> None:
        step = row.get("step")
        if step is None or self.failed:
            return
        for key, value in finite_scalars(row).items():
            self._add(key, value, int(step))
        if int(step) % self.flush_every == 0:
            self._safely("metric upload", self._flush)

    def on_event(self, event: dict[str, Any]) -> None:
        if self.failed:
            return
        step = event.get("step")
        sighting = self._tracker.see(event)
        self._events += 1
        if isinstance(step, int):
            self._add("events_total", float(self._events), step)
        self._safely("metric upload", self._flush)
        if sighting.is_first and sighting.group <= MAX_EVENT_TEXTS:
            name = f"{PREFIX}/events/problem_{sighting.label}_step_{step}.txt"
            self._safely("event text", self.client.log_text, self.run_id,
                         event_block(event, max_evidence=None, max_fixes=None), name)

    def close(self, summary: dict[str, Any] | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        self._safely("metric upload", self._flush)
        self._safely("tags", self._set_tags, summary or {})
        for name in RUN_FILES:
            if (self.out_dir / name).is_file():
                self._safely("artifact upload", self.client.log_artifact, self.run_id, str(self.out_dir / name), PREFIX)
        if (self.out_dir / "report_files").is_dir():
            self._safely("artifact upload", self.client.log_artifacts, self.run_id, str(self.out_dir / "report_files"),
                         f"{PREFIX}/report_files")
        if self.owns_run:
            status = "FAILED" if (summary or {}).get("aborted") is True else "FINISHED"
            self._safely("end of run", self.client.set_terminated, self.run_id, status)

    def _set_tags(self, summary: dict[str, Any]) -> None:
        tags = {f"{PREFIX}.{key}": str(summary[key]) for key in SUMMARY_KEYS if key in summary}
        tags[f"{PREFIX}.problems"] = str(self._tracker.groups)
        tags[f"{PREFIX}.events_total"] = str(self._events)
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)
