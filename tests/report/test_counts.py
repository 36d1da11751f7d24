"""Every count in the report, the console and the summary from one rule (issue: the demo said 2 skipped and 4)."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

from nanguard.report.counts import LastLoss, Tallies, count_run, derive_counts, events_phrase
from nanguard.report.load import load_run
from nanguard.report.overview import summarise
from nanguard.sinks.console import LiveConsole


def demo_like_run(run_dir: Path) -> Path:
    """The demo's record: 2 skips, 2 rollbacks, 2 clips; summary.json's ``skipped`` (4) counts rollback steps too."""
    run_dir.mkdir()
    actions = {120: "skip", 152: "clip", 168: "skip", 219: "rollback", 264: "clip", 296: "rollback"}
    events = [{"step": step, "trigger": "nonfinite_loss", "action": action,
               "diagnosis": {"cause": "unknown", "phase": "unknown", "module": f"m{step}"}}
              for step, action in actions.items() if action != "clip"]
    (run_dir / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    rows, skipped, rollbacks, clipped = ["step,loss,action,skipped_total,rollbacks_total,clipped_total"], 0, 0, 0
    for step in range(400):
        action = actions.get(step, "none")
        skipped += action in ("skip", "rollback")
        rollbacks += action == "rollback"
        clipped += action == "clip"
        loss = "nan" if action in ("skip", "rollback") else f"{2 - step / 1000:.4f}"
        rows.append(f"{step},{loss},{action},{skipped},{rollbacks},{clipped}")
    (run_dir / "history.csv").write_text("\n".join(rows) + "\n")
    (run_dir / "summary.json").write_text(json.dumps({"steps": 400, "skipped": 4, "rollbacks": 2, "clipped": 2,
                                                      "events": 4, "aborted": False, "status": "finished"}))
    return run_dir


def test_header_and_run_summary_agree_when_summary_counts_rollbacks_as_skipped(tmp_path: Path) -> None:
    run = load_run(demo_like_run(tmp_path / "demo"))
    counts = summarise(run).counts
    assert (counts.steps, counts.events, counts.skipped, counts.rollbacks, counts.clipped) == (400, 4, 2, 2, 2)
    assert counts.updates_not_applied == 4  # summary.json's "skipped": shown under this name, never as "skipped"
    assert counts.last_loss == LastLoss(399, 1.601)


def test_console_closing_line_uses_the_report_counts(tmp_path: Path) -> None:
    """The console said "final loss 1.448" while the demo said 1.445: now it says which loss it is."""
    run_dir = demo_like_run(tmp_path / "demo")
    stream = io.StringIO()
    console = LiveConsole(stream, tty=False, color=False)
    events = {e["step"]: e for e in map(json.loads, (run_dir / "events.jsonl").read_text().splitlines())}
    for row in load_run(run_dir).history:
        if row.step in events:
            console.on_event(events[row.step])
        console.on_step({"step": row.step, "loss": row.loss, "action": row.action, "skipped_total": row.skipped_total,
                         "rollbacks_total": row.rollbacks_total, "clipped_total": row.clipped_total})
    summary = json.loads((run_dir / "summary.json").read_text())
    ours = console.counts(summary)
    report = count_run(load_run(run_dir), signatures=4)
    assert ours == report
    console.close(summary)
    assert stream.getvalue().splitlines()[-1] == (
        "[nanguard] done: 400 steps; 4 events (2 skipped, 2 rolled back); 4 updates not applied; 2 clipped; "
        "last training loss 1.601 (step 399)")


def test_each_count_is_the_largest_any_source_gives() -> None:
    base = dict(events=2, event_actions={"skip": 2}, signatures=1, history_actions={"skip": 1},
                last_row={"skipped_total": 5, "rollbacks_total": "1", "clipped_total": "nan"}, last_step=49,
                last_loss=None)
    counts = derive_counts(Tallies(**base))
    assert (counts.steps, counts.skipped, counts.rollbacks, counts.clipped, counts.updates_not_applied) == (50, 2, 1, 0, 5)
    later = derive_counts(Tallies(**base, summary={"steps": 60, "clipped": 3, "events": 7, "aborted": True}))
    assert (later.steps, later.clipped, later.events, later.aborted) == (60, 3, 7, 1)
    assert derive_counts(Tallies(**{**base, "last_step": None})).steps is None


def test_events_phrase() -> None:
    def phrase(events: int, signatures: int, **actions: int) -> str:
        tallies = Tallies(events=events, event_actions=actions, signatures=signatures, history_actions={},
                          last_row=None, last_step=10, last_loss=LastLoss(10, math.nan))
        return events_phrase(derive_counts(tallies))

    assert phrase(0, 0) == "no events"
    assert phrase(1, 1, skip=1) == "1 event (1 skipped)"
    assert phrase(30, 1, skip=28, rollback=2) == "30 events, all of one kind (28 skipped, 2 rolled back)"
    assert phrase(30, 3, skip=30) == "30 events of 3 kinds (30 skipped)"
    assert phrase(4, 4, skip=2, rollback=1, abort=1) == "4 events (2 skipped, 1 rolled back, 1 aborted)"
