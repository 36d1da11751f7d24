"""Reading run directories: tolerant of what may vary, one clear line for what cannot be meant."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from nanguard.errors import UsageError
from nanguard.report.load import load_events, load_history, load_run


def test_fixture_run_loads_with_nonfinite_values_restored(run_dir: Path, facts) -> None:
    run = load_run(run_dir)
    assert [event.step for event in run.events] == [facts["nan_step"], facts["spike_step"], facts["divergence_step"]]
    first = run.events[0]
    assert first.loss is not None and math.isnan(first.loss)  # null in JSON, back from loss_repr
    assert first.module == "blocks.3.attn" and first.op == "aten::_softmax"
    assert [stat.module for stat in first.module_stats][:2] == ["embed", "blocks.3.mlp"]
    assert first.extra_details == {"replay_seconds": 0.4}
    assert len(run.history) == facts["steps"]
    assert math.isnan(run.history[facts["nan_step"]].loss)
    assert run.history[facts["clip_step"]].action == "clip"
    assert run.summary is not None and run.summary["steps"] == facts["steps"]


def test_minimal_event_with_unknown_keys_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text(json.dumps({"step": 3, "trigger": "grad_spike", "action": "clip", "diagnosis": {"cause": "x",
                    "phase": "y", "future_field": 1}, "new_top_level": [1, 2]}) + "\n\n")
    (event,) = load_events(path)
    assert (event.step, event.cause, event.module, event.evidence, event.module_stats) == (3, "x", None, (), ())
    assert event.raw["new_top_level"] == [1, 2]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"trigger": "nonfinite_loss", "action": "skip", "diagnosis": {}}', "'step' must be an integer"),
        ('{"step": -1, "trigger": "nonfinite_loss", "action": "skip"}', "'step' must be an integer"),
        ('{"step": 1, "action": "skip"}', "'trigger' must be a string"),
        ('{"step": 1, "trigger": "t", "action": "a", "diagnosis": "oops"}', "'diagnosis' must be an object"),
    ],
)
def test_malformed_event_line_names_file_and_line(tmp_path: Path, line: str, expected: str) -> None:
    path = tmp_path / "events.jsonl"
    good = json.dumps({"step": 0, "trigger": "nonfinite_loss", "action": "skip", "diagnosis": {}})
    path.write_text(f"{good}\n{line}\n")
    with pytest.raises(UsageError) as info:
        load_events(path)
    message = str(info.value)
    assert message.startswith(f"{path}:2: ") and expected in message and "\n" not in message


def test_history_tolerates_empty_cells_and_missing_columns(tmp_path: Path) -> None:
    path = tmp_path / "history.csv"
    path.write_text("step,loss,grad_norm,extra\n0,1.5,,x\n1,nan,inf,y\n2,,,\n")
    rows = load_history(path)
    assert [row.step for row in rows] == [0, 1, 2]
    assert rows[0].grad_norm is None and rows[0].action == "none" and rows[0].lr_multiplier is None
    assert rows[1].loss is not None and math.isnan(rows[1].loss) and rows[1].grad_norm == math.inf


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("step,loss\n0,1.0\n1,abc\n", ":3: column 'loss' holds 'abc'"),
        ("step,loss\n0,1.0\nx,2\n", ":3: column 'step'"),
        ("loss,grad_norm\n1,2\n", ":1: the header has no 'step' column"),
    ],
)
def test_malformed_history_names_file_and_line(tmp_path: Path, content: str, expected: str) -> None:
    path = tmp_path / "history.csv"
    path.write_text(content)
    with pytest.raises(UsageError, match=expected.replace("(", r"\(")):
        load_history(path)


def test_run_dir_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        load_run(tmp_path / "missing")
    with pytest.raises(UsageError, match=r"neither events\.jsonl nor history\.csv"):
        load_run(tmp_path)
    (tmp_path / "history.csv").write_text("step,loss\n0,1\n")
    (tmp_path / "summary.json").write_text("[1]")
    with pytest.raises(UsageError, match=r"summary\.json:1: expected a JSON object"):
        load_run(tmp_path)


def test_events_only_and_history_only_runs(make_run, tmp_path: Path) -> None:
    events_only = load_run(make_run(tmp_path / "e", history=False, summary=False))
    assert events_only.events and not events_only.history and events_only.summary is None
    history_only = load_run(make_run(tmp_path / "h", events=False))
    assert history_only.history and not history_only.events


def test_fixture_events_follow_the_schema(run_dir: Path) -> None:
    """The fixtures are only worth testing against if they are what the guard really writes."""
    import jsonschema

    from tests.conftest import load_schema, read_events

    schema = load_schema()
    for record in read_events(run_dir):
        jsonschema.validate(record, schema)
