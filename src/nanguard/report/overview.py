"""What happened in a run, in a few sentences and numbers: the part of the report read first.

Pure functions over :class:`~nanguard.report.load.RunData`; the HTML and Markdown pages only lay
these values out.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from nanguard.report.load import EventRecord, HistoryRow, RunData
from nanguard.report.text import action_phrase, format_number, trigger_phrase

LR_CUTTING_ACTIONS = ("lr_backoff", "rollback")
MAX_LISTED_EVENTS = 4
"""Up to this many events the headline names each one; beyond it, it groups them by kind."""


@dataclass(frozen=True)
class Outcome:
    """How the run ended: ``state`` is one of finite / non-finite / aborted / unknown."""

    state: str
    step: int | None
    loss: float | None

    @property
    def sentence(self) -> str:
        at = f" at step {self.step}" if self.step is not None else ""
        if self.state == "aborted":
            return f"run aborted{at}"
        if self.state == "unknown":
            return "how the run ended is unknown (no history.csv)"
        loss = f" (loss {format_number(self.loss)})" if self.loss is not None else ""
        return f"run ended {self.state}{at}{loss}"


@dataclass(frozen=True)
class Overview:
    headline: str
    outcome: Outcome
    first_step: int | None
    last_step: int | None
    steps_recorded: int
    action_counts: Mapping[str, int]
    nonfinite_steps: tuple[int, ...]
    top_fixes: tuple[tuple[str, tuple[int, ...]], ...]
    lr_multiplier_varies: bool
    final_lr_multiplier: float | None
    lr_backoffs: int = 0
    """Times the LR multiplier went down: by an ``lr_backoff``, and by a rollback that halves the LR."""


def event_phrase(event: EventRecord) -> str:
    """"NaN loss at step 120 (skipped)"."""
    what = trigger_phrase(event.trigger, event.loss, event.grad_norm)
    return f"{what} at step {event.step} ({action_phrase(event.action)})"


def _is_nonfinite(value: float | None) -> bool:
    return value is not None and not math.isfinite(value)


def run_outcome(run: RunData) -> Outcome:
    """Aborted if an event or ``summary.json`` says so; otherwise judged by the last recorded loss."""
    summary = run.summary or {}
    aborted_events = [event for event in run.events if event.action == "abort"]
    summary_says_aborted = summary.get("aborted") is True or str(summary.get("status", "")).lower() == "aborted"
    last = run.history[-1] if run.history else None
    if aborted_events or summary_says_aborted:
        step = aborted_events[-1].step if aborted_events else (last.step if last else None)
        return Outcome("aborted", step, aborted_events[-1].loss if aborted_events else None)
    if last is None:
        return Outcome("unknown", None, None)
    # A row can lack a loss (history_every > 1 leaves none out, but a crashed write can); use the last known.
    known = [row for row in run.history if row.loss is not None]
    final = known[-1] if known else last
    if final.loss is None:
        return Outcome("unknown", last.step, None)
    return Outcome("non-finite" if _is_nonfinite(final.loss) else "finite", last.step, final.loss)


def rank_fixes(events: Sequence[EventRecord]) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """Distinct fixes with the steps of the events that suggested them; most often suggested first.

    Ties keep the order in which the fixes were first suggested (dicts keep insertion order).
    """
    steps: dict[str, list[int]] = {}
    for event in events:
        for fix in dict.fromkeys(event.fixes):
            steps.setdefault(fix, []).append(event.step)
    ranked = sorted(steps.items(), key=lambda item: -len(item[1]))
    return tuple((fix, tuple(fix_steps)) for fix, fix_steps in ranked)


def _grouped_phrases(events: Sequence[EventRecord]) -> list[str]:
    groups: dict[tuple[str, str], list[int]] = {}
    for event in events:
        key = (trigger_phrase(event.trigger, event.loss, event.grad_norm), action_phrase(event.action))
        groups.setdefault(key, []).append(event.step)
    phrases = []
    for (what, action), steps in groups.items():
        where = f"at step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}–{steps[-1]}"
        phrases.append(f"{len(steps)}× {what} {where} ({action})")
    return phrases


def headline(events: Sequence[EventRecord], outcome: Outcome) -> str:
    """The one sentence at the top of the report."""
    if not events:
        return f"No events: every guarded step was finite and in range; {outcome.sentence}."
    count = f"{len(events)} event{'s' if len(events) != 1 else ''}"
    if len(events) <= MAX_LISTED_EVENTS:
        phrases = [event_phrase(event) for event in events]
    else:
        phrases = _grouped_phrases(events)
    return f"{count}: {', '.join(phrases)}; {outcome.sentence}."


def _action_counts(run: RunData) -> dict[str, int]:
    """Counts per action, from history when it has them (it sees clips events do not), else from events."""
    from_history = Counter(row.action for row in run.history if row.action != "none")
    from_events = Counter(event.action for event in run.events if event.action != "none")
    return {action: max(from_history[action], from_events[action]) for action in from_history | from_events}


def _lr_multipliers(history: Sequence[HistoryRow]) -> list[float]:
    return [row.lr_multiplier for row in history if row.lr_multiplier is not None]


def _decreases(values: Sequence[float], start: float = 1.0) -> int:
    """How many times a sequence steps down; float noise (``isclose``) is not a step."""
    count, previous = 0, start
    for value in values:
        if not math.isfinite(value):
            continue
        if value < previous and not math.isclose(value, previous):
            count += 1
        previous = value
    return count


def _event_backoffs(events: Sequence[EventRecord]) -> int:
    """LR cuts the events show: an ``lr_backoff`` or a rollback whose multiplier is below the one before.

    An ``lr_backoff`` event that does not carry its multiplier still counts: the action is the cut.
    """
    count, previous = 0, 1.0
    for event in events:
        value = event.lr_multiplier
        if value is None or not math.isfinite(value):
            count += event.action == "lr_backoff"
            continue
        if event.action in LR_CUTTING_ACTIONS and value < previous and not math.isclose(value, previous):
            count += 1
        previous = value
    return count


def count_lr_backoffs(run: RunData) -> int:
    """How often the guard lowered the LR, whichever action did it (a rollback backs off the LR too).

    ``history.csv`` sees every step's multiplier; events carry the multiplier after their action in
    ``details.lr_multiplier``. A history written every N steps can merge two cuts into one, so the
    larger of the two counts wins.
    """
    return max(_decreases(_lr_multipliers(run.history)), _event_backoffs(run.events))


def summarise(run: RunData) -> Overview:
    outcome = run_outcome(run)
    steps = [row.step for row in run.history] + [event.step for event in run.events]
    multipliers = _lr_multipliers(run.history)
    nonfinite = {row.step for row in run.history if _is_nonfinite(row.loss) or _is_nonfinite(row.grad_norm)}
    nonfinite |= {event.step for event in run.events if _is_nonfinite(event.loss) or _is_nonfinite(event.grad_norm)}
    return Overview(
        headline=headline(run.events, outcome),
        outcome=outcome,
        first_step=min(steps) if steps else None,
        last_step=max(steps) if steps else None,
        steps_recorded=len(run.history),
        action_counts=_action_counts(run),
        nonfinite_steps=tuple(sorted(nonfinite)),
        top_fixes=rank_fixes(run.events),
        lr_multiplier_varies=any(not math.isclose(value, 1.0) for value in multipliers),
        final_lr_multiplier=multipliers[-1] if multipliers else None,
        lr_backoffs=count_lr_backoffs(run),
    )
