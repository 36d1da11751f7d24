"""One definition of "the same event", used by the console, ``nanguard events``, the report and its plots."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from nanguard.report.load import load_run
from nanguard.report.signature import (
    Signature,
    SignatureTracker,
    group_events,
    group_label,
    same_as_step,
    signature_of,
)


def event(step: int, cause: str = "invalid_math_domain", module: str | None = "head", op: str | None = "aten::log",
          tensor: str | None = None, trigger: str = "nonfinite_loss", same_as: int | None = None) -> dict:
    diagnosis = {"cause": cause, "phase": "loss", "module": module, "op": op, "tensor": tensor}
    if same_as is not None:
        diagnosis["same_as_step"] = same_as
    return {"step": step, "trigger": trigger, "action": "skip", "diagnosis": diagnosis}


def test_signature_is_cause_and_place_not_numbers_or_action() -> None:
    a = event(5)
    b = {**event(9), "action": "rollback", "loss": 3.0}
    b["diagnosis"]["evidence"] = ["different numbers"]
    assert signature_of(a) == signature_of(b) == Signature("invalid_math_domain", "head", "aten::log", None)
    assert signature_of(event(5, tensor="x")) != signature_of(a)
    assert signature_of(event(5, module="")) != signature_of(event(5, module=None))  # root module is a place


def test_unplaced_unknown_diagnoses_are_only_the_same_when_seen_the_same_way() -> None:
    crash = event(3, cause="unknown", module=None, op=None, trigger="exception")
    spike = event(4, cause="unknown", module=None, op=None, trigger="loss_spike")
    assert signature_of(crash) != signature_of(spike)
    assert signature_of(spike) == signature_of(event(8, cause="unknown", module=None, op=None, trigger="loss_spike"))
    placed = event(4, cause="unknown", module="m", op=None, trigger="loss_spike")
    assert signature_of(placed).trigger is None


def test_same_as_step_joins_the_group_of_that_step_even_with_another_place() -> None:
    events = [event(10), event(20, module="other"), event(30, module="third", same_as=10)]
    tracker = SignatureTracker()
    sightings = [tracker.see(e) for e in events]
    assert [(s.group, s.first_step, s.count) for s in sightings] == [(1, 10, 1), (2, 20, 1), (1, 10, 2)]
    assert same_as_step(events[2]) == 10 and same_as_step(events[0]) is None
    assert same_as_step({"diagnosis": {"same_as_step": True}}) is None  # a bool is not a step


def test_a_pointer_to_a_step_outside_the_run_falls_back_to_the_signature() -> None:
    tracker = SignatureTracker()
    first = tracker.see(event(10))
    dangling = tracker.see(event(50, same_as=7))
    assert first.group == dangling.group == 1 and dangling.count == 2


def test_group_labels() -> None:
    assert [group_label(n) for n in (1, 2, 26, 27, 28, 52, 53, 702, 703)] == [
        "A", "B", "Z", "AA", "AB", "AZ", "BA", "ZZ", "AAA"]


def test_repeated_run_groups_into_three_problems(repeated_run_dir: Path) -> None:
    run = load_run(repeated_run_dir)
    groups = group_events(run.events)
    assert [(g.label, len(g.events), g.first.cause) for g in groups] == [
        ("A", 24, "invalid_math_domain"), ("B", 3, "input_nonfinite"), ("C", 3, "learning_rate_spike")]
    assert groups[1].steps == (31, 64, 97)
    assert groups[2].action_counts() == {"rollback": 3}
    positions = sorted(i for g in groups for i in g.indices)
    assert positions == list(range(1, len(run.events) + 1))


@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.sampled_from([None, "m", ""]),
                          st.sampled_from(["nonfinite_loss", "exception"])), max_size=40))
def test_groups_partition_the_events_and_agree_with_the_tracker(specs: list[tuple[str, str | None, str]]) -> None:
    from nanguard.report.load import parse_event

    raw = [event(step, cause=cause, module=module, op=None, trigger=trigger)
           for step, (cause, module, trigger) in enumerate(specs)]
    records = [parse_event(r, path=Path("x"), line=i) for i, r in enumerate(raw, start=1)]
    groups = group_events(records)
    assert sum(len(g.events) for g in groups) == len(records)
    for group in groups:
        assert len({signature_of(e) for e in group.events}) == 1
    assert len({g.signature for g in groups}) == len(groups)
    tracker = SignatureTracker()
    assert [tracker.see(r).group for r in raw] == [next(g.number for g in groups if i in g.indices)
                                                  for i in range(1, len(raw) + 1)]
