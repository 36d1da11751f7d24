"""When two events are "the same": the one definition the console, ``nanguard events``, the report and its plots share.

A run with one broken data file or one fragile op fires the same event again and again. People need
it explained once, then counted. An event's *signature* is its diagnosis's cause and where the first
bad value was born: module, op and tensor (the diagnosis contract in DESIGN.md). An event whose
``diagnosis.same_as_step`` names an earlier event belongs to that event's group, whatever else it
says, because the guard carried that diagnosis over instead of replaying the step again.

A diagnosis of ``unknown`` with no place says nothing about where, so two of them are only the same
when they were also seen the same way (their trigger): an exception and a loss spike that both ended
up unexplained are not one problem.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from nanguard.report.load import EventRecord


@dataclass(frozen=True)
class Signature:
    cause: str
    module: str | None = None
    op: str | None = None
    tensor: str | None = None
    trigger: str | None = None
    """Set only for an unlocated ``unknown`` diagnosis (see the module docstring)."""


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _diagnosis(event: Mapping[str, Any]) -> Mapping[str, Any]:
    diagnosis = event.get("diagnosis")
    return diagnosis if isinstance(diagnosis, Mapping) else {}


def signature_of(event: EventRecord | Mapping[str, Any]) -> Signature:
    """The signature of an ``events.jsonl`` record (a dict) or of a loaded :class:`EventRecord`."""
    if isinstance(event, EventRecord):
        cause, module, op, tensor, trigger = event.cause, event.module, event.op, event.tensor, event.trigger
    else:
        diagnosis = _diagnosis(event)
        cause = str(diagnosis.get("cause") or "unknown")
        module, op, tensor = (_text(diagnosis.get(key)) for key in ("module", "op", "tensor"))
        trigger = str(event.get("trigger", ""))
    unplaced = cause == "unknown" and module is None and op is None and tensor is None
    return Signature(cause, module, op, tensor, trigger if unplaced else None)


def same_as_step(event: EventRecord | Mapping[str, Any]) -> int | None:
    """The step of the investigated event this one's diagnosis was carried over from, if any."""
    value = event.same_as_step if isinstance(event, EventRecord) else _diagnosis(event).get("same_as_step")
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def group_label(number: int) -> str:
    """1 -> "A", 26 -> "Z", 27 -> "AA": short enough for a plot lane and a card title."""
    label = ""
    while number > 0:
        number, rest = divmod(number - 1, 26)
        label = chr(ord("A") + rest) + label
    return label


@dataclass(frozen=True)
class Sighting:
    """One event as the tracker placed it: its group (1-based), the group's first step, the count so far."""

    group: int
    first_step: int
    count: int

    @property
    def is_first(self) -> bool:
        return self.count == 1

    @property
    def label(self) -> str:
        return group_label(self.group)


@dataclass
class SignatureTracker:
    """Places events into groups one at a time, in the order they happened (the console's view).

    :func:`group_events` runs the same tracker over a whole run, so the report and the console
    can never group differently.
    """

    _by_signature: dict[Signature, int] = field(default_factory=dict)
    _by_step: dict[int, int] = field(default_factory=dict)
    _first_steps: list[int] = field(default_factory=list)
    _counts: list[int] = field(default_factory=list)

    def see(self, event: EventRecord | Mapping[str, Any]) -> Sighting:
        step = event.step if isinstance(event, EventRecord) else event.get("step")
        step = step if isinstance(step, int) and not isinstance(step, bool) else -1
        signature = signature_of(event)
        pointer = same_as_step(event)
        group = self._by_step.get(pointer) if pointer is not None else None
        if group is None:
            group = self._by_signature.get(signature)
        if group is None:
            self._first_steps.append(step)
            self._counts.append(0)
            group = len(self._counts)
        self._by_signature.setdefault(signature, group)
        self._by_step.setdefault(step, group)
        self._counts[group - 1] += 1
        return Sighting(group, self._first_steps[group - 1], self._counts[group - 1])

    @property
    def groups(self) -> int:
        return len(self._counts)


@dataclass(frozen=True)
class EventGroup:
    """Every event of one signature, in file order; ``events[0]`` is the one explained in full."""

    number: int
    events: tuple[EventRecord, ...]
    indices: tuple[int, ...]
    """1-based positions of the events in the run (the events table numbers them so)."""

    @property
    def first(self) -> EventRecord:
        return self.events[0]

    @property
    def label(self) -> str:
        return group_label(self.number)

    @property
    def signature(self) -> Signature:
        return signature_of(self.first)

    @property
    def steps(self) -> tuple[int, ...]:
        return tuple(event.step for event in self.events)

    def action_counts(self) -> dict[str, int]:
        """Per action, in the order actions first appeared in the group."""
        counts: dict[str, int] = {}
        for event in self.events:
            counts[event.action] = counts.get(event.action, 0) + 1
        return counts


def group_events(events: Sequence[EventRecord]) -> tuple[EventGroup, ...]:
    """The run's events by signature, groups in order of their first event."""
    tracker = SignatureTracker()
    members: list[list[int]] = []
    for index, event in enumerate(events):
        sighting = tracker.see(event)
        if sighting.is_first:
            members.append([])
        members[sighting.group - 1].append(index)
    return tuple(EventGroup(number, tuple(events[i] for i in indices), tuple(i + 1 for i in indices))
                 for number, indices in enumerate(members, start=1))


def group_of_index(groups: Iterable[EventGroup]) -> dict[int, EventGroup]:
    """Event position (1-based) -> its group: for tables that list every event."""
    return {index: group for group in groups for index in group.indices}
