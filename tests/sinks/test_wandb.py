"""The W&B sink against the real library, offline: the user's run is added to, never disturbed; or a run of its own."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

pytest.importorskip("wandb", reason="the wandb extra is not installed")

import wandb

from nanguard.sinks import optional_sinks
from nanguard.sinks.wandb_sink import WandbSink

from .wandb_records import artifacts, final_summary, finished_records, history_rows


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    out = tmp_path / "out"
    out.mkdir()
    return out


def nan_event(step: int) -> dict:
    return {"step": step, "trigger": "nonfinite_loss", "action": "skip", "loss": None, "loss_repr": "nan",
            "diagnosis": {"cause": "invalid_math_domain", "phase": "loss", "module": "head", "op": "aten::log",
                          "evidence": ["aten::log received 3 zeros"], "fixes": ["clamp before log"]}}


def test_an_active_user_run_gets_nanguard_values_without_its_steps_moving(offline: Path, tmp_path: Path) -> None:
    run = wandb.init(project="user", dir=str(tmp_path))
    try:
        sinks = optional_sinks(offline, console=False, tensorboard=False)  # auto: the active run is found
        assert [type(s).__name__ for s in sinks] == ["WandbSink"] and not sinks[0].owns_run
        sink = sinks[0]
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # W&B warns when a step goes backwards: it must not
            for step in range(5):
                sink.on_step({"step": step, "loss": float("nan") if step == 2 else 2.0 - step / 10, "grad_norm": 1.0,
                              "lr_multiplier": 1.0, "skipped_total": int(step >= 2)})
                if step in (2, 3):
                    sink.on_event(nan_event(step))
                run.log({"user/accuracy": step / 10}, step=10 * step)  # the user's own step axis
        (offline / "report.html").write_text("<html>report</html>")
        (offline / "events.jsonl").write_text(json.dumps(nan_event(2)) + "\n")
        sink.close({"steps": 5, "skipped": 1, "events": 2})
        assert wandb.run is run  # the user's run is still theirs, still open
    finally:
        run.finish()
    records = finished_records(tmp_path)
    rows = history_rows(records)
    user_rows = [r for r in rows if "user/accuracy" in r]
    assert [r["_step"] for r in user_rows] == ["0", "10", "20", "30", "40"]
    # nanguard's values ride on the user's open row; each carries its own optimizer step, so what is
    # plotted against nanguard/step is right even where a later value replaced an earlier one in a row.
    expected = {"0": "2", "1": "1.9", "3": "1.7", "4": "1.6"}  # step 2's NaN is left out, not plotted
    pairs = [(r["nanguard/step"], r["nanguard/loss"]) for r in rows if "nanguard/loss" in r]
    assert pairs and all(expected[step] == loss for step, loss in pairs)
    assert max(int(r.get("nanguard/events_total", "0")) for r in rows) == 2
    summary = final_summary(records)
    assert summary["nanguard/problems"] == "1" and summary["nanguard/events_total"] == "2"
    assert summary["nanguard/events/nrows"] == "2" and summary["nanguard/steps"] == "5"
    (artifact,) = [a for a in artifacts(records) if a.type == "nanguard-report"]  # W&B also stores the table as one
    assert {entry.path for entry in artifact.manifest.contents} == {"report.html", "events.jsonl"}


def test_without_an_active_run_it_starts_and_finishes_its_own(offline: Path) -> None:
    assert wandb.run is None
    (sink,) = optional_sinks(offline, console=False, tensorboard=False, wandb=True)
    assert isinstance(sink, WandbSink) and sink.owns_run and wandb.run is sink.run
    for step in range(3):
        sink.on_step({"step": step, "loss": 1.0 / (step + 1), "grad_norm": 0.5})
    sink.close({"steps": 3})
    assert wandb.run is None  # finished: nothing left behind in the user's process
    rows = history_rows(finished_records(offline))
    assert [r["nanguard/step"] for r in rows if "nanguard/loss" in r] == ["0", "1", "2"]


def test_auto_mode_adds_nothing_when_no_run_is_active(offline: Path) -> None:
    assert wandb.run is None
    assert optional_sinks(offline, console=False, tensorboard=False) == []
    assert optional_sinks(offline, console=False, tensorboard=False, wandb=False) == []
