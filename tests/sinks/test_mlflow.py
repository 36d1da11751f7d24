"""The MLflow sink against the real library and a local file store: the active run, or a run of its own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("mlflow", reason="the mlflow extra is not installed")

import mlflow
from mlflow.tracking import MlflowClient

from nanguard.errors import UsageError
from nanguard.sinks import optional_sinks
from nanguard.sinks.mlflow_sink import MlflowSink


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A ``file:`` tracking store in a temp dir, for this test only (the tracking URI is process-global)."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for it to use a folder as the store
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"file:{tmp_path / 'mlruns'}")
    out = tmp_path / "out"
    out.mkdir()
    yield out
    mlflow.set_tracking_uri(previous)


def nan_event(step: int) -> dict:
    return {"step": step, "trigger": "nonfinite_loss", "action": "skip", "loss": None, "loss_repr": "nan",
            "diagnosis": {"cause": "input_nonfinite", "phase": "data", "tensor": "x",
                          "evidence": ["batch field `x`: 1 NaN"], "fixes": ["drop the row"]}}


def test_the_active_run_gets_metrics_events_and_the_report(store: Path) -> None:
    with mlflow.start_run() as run:
        (sink,) = optional_sinks(store, console=False, tensorboard=False)  # auto: the active run is found
        assert isinstance(sink, MlflowSink) and sink.run_id == run.info.run_id and not sink.owns_run
        for step in range(60):
            sink.on_step({"step": step, "loss": float("inf") if step == 7 else 3.0 - step / 30, "grad_norm": 1.0,
                          "lr_multiplier": 0.5 if step >= 30 else 1.0})
            if step in (7, 8):
                sink.on_event(nan_event(step))
        (store / "report.html").write_text("<html>report</html>")
        (store / "summary.json").write_text(json.dumps({"steps": 60}))
        sink.close({"steps": 60, "events": 2, "skipped": 2})
        assert mlflow.active_run().info.run_id == run.info.run_id  # still the user's, still running
    client = MlflowClient()
    losses = client.get_metric_history(run.info.run_id, "nanguard/loss")
    assert sorted(m.step for m in losses) == [s for s in range(60) if s != 7]  # the inf is left out
    multiplier = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "nanguard/lr_multiplier")}
    assert multiplier[29] == 1.0 and multiplier[30] == 0.5
    events = client.get_metric_history(run.info.run_id, "nanguard/events_total")
    assert [(m.step, m.value) for m in events] == [(7, 1.0), (8, 2.0)]
    tags = client.get_run(run.info.run_id).data.tags
    assert tags["nanguard.problems"] == "1" and tags["nanguard.steps"] == "60"
    files = {f.path for f in client.list_artifacts(run.info.run_id, "nanguard")}
    assert files == {"nanguard/report.html", "nanguard/summary.json", "nanguard/events"}
    (text,) = client.list_artifacts(run.info.run_id, "nanguard/events")
    assert text.path == "nanguard/events/problem_A_step_7.txt"


def test_without_an_active_run_it_creates_and_ends_its_own(store: Path) -> None:
    assert mlflow.active_run() is None
    (sink,) = optional_sinks(store, console=False, tensorboard=False, mlflow=True)
    assert sink.owns_run and mlflow.active_run() is None  # the process's active-run stack is not touched
    sink.on_step({"step": 0, "loss": 1.0})
    sink.close({"steps": 1, "aborted": False})
    run = MlflowClient().get_run(sink.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["nanguard"] == "true"
    assert [m.step for m in MlflowClient().get_metric_history(sink.run_id, "nanguard/loss")] == [0]


def test_an_unusable_store_is_one_clear_error(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    with pytest.raises(UsageError, match=r"mlflow=True: could not create an MLflow run .*MLFLOW_TRACKING_URI"):
        MlflowSink(store)
    assert optional_sinks(store, console=False, tensorboard=False) == []  # auto: no active run, nothing tried


def test_a_store_that_fails_mid_run_warns_once_and_training_goes_on(store: Path) -> None:
    sink = MlflowSink(store, flush_every=1)

    def gone(*args, **kwargs):
        raise ConnectionError("tracking server went away")

    sink.client.log_batch = gone
    with pytest.warns(RuntimeWarning, match="MLflow logging stopped after a failed metric upload"):
        sink.on_step({"step": 0, "loss": 1.0})
    sink.on_step({"step": 1, "loss": 1.0})
    sink.on_event(nan_event(1))
    sink.close({})
    assert "tracking server went away" in (sink.failed or "")
