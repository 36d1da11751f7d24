"""What happened in a run, in a few sentences and numbers: the part of the report read first.

Pure functions over :class:`~nanguard.report.load.RunData`; the HTML and Markdown pages only lay
these values out. Events are told by signature (:mod:`nanguard.report.signature`): thirty skips of
one broken batch field are one problem with thirty steps, not thirty problems.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from nanguard.report.counts import RunCounts, count_run
from nanguard.report.load import EventRecord, HistoryRow, RunData
from nanguard.report.signature import EventGroup, group_events
from nanguard.report.text import action_phrase, format_number, plural, trigger_phrase

LR_CUTTING_ACTIONS = ("lr_backoff", "rollback")
MAX_LISTED_EVENTS = 4
"""Up to this many events, each a problem of its own, the headline names each one; beyond, it tells groups."""
MAX_HEADLINE_GROUPS = 4


@dataclass(frozen=True)
class Outcome:
    """How the run ended: ``state`` is one of finite / non-finite / aborted / unknown."""

    state: str
    step: int | None
    loss: float | None
    why_unknown: str = "no history.csv"

    @property
    def sentence(self) -> str:
        at = f" at step {self.step}" if self.step is not None else ""
        if self.state == "aborted":
            return f"run aborted{at}"
        if self.state == "unknown":
            return f"how the run ended is unknown ({self.why_unknown})"
        loss = f" (last training loss {format_number(self.loss)})" if self.loss is not None else ""
        return f"run ended {self.state}{at}{loss}"


@dataclass(frozen=True)
class FixItem:
    """One distinct fix, the problems (groups) it was suggested for, and the steps they cover.

    ``numbers_from`` is set when the events of those groups wrote the fix with different numbers
    (a count, a row index): the text shown carries that step's numbers.
    """

    text: str
    groups: tuple[EventGroup, ...]
    numbers_from: int | None = None

    @property
    def steps(self) -> tuple[int, ...]:
        return tuple(sorted({step for group in self.groups for step in group.steps}))

    @property
    def events(self) -> int:
        return sum(len(group.events) for group in self.groups)


@dataclass(frozen=True)
class Overview:
    headline: str
    outcome: Outcome
    first_step: int | None
    last_step: int | None
    steps_recorded: int
    counts: RunCounts
    groups: tuple[EventGroup, ...]
    nonfinite_steps: tuple[int, ...]
    fixes: tuple[FixItem, ...]
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
        return Outcome("unknown", None, None, "history.csv has no rows" if run.has_history_file else "no history.csv")
    # A row can lack a loss (history_every > 1 leaves none out, but a crashed write can); use the last known.
    known = [row for row in run.history if row.loss is not None]
    final = known[-1] if known else last
    if final.loss is None:
        return Outcome("unknown", last.step, None, "history.csv records no loss")
    return Outcome("non-finite" if _is_nonfinite(final.loss) else "finite", last.step, final.loss)


_NUMBER = re.compile(r"\d+(?:\.\d+)?(?:e[+-]?\d+)?")


def _shape(fix: str) -> str:
    """A fix with its numbers masked: "clamp 3 zeros" and "clamp 12 zeros" are one fix."""
    return _NUMBER.sub("#", fix)


def distinct_fixes(groups: Sequence[EventGroup]) -> tuple[FixItem, ...]:
    """Each distinct fix once, with every problem it applies to; most events first, then first suggested.

    A group is represented by its first event's fixes (the one explained in full). Fixes that differ
    only in their numbers are one fix; the first wording is kept and says which step its numbers are from.
    """
    found: dict[str, tuple[str, list[EventGroup], set[str]]] = {}
    for group in groups:
        for fix in dict.fromkeys(group.first.fixes):
            _, members, wordings = found.setdefault(_shape(fix), (fix, [], set()))
            members.append(group)
            wordings.add(fix)
        for event in group.events[1:]:
            for fix in event.fixes:
                if _shape(fix) in found:
                    found[_shape(fix)][2].add(fix)
    items = [FixItem(text, tuple(members), members[0].first.step if len(wordings) > 1 else None)
             for text, members, wordings in found.values()]
    return tuple(sorted(items, key=lambda item: -item.events))


def more_fixes(count: int) -> str:
    return (f"{plural(count, 'more fix', 'more fixes')} {'is' if count == 1 else 'are'} not listed here; the cards "
            "below show each problem's fixes, and events.jsonl has every one (`nanguard events DIR`).")


def steps_range(steps: Sequence[int]) -> str:
    """"step 31" / "steps 31, 34, 37" / "steps 31–97"."""
    if len(steps) == 1:
        return f"step {steps[0]}"
    if len(steps) <= 3:
        return "steps " + ", ".join(str(step) for step in steps)
    return f"steps {min(steps)}–{max(steps)}"


def span_phrase(steps: Sequence[int]) -> str:
    """:func:`steps_range`, with the count when the range hides it: "steps 31–97 (30 events)"."""
    return steps_range(steps) + (f" ({len(steps)} events)" if len(steps) > 3 else "")


def group_phrase(group: EventGroup) -> str:
    """"30× NaN loss at steps 31–97 (all skipped)" — or, for a single event, that event's phrase."""
    first = group.first
    if len(group.events) == 1:
        return event_phrase(first)
    what = trigger_phrase(first.trigger, first.loss, first.grad_norm)
    where = steps_range(group.steps)
    counts = group.action_counts()
    if len(counts) == 1:
        actions = f"all {action_phrase(next(iter(counts)))}"
    else:
        actions = ", ".join(f"{n} {action_phrase(a)}" for a, n in counts.items())
    return f"{len(group.events)}× {what} at {where} ({actions})"


def headline(events: Sequence[EventRecord], outcome: Outcome, groups: Sequence[EventGroup] | None = None,
             steps: int | None = None) -> str:
    """The one sentence at the top of the report."""
    if not events:
        if steps == 0 or (steps is None and outcome.state == "unknown"):
            return "No events, and no optimizer step was recorded: nothing was checked."
        return f"No events: every guarded step was finite and in range; {outcome.sentence}."
    groups = group_events(events) if groups is None else groups
    count = plural(len(events), "event")
    if len(events) <= MAX_LISTED_EVENTS and len(groups) == len(events):
        return f"{count}: {', '.join(event_phrase(event) for event in events)}; {outcome.sentence}."
    kinds = ", all of one kind" if len(groups) == 1 else f" of {len(groups)} kinds"
    phrases = [group_phrase(group) for group in groups[:MAX_HEADLINE_GROUPS]]
    if len(groups) > MAX_HEADLINE_GROUPS:
        phrases.append(f"and {plural(len(groups) - MAX_HEADLINE_GROUPS, 'more kind')}")
    return f"{count}{kinds}: {'; '.join(phrases)}; {outcome.sentence}."


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
    groups = group_events(run.events)
    counts = count_run(run, len(groups))
    steps = [row.step for row in run.history] + [event.step for event in run.events]
    multipliers = _lr_multipliers(run.history)
    nonfinite = {row.step for row in run.history if _is_nonfinite(row.loss) or _is_nonfinite(row.grad_norm)}
    nonfinite |= {event.step for event in run.events if _is_nonfinite(event.loss) or _is_nonfinite(event.grad_norm)}
    return Overview(
        headline=headline(run.events, outcome, groups, counts.steps),
        outcome=outcome,
        first_step=min(steps) if steps else None,
        last_step=max(steps) if steps else None,
        steps_recorded=len(run.history),
        counts=counts,
        groups=groups,
        nonfinite_steps=tuple(sorted(nonfinite)),
        fixes=distinct_fixes(groups),
        lr_multiplier_varies=any(not math.isclose(value, 1.0) for value in multipliers),
        final_lr_multiplier=multipliers[-1] if multipliers else None,
        lr_backoffs=count_lr_backoffs(run),
    )
