"""Every count a person reads about a run, from one place: the report's header, its run summary, the console.

A run leaves the same facts in three files that see them differently: ``events.jsonl`` has one line
per diagnosed step and its action, ``history.csv`` has running totals per recorded step (it also sees
clips and GradScaler skips, which are not events, but may be written only every N steps), and
``summary.json`` has the final totals (or none, when the run was killed). Each number here is a
running total of one thing, so a source that saw less (a history written every N steps, a run cut
short) can only under-count it: the largest value any source reports is the count.

``summary.json``'s ``skipped`` counts every step whose update was not applied: skips *and* the steps
that were rolled back (and GradScaler skips). It is shown as "updates not applied", never as
"skipped", which here means the ``skip`` action alone.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nanguard.report.load import HistoryRow, RunData

SUMMARY_KEYS = {
    "steps": "steps",
    "events": "events",
    "skipped": "updates_not_applied",
    "rollbacks": "rollbacks",
    "clipped": "clipped",
}
"""``summary.json`` key -> the :class:`RunCounts` field that counts the same thing."""

COUNT_LABELS = {
    "steps": "optimizer steps",
    "events": "events",
    "signatures": "distinct problems",
    "skipped": "skipped",
    "rollbacks": "rolled back",
    "clipped": "clipped",
    "updates_not_applied": "updates not applied",
    "lr_backoffs": "LR backed off",
    "aborted": "aborted",
}


def _number(value: Any) -> float | None:
    if value is None or isinstance(value, bool) or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _total(value: Any) -> int:
    number = _number(value)
    return int(number) if number is not None and number > 0 else 0


@dataclass(frozen=True)
class LastLoss:
    """The last training loss recorded (a step's own batch, not a held-out loss) and its step."""

    step: int
    value: float


@dataclass(frozen=True)
class RunCounts:
    steps: int | None
    """Optimizer steps the run made (the largest step seen + 1, or ``summary.json``'s count); None: unknown."""
    events: int
    signatures: int
    skipped: int
    rollbacks: int
    clipped: int
    lr_backoffs: int
    aborted: int
    updates_not_applied: int
    last_loss: LastLoss | None

    def value(self, field_name: str) -> int | None:
        return getattr(self, field_name)


@dataclass(frozen=True)
class Tallies:
    """What one observer saw, before it becomes :class:`RunCounts` (see :func:`derive_counts`)."""

    events: int
    event_actions: Mapping[str, int]
    signatures: int
    history_actions: Mapping[str, int]
    last_row: Mapping[str, Any] | None
    last_step: int | None
    last_loss: LastLoss | None
    summary: Mapping[str, Any] | None = None


def derive_counts(tallies: Tallies) -> RunCounts:
    """The one rule: each count is the largest any source gives for it (see the module docstring)."""
    row = tallies.last_row or {}
    summary = tallies.summary or {}
    events, history = Counter(tallies.event_actions), Counter(tallies.history_actions)
    steps_candidates = [tallies.last_step + 1] if tallies.last_step is not None else []
    if _number(summary.get("steps")) is not None:
        steps_candidates.append(_total(summary.get("steps")))
    rollbacks = max(events["rollback"], history["rollback"], _total(row.get("rollbacks_total")),
                    _total(summary.get("rollbacks")))
    skipped = max(events["skip"], history["skip"])
    return RunCounts(
        steps=max(steps_candidates) if steps_candidates else None,
        events=max(tallies.events, _total(summary.get("events"))),
        signatures=tallies.signatures,
        skipped=skipped,
        rollbacks=rollbacks,
        clipped=max(events["clip"], history["clip"], _total(row.get("clipped_total")), _total(summary.get("clipped"))),
        lr_backoffs=max(events["lr_backoff"], history["lr_backoff"]),
        aborted=max(events["abort"], history["abort"], int(summary.get("aborted") is True)),
        updates_not_applied=max(skipped + rollbacks, _total(row.get("skipped_total")), _total(summary.get("skipped"))),
        last_loss=tallies.last_loss,
    )


def last_loss_of(history: Sequence[HistoryRow]) -> LastLoss | None:
    """The last history row that has a loss (NaN included: it is what the run ended on)."""
    for row in reversed(history):
        if row.loss is not None:
            return LastLoss(row.step, row.loss)
    return None


def _actions(items: Iterable[Any]) -> Counter[str]:
    return Counter(item.action for item in items if item.action != "none")


def _last_row(history: Sequence[HistoryRow]) -> dict[str, Any] | None:
    if not history:
        return None
    last = history[-1]
    return {"step": last.step, "skipped_total": last.skipped_total, "rollbacks_total": last.rollbacks_total,
            "clipped_total": last.clipped_total}


def count_run(run: RunData, signatures: int) -> RunCounts:
    """The counts of a run directory (``signatures``: how many groups :func:`group_events` made)."""
    steps = [row.step for row in run.history] + [event.step for event in run.events]
    return derive_counts(Tallies(
        events=len(run.events), event_actions=_actions(run.events), signatures=signatures, history_actions=_actions(run.history),
        last_row=_last_row(run.history), last_step=max(steps) if steps else None,
        last_loss=last_loss_of(run.history), summary=run.summary,
    ))


def events_phrase(counts: RunCounts) -> str:
    """"4 events (2 skipped, 2 rolled back)"; "30 events of 2 kinds (...)"."""
    if not counts.events:
        return "no events"
    kinds = ""
    if 1 < counts.signatures < counts.events:
        kinds = f" of {counts.signatures} kinds"
    elif counts.signatures == 1 and counts.events > 1:
        kinds = ", all of one kind"
    parts = [f"{n} {COUNT_LABELS[key]}" for key, n in
             (("skipped", counts.skipped), ("rollbacks", counts.rollbacks), ("lr_backoffs", counts.lr_backoffs),
              ("aborted", counts.aborted)) if n]
    actions = f" ({', '.join(parts)})" if parts else ""
    return f"{counts.events} event{'s' if counts.events != 1 else ''}{kinds}{actions}"
