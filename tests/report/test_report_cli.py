"""``nanguard report`` and ``nanguard events`` through the real command line entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nanguard.cli import main


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_report_prints_the_written_paths(run_dir: Path, capsys) -> None:
    code, out, err = run_cli(capsys, "report", str(run_dir))
    assert code == 0 and err == ""
    assert out.splitlines() == [str(run_dir / "report.html"), str(run_dir / "report.md")]
    code, out, _ = run_cli(capsys, "report", str(run_dir), "--format", "md", "--out", str(run_dir / "x.md"))
    assert code == 0 and out.strip() == str(run_dir / "x.md")


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        ("missing", "does not exist"),
        ("empty", "holds neither events.jsonl nor history.csv"),
        ("bad_line", "events.jsonl:2: not valid JSON"),
    ],
)
def test_report_errors_are_one_line_exit_2(tmp_path: Path, capsys, make_run, setup: str, expected: str) -> None:
    target = tmp_path / "run"
    if setup == "empty":
        target.mkdir()
    if setup == "bad_line":
        make_run(target)
        lines = (target / "events.jsonl").read_text().splitlines()
        (target / "events.jsonl").write_text("\n".join([lines[0], "oops", *lines[1:]]) + "\n")
    code, out, err = run_cli(capsys, "report", str(target))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("nanguard report: error: ") and expected in err


def test_report_refuses_to_overwrite_user_file(run_dir: Path, tmp_path: Path, capsys) -> None:
    mine = tmp_path / "mine.html"
    mine.write_text("keep me")
    code, _, err = run_cli(capsys, "report", str(run_dir), "--out", str(mine), "--format", "html")
    assert code == 2 and "refusing to overwrite" in err and mine.read_text() == "keep me"


def test_report_bad_format_is_a_usage_error(run_dir: Path, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["report", str(run_dir), "--format", "pdf"])
    assert info.value.code == 2
    assert "invalid choice: 'pdf'" in capsys.readouterr().err


def test_events_prints_readable_blocks(run_dir: Path, capsys) -> None:
    code, out, err = run_cli(capsys, "events", str(run_dir))
    assert code == 0 and err == ""
    blocks = out.strip().split("\n\n")
    assert len(blocks) == 3
    assert blocks[0].splitlines()[:2] == [
        "[nanguard] step 120: nonfinite_loss -> skip (loss=NaN)",
        "  cause: forward_overflow in forward; module 'blocks.3.attn', op aten::_softmax (confidence 0.90)",
    ]
    assert "  evidence: the same step in float32 is finite (loss 2.91)" in blocks[0]
    assert "  fix: use bfloat16 instead of float16 autocast" in blocks[0]
    assert blocks[1].startswith("[nanguard] step 300: loss_spike -> rollback (loss=8.7e+15)")
    assert "tensor 'x[3]'" in blocks[1]


def test_events_filters_and_json(run_dir: Path, capsys) -> None:
    code, out, _ = run_cli(capsys, "events", str(run_dir), "--json", "--cause", "input_extreme_scale")
    records = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [r["step"] for r in records] == [300]
    assert records[0]["diagnosis"]["tensor"] == "x[3]"
    code, out, _ = run_cli(capsys, "events", str(run_dir), "--step", "340")
    assert code == 0 and out.startswith("[nanguard] step 340: divergence -> lr_backoff")
    code, out, err = run_cli(capsys, "events", str(run_dir), "--step", "7")
    assert code == 0 and out == "" and err.strip() == "no events match"


def test_events_errors(tmp_path: Path, capsys, make_run) -> None:
    code, _, err = run_cli(capsys, "events", str(tmp_path / "nope"))
    assert code == 2 and "does not exist" in err and err.count("\n") == 1
    history_only = make_run(tmp_path / "h", events=False)
    code, _, err = run_cli(capsys, "events", str(history_only))
    assert code == 2 and "has no events.jsonl" in err
    code, _, err = run_cli(capsys, "events", str(make_run(tmp_path / "r")), "--cause", "nan_everywhere")
    assert code == 2 and "--cause 'nan_everywhere' is not a known cause" in err


def test_events_names_the_root_module(rollback_run_dir: Path, capsys) -> None:
    code, out, _ = run_cli(capsys, "events", str(rollback_run_dir), "--step", "10")
    assert code == 0
    assert out.splitlines()[1] == "  cause: input_nonfinite in data; (root module), tensor 'loss_mask'"
    assert "module ''" not in out


def test_events_tells_each_problem_once_then_one_line_per_repeat(repeated_run_dir: Path, capsys) -> None:
    """32 events gave 201 lines from `nanguard events`, each repeating the same fix."""
    code, out, _ = run_cli(capsys, "events", str(repeated_run_dir))
    lines = out.splitlines()
    assert code == 0 and len(lines) < 60
    assert out.count("  fix: clamp the probabilities") == 1
    assert "[nanguard] step 23: same as step 20, skipped (NaN loss; 2nd time)" in lines
    assert "[nanguard] step 89: same as step 20, skipped (NaN loss; 24th time)" in lines
    assert "[nanguard] step 113: same as step 110, rolled back (loss spike; 2nd time)" in lines
    assert sum(line.startswith("[nanguard] step") for line in lines) == 30
    code, full, _ = run_cli(capsys, "events", str(repeated_run_dir), "--full")
    assert full.count("  fix: clamp the probabilities") == 24


def test_events_short_is_one_line_per_event(repeated_run_dir: Path, capsys) -> None:
    code, out, _ = run_cli(capsys, "events", str(repeated_run_dir), "--short")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 31  # a header and 30 rows
    assert lines[0].split() == ["step", "problem", "what", "action", "cause", "where"]
    assert lines[1].split(None, 2)[:2] == ["20", "A"]
    assert "A, same as step 20" in lines[2] and "invalid_math_domain" in lines[2] and "model[0]" in lines[2]
    assert all(line == line.rstrip() for line in lines) and "\x1b" not in out  # piped: plain, no trailing blanks


def test_events_problem_filter(repeated_run_dir: Path, capsys) -> None:
    code, out, _ = run_cli(capsys, "events", str(repeated_run_dir), "--problem", "b", "--short")
    assert code == 0 and [line.split()[0] for line in out.splitlines()[1:]] == ["31", "64", "97"]
    code, _, err = run_cli(capsys, "events", str(repeated_run_dir), "--problem", "Q")
    assert code == 2 and "--problem 'Q' is not a problem of this run; its problems are A, B, C" in err


def test_events_renders_new_fields(tmp_path: Path, capsys) -> None:
    """Triggers exception/stalled, diagnosis.contributing and same_as_step are shown, not dropped."""
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    events = [
        {"step": 4, "trigger": "exception", "action": "abort",
         "diagnosis": {"cause": "label_out_of_range", "phase": "data", "tensor": "labels",
                       "contributing": [{"cause": "input_extreme_scale", "evidence": ["x max 1e9"]}]},
         "details": {"exception": "IndexError: Target 101 is out of bounds."}},
        {"step": 9, "trigger": "stalled", "action": "none",
         "diagnosis": {"cause": "update_underflow", "phase": "optimizer", "same_as_step": 2}},
    ]
    (run_dir / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    code, out, _ = run_cli(capsys, "events", str(run_dir), "--full")
    assert code == 0
    assert "  raised: IndexError: Target 101 is out of bounds." in out
    assert "  contributing: input_extreme_scale: x max 1e9" in out
    assert "  note: diagnosis carried over from step 2 (same signature; this step was not replayed)" in out
    code, out, _ = run_cli(capsys, "events", str(run_dir), "--short")
    assert "the step raised an exception" in out and "training stalled" in out
