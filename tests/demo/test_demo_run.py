"""``nanguard demo --quick`` end to end: every injected fault caught, diagnosed and survived; the contrast run dies."""

from __future__ import annotations

import contextlib
import io
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from nanguard.cli import main as cli_main
from nanguard.demo.summary import FAULT_REACH
from tests.conftest import load_schema, read_events


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One in-process quick run through the CLI, with --json: stdout is the summary, stderr the narrative."""
    out_dir = tmp_path_factory.mktemp("demo") / "run"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = cli_main(["demo", "--quick", "--out", str(out_dir), "--json"])
    return {"code": code, "summary": json.loads(stdout.getvalue()), "narrative": stderr.getvalue(),
            "out_dir": out_dir, "events": read_events(out_dir)}


def _fault(demo: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(f for f in demo["summary"]["faults"] if f["kind"] == kind)


def _events_at(demo: dict[str, Any], step: int, reach: int = 0) -> list[dict[str, Any]]:
    return [e for e in demo["events"] if step <= e["step"] <= step + reach]


def test_exits_0_with_a_finite_guarded_run_close_to_the_fault_free_reference(demo) -> None:
    assert demo["code"] == 0
    guarded, reference = demo["summary"]["guarded"], demo["summary"]["reference"]
    assert guarded["finite"] and guarded["aborted"] is None
    assert math.isfinite(guarded["final_loss"]) and math.isfinite(reference["final_loss"])
    assert guarded["final_loss"] < 1.5 * reference["final_loss"]


def test_the_unguarded_run_with_the_same_faults_goes_to_nan_for_good(demo) -> None:
    unguarded = demo["summary"]["unguarded"]
    assert unguarded["first_nonfinite_step"] == _fault(demo, "all_padding")["step"]
    assert unguarded["recovered"] is False and unguarded["weights_nonfinite"] is True
    assert unguarded["final_loss"] is None  # NaN, written as null
    assert f"loss became NaN at step {unguarded['first_nonfinite_step']} and never recovered" in demo["narrative"]


def test_all_padding_row_is_skipped_and_traced_to_the_attention_softmax(demo) -> None:
    fault = _fault(demo, "all_padding")
    (event,) = _events_at(demo, fault["step"])
    assert (event["trigger"], event["action"]) == ("nonfinite_loss", "skip")
    diagnosis = event["diagnosis"]
    assert diagnosis["cause"] == "masked_softmax_all_masked" == fault["expected_cause"]
    assert (diagnosis["module"], diagnosis["op"]) == ("blocks.0.attn", "aten::_softmax")


def test_nan_in_the_data_is_skipped_and_blamed_on_the_batch_field(demo) -> None:
    fault = _fault(demo, "nan_in_data")
    (event,) = _events_at(demo, fault["step"])
    assert (event["trigger"], event["action"]) == ("nonfinite_loss", "skip")
    assert event["diagnosis"]["cause"] == "input_nonfinite" == fault["expected_cause"]
    assert event["diagnosis"]["tensor"] == "loss_mask"


def test_lr_spike_is_named_rolled_back_to_before_it_and_the_lr_held(demo) -> None:
    fault = _fault(demo, "lr_spike")
    first_spiked_update = fault["injected_at"][0]
    events = _events_at(demo, first_spiked_update + 1, FAULT_REACH - 1)
    assert events, "the damage of the spiked update shows in the loss/gradients of the next steps"
    first = events[0]
    assert first["step"] == first_spiked_update + 1
    assert first["trigger"] in ("loss_spike", "grad_spike")
    assert (first["action"], first["diagnosis"]["cause"]) == ("rollback", "learning_rate_spike")
    assert fault["expected_cause"] == "learning_rate_spike"
    assert f"before the update at step {first_spiked_update}" in first["details"]["reason"]
    assert "held at its earlier level" in first["details"]["reason"]
    assert len(events) == 1, "one event for the spike: the pinned LR keeps the next steps healthy"
    diagnosis = first["diagnosis"]
    assert diagnosis["fixes"][0].startswith(f"Check the learning-rate schedule around step {first_spiked_update}")
    assert not any("Inspect the samples" in fix for fix in diagnosis["fixes"])  # the batch is not the problem
    assert len(diagnosis["evidence"]) == len(set(diagnosis["evidence"])) and len(set(diagnosis["fixes"])) == len(
        diagnosis["fixes"])


def test_corrupted_weight_is_rolled_back_and_named(demo) -> None:
    fault = _fault(demo, "corrupt_weight")
    (event,) = _events_at(demo, fault["step"])
    # The pre-step weight check runs every 50 steps; in between the inf shows first in the loss.
    assert event["trigger"] in ("nonfinite_loss", "nonfinite_weights")
    assert event["action"] == "rollback"
    assert event["diagnosis"]["cause"] == "weights_nonfinite" == fault["expected_cause"]
    assert event["diagnosis"]["tensor"] == "blocks.1.mlp.fc.weight"


def test_every_event_is_explained_by_an_injected_fault_and_follows_the_schema(demo) -> None:
    schema = load_schema()
    for event in demo["events"]:
        jsonschema.validate(event, schema)
    faults = [e["fault"] for e in demo["summary"]["events"]]
    assert None not in faults  # no false alarm
    assert set(faults) == {"all_padding", "nan_in_data", "lr_spike", "corrupt_weight"}
    assert len(demo["summary"]["events"]) == len(demo["events"]) == demo["summary"]["guarded"]["events"]


def test_json_summary_and_narrative_point_at_the_report(demo) -> None:
    report = demo["out_dir"] / "report.html"
    assert report.is_file()
    assert demo["summary"]["report"] == str(report)
    assert f"Report: {report}" in demo["narrative"]
    for key in ("cause", "module", "op", "tensor", "trigger", "action", "step"):
        assert all(key in e for e in demo["summary"]["events"])
    assert demo["summary"]["seconds"] > 0 and demo["summary"]["guarded"]["seconds"] > 0
    assert "Diagnoses (" in demo["narrative"] and "with nanguard:" in demo["narrative"]


@pytest.mark.slow
def test_python_dash_m_runs_the_demo_and_says_where_the_report_is(tmp_path: Path) -> None:
    out_dir = tmp_path / "demo out"
    proc = subprocess.run([sys.executable, "-m", "nanguard", "demo", "--quick", "--no-contrast", "--out", str(out_dir)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert str(out_dir / "report.html") in proc.stdout + proc.stderr
    assert (out_dir / "report.html").is_file()
    assert "without nanguard: loss became NaN" not in proc.stdout  # --no-contrast: no unguarded run
