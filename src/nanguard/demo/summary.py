"""What the demo prints at the end, and its ``--json`` form: pure functions of the runs' results."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nanguard.demo.faults import Fault
from nanguard.demo.train import RunResult
from nanguard.report.text import action_phrase, cause_phrase, format_number, trigger_phrase, where_phrase

# An event belongs to the newest fault injected at most this many steps before it (an LR spike shows
# in the loss of the step after the bad update, or a few steps later).
FAULT_REACH = 5
FIXES_SHOWN = 2


def nearest_fault(event_step: int, injected: Sequence[tuple[int, str]]) -> tuple[int, str] | None:
    """The (step, kind) of the injection that explains an event at ``event_step``; None if no fault is near."""
    near = [(step, kind) for step, kind in injected if 0 <= event_step - step <= FAULT_REACH]
    return max(near) if near else None


def _injection_text(event_step: int, injected: Sequence[tuple[int, str]], described: dict[str, str]) -> str:
    nearest = nearest_fault(event_step, injected)
    if nearest is None:
        return "no fault was injected near this step"
    step, kind = nearest
    return described.get(kind, kind) + (f" (in effect at step {step})" if step != event_step else "")


def _injected_steps(kind: str, injected: Sequence[tuple[int, str]]) -> list[int]:
    return [step for step, k in injected if k == kind]


def _number_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _loss_value(event: dict[str, Any]) -> float | None:
    value = event.get("loss")
    if isinstance(value, (int, float)):
        return float(value)
    text = event.get("loss_repr")
    return float(text) if isinstance(text, str) else None


def faults_block(faults: Sequence[Fault]) -> str:
    lines = ["Injected faults (the same in every run):"]
    lines += [f"  step {fault.step:>4}  {fault.description}" for fault in faults]
    return "\n".join(lines)


def diagnoses_block(guarded: RunResult, faults: Sequence[Fault]) -> str:
    """One readable block per event: step, what happened, the fault behind it, cause, where, fix."""
    if not guarded.events:
        return "Diagnoses: nanguard recorded no events."
    described = {fault.kind: fault.description for fault in faults}
    lines = [f"Diagnoses ({len(guarded.events)} events, full evidence in events.jsonl and the report):"]
    for event in guarded.events:
        diagnosis = event.get("diagnosis") or {}
        happened = trigger_phrase(event["trigger"], _loss_value(event), event.get("grad_norm"))
        lines.append("")
        lines.append(f"  step {event['step']}: {happened} -> {action_phrase(event['action'])}")
        lines.append(f"    injected: {_injection_text(event['step'], guarded.injected, described)}")
        cause = str(diagnosis.get("cause", "unknown"))
        lines.append(f"    cause:    {cause} ({cause_phrase(cause)}), in {diagnosis.get('phase', 'unknown')}")
        where = where_phrase(diagnosis)  # reads the root module ('') as "(root module)", '0' as model[0]
        if where:
            lines.append(f"    where:    {where}")
        lines += [f"    fix:      {fix}" for fix in (diagnosis.get("fixes") or [])[:FIXES_SHOWN]]
    return "\n".join(lines)


def unguarded_line(run: RunResult) -> str:
    first = run.first_nonfinite_step
    weights = "no" if run.weights_finite else "yes"
    if first is None:
        return f"without nanguard: the loss stayed finite; final loss {format_number(run.eval_loss)}; weights NaN: {weights}"
    after = "never recovered" if not run.recovered else "came back finite by the end"
    return f"without nanguard: loss became NaN at step {first} and {after}; weights NaN: {weights}"


def guarded_line(run: RunResult, reference: RunResult | None) -> str:
    actions = Counter(str(event["action"]) for event in run.events)
    handled = ", ".join(f"{n} {action_phrase(action)}" for action, n in actions.items())
    count = len(run.events)
    text = f"with nanguard:    {count} event{'s' if count != 1 else ''} handled"
    text += f" ({handled})" if handled else ""
    if run.aborted:
        text += "; the guard stopped the run"
    text += f", final loss {format_number(run.eval_loss)}"
    if reference is not None:
        text += f" (fault-free reference {format_number(reference.eval_loss)})"
    return text


def comparison_block(guarded: RunResult, unguarded: RunResult | None, reference: RunResult | None) -> str:
    lines = ["Summary (final loss = held-out loss after training):"]
    if unguarded is not None:
        lines.append("  " + unguarded_line(unguarded))
    lines.append("  " + guarded_line(guarded, reference))
    return "\n".join(lines)


def _run_json(run: RunResult | None) -> dict[str, Any] | None:
    if run is None:
        return None
    return {
        "final_loss": _number_or_none(run.eval_loss),
        "finite": math.isfinite(run.eval_loss) and run.weights_finite,
        "weights_nonfinite": not run.weights_finite,
        "first_nonfinite_step": run.first_nonfinite_step,
        "recovered": run.recovered,
        "seconds": round(run.seconds, 3),
    }


def summary_json(runs: tuple[RunResult, RunResult | None, RunResult | None], faults: Sequence[Fault], *,
                 setup: dict[str, Any], report: Path | None, seconds: float) -> dict[str, Any]:
    """The machine-readable summary ``--json`` prints: events, final losses, seconds. ``runs`` is (guarded,
    unguarded, reference); ``setup`` holds ``steps``, ``seed`` and ``out_dir``."""
    guarded, unguarded, reference = runs
    guarded_json = _run_json(guarded) or {}
    guarded_json.update({key: guarded.guard_summary.get(key) for key in ("skipped", "rollbacks", "events")})
    guarded_json["aborted"] = guarded.aborted
    return {
        "steps": setup["steps"],
        "seed": setup["seed"],
        "faults": [
            {"kind": f.kind, "step": f.step, "description": f.description, "expected_cause": f.expected_cause,
             "injected_at": _injected_steps(f.kind, guarded.injected)}
            for f in faults
        ],
        "events": [
            {"step": e["step"], "trigger": e["trigger"], "action": e["action"],
             **{key: (e.get("diagnosis") or {}).get(key) for key in ("cause", "phase", "module", "op", "tensor")},
             "fault": (nearest_fault(e["step"], guarded.injected) or (None, None))[1]}
            for e in guarded.events
        ],
        "guarded": guarded_json,
        "unguarded": _run_json(unguarded),
        "reference": _run_json(reference),
        "out_dir": str(setup["out_dir"]),
        "report": str(report) if report is not None else None,
        "seconds": round(seconds, 3),
    }
