"""The at-a-glance summary and the pure helpers behind the charts."""

from __future__ import annotations

import json
import math
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from nanguard.report.load import EventRecord, HistoryRow, ModuleStat, RunData, load_run
from nanguard.report.overview import distinct_fixes, headline, run_outcome, summarise
from nanguard.report.plots.curves import thin
from nanguard.report.plots.modules import dtype_limit, select_modules
from nanguard.report.plots.style import choose_scale, outlier_ceiling
from nanguard.report.signature import group_events
from nanguard.report.text import format_number, steps_phrase


def _event(step: int, trigger: str = "loss_spike", action: str = "skip", fixes: tuple[str, ...] = (),
           module: str | None = None) -> EventRecord:
    return EventRecord(line=1, step=step, trigger=trigger, action=action, cause="unknown", phase="unknown",
                       fixes=fixes, module=module)


def test_headline_says_what_when_and_how_it_ended(run_dir: Path) -> None:
    overview = summarise(load_run(run_dir))
    assert overview.headline == (
        "3 events: NaN loss at step 120 (skipped), loss spike at step 300 (rolled back), "
        "divergence at step 340 (LR backed off); run ended finite at step 399 (last training loss 1.813)."
    )
    counts = overview.counts
    assert (counts.skipped, counts.clipped, counts.rollbacks, counts.lr_backoffs, counts.signatures) == (1, 1, 1, 1, 3)
    assert overview.nonfinite_steps == (120,)
    assert overview.lr_multiplier_varies and overview.final_lr_multiplier == 0.5
    assert overview.fixes[0].text == "compute attention scores in float32 (upcast q·k before softmax)"
    assert overview.fixes[0].steps == (120,)


def test_many_events_are_grouped_in_the_headline() -> None:
    events = [_event(step, "nonfinite_loss", module="m") for step in range(10, 16)] + [
        _event(40, "divergence", "lr_backoff")]
    text = headline(events, run_outcome_stub())
    assert text.startswith("7 events of 2 kinds: 6× non-finite loss at steps 10–15 (all skipped); "
                           "divergence at step 40 (LR backed off); run ended finite")


def test_few_repeated_events_are_still_told_as_one_problem() -> None:
    """Four events of one problem read as one problem, not four (the headline listed each before)."""
    events = [_event(step, "nonfinite_loss", module="m", action="skip" if step < 3 else "rollback") for step in range(4)]
    assert headline(events, run_outcome_stub()).startswith(
        "4 events, all of one kind: 4× non-finite loss at steps 0–3 (3 skipped, 1 rolled back);")


def test_no_steps_means_nothing_was_checked() -> None:
    from nanguard.report.overview import Outcome

    assert headline([], Outcome("unknown", None, None), steps=0) == (
        "No events, and no optimizer step was recorded: nothing was checked.")


def run_outcome_stub():
    from nanguard.report.overview import Outcome

    return Outcome("finite", 99, 1.0)


def test_no_events_headline() -> None:
    assert headline([], run_outcome_stub()).startswith("No events: every guarded step was finite")


def test_outcome_aborted_from_event_or_summary(make_run, tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "a")
    (run_dir / "summary.json").write_text(json.dumps({"aborted": True}))
    outcome = run_outcome(load_run(run_dir))
    assert outcome.state == "aborted" and outcome.sentence == "run aborted at step 399"
    events_only = make_run(tmp_path / "b", history=False, summary=False)
    assert run_outcome(load_run(events_only)).state == "unknown"


def test_outcome_non_finite_when_last_loss_is_nan(tmp_path: Path) -> None:
    (tmp_path / "history.csv").write_text("step,loss\n0,1.0\n1,nan\n")
    outcome = run_outcome(load_run(tmp_path))
    assert outcome.state == "non-finite" and outcome.step == 1


def test_each_fix_is_listed_once_with_every_problem_it_applies_to() -> None:
    """"What to do" listed the same aten::log fix four times, each with its own zero count."""
    events = [_event(1, fixes=("clamp 3 zeros", "use logits"), module="a"),
              _event(2, fixes=("clamp 5 zeros", "use logits"), module="a"),
              _event(3, fixes=("drop row 7",), module="b"),
              _event(4, fixes=("use logits", "drop row 9"), module="c")]
    fixes = distinct_fixes(group_events(events))
    assert [(f.text, f.steps, f.numbers_from) for f in fixes] == [
        ("use logits", (1, 2, 4), None), ("clamp 3 zeros", (1, 2), 1), ("drop row 7", (3, 4), 3)]
    assert [g.label for g in fixes[0].groups] == ["A", "C"]


def test_steps_phrase_and_numbers() -> None:
    assert steps_phrase((5,)) == "step 5"
    assert steps_phrase(tuple(range(6))) == "steps 0, 1, 2, 3 and 2 more"
    assert [format_number(v) for v in (None, math.nan, math.inf, -math.inf, 8.7e15)] == ["—", "NaN", "+Inf", "-Inf",
                                                                                       "8.7e+15"]


finite_floats = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e300, max_value=1e300)


@given(st.lists(finite_floats | st.sampled_from([math.nan, math.inf, -math.inf]), max_size=60))
def test_choose_scale_is_consistent(values: list[float]) -> None:
    scale, linthresh = choose_scale(values)
    finite = [v for v in values if math.isfinite(v)]
    if scale == "log":
        assert finite and min(finite) > 0
    if scale == "symlog":
        assert linthresh is not None and linthresh > 0 and min(finite) <= 0
    if scale == "linear":
        assert linthresh is None


def test_choose_scale_examples() -> None:
    assert choose_scale([2.0, 1.9, 1.8]) == ("linear", None)
    assert choose_scale([10.0, 1.0, 0.01]) == ("log", None)
    assert choose_scale([0.0, 1.0, 1e6])[0] == "symlog"


@given(st.lists(st.floats(min_value=0.1, max_value=10.0), min_size=10, max_size=200),
       st.floats(min_value=1e6, max_value=1e30))
def test_outlier_ceiling_pins_a_lone_spike_and_keeps_the_rest(values: list[float], spike: float) -> None:
    values = [*values, *([1.0] * 50)]
    series = [*values, spike]
    ceiling = outlier_ceiling(series)
    assert ceiling is not None and max(values) <= ceiling < spike


def test_outlier_ceiling_leaves_a_divergence_alone() -> None:
    rising = [1.0] * 50 + [10.0**k for k in range(1, 10)]  # 15% "outliers": that is the data
    assert outlier_ceiling(rising) is None
    assert outlier_ceiling([1.0, 2.0, 1e9]) is None  # too few points to call anything an outlier


def test_dtype_limits() -> None:
    assert dtype_limit("torch.float16") == 65504.0
    assert dtype_limit("half") == 65504.0
    bf16 = dtype_limit("bf16")
    assert bf16 is not None and bf16 == dtype_limit("bfloat16") and bf16 > 3e38
    assert dtype_limit("torch.int8") is None and dtype_limit(None) is None


def test_select_modules_keeps_the_culprit_and_order() -> None:
    stats = [ModuleStat(f"m{i}", "float16", float(i), None, False) for i in range(50)]
    stats[3] = ModuleStat("culprit", "float16", None, None, True)
    chosen = select_modules(stats, highlight="m0", limit=10)
    names = [s.module for s in chosen]
    assert len(chosen) == 10 and "culprit" in names and "m0" in names and "m49" in names
    assert names == [s.module for s in stats if s.module in names]  # execution order kept


@given(st.lists(st.floats(min_value=-1e6, max_value=1e6), min_size=1, max_size=3000), st.integers(10, 500))
def test_thin_keeps_extremes_and_order(values: list[float], limit: int) -> None:
    points = list(enumerate(values))
    kept = thin(points, limit)
    assert len(kept) <= (len(points) if len(points) <= limit else limit + 2)
    assert [s for s, _ in kept] == sorted({s for s, _ in kept})
    assert max(values) in {v for _, v in kept} and min(values) in {v for _, v in kept}


def test_rollbacks_that_halve_the_lr_count_as_lr_backoffs(rollback_run_dir: Path) -> None:
    """The demo said "LR backoffs 0" although both of its rollbacks halved the LR multiplier."""
    assert summarise(load_run(rollback_run_dir)).lr_backoffs == 2
    (rollback_run_dir / "history.csv").unlink()  # events alone carry details.lr_multiplier
    assert summarise(load_run(rollback_run_dir)).lr_backoffs == 2


def test_lr_backoffs_ignore_recovery_and_count_a_backoff_without_multiplier(run_dir: Path, tmp_path: Path) -> None:
    assert summarise(load_run(run_dir)).lr_backoffs == 1  # the divergence backoff, seen in history
    events_only = tmp_path / "events_only"
    events_only.mkdir()
    (events_only / "events.jsonl").write_text((run_dir / "events.jsonl").read_text())
    assert summarise(load_run(events_only)).lr_backoffs == 1  # its event has no lr_multiplier: the action counts
    (tmp_path / "history.csv").write_text("step,lr_multiplier\n0,1.0\n1,0.5\n2,0.55\n3,0.6\n4,0.6000000001\n5,0.3\n")
    assert summarise(load_run(tmp_path)).lr_backoffs == 2


@given(st.lists(st.floats(min_value=1e-6, max_value=1.0), max_size=40))
def test_lr_backoffs_count_exactly_the_steps_down(multipliers: list[float]) -> None:
    history = tuple(HistoryRow(step=i, lr_multiplier=m) for i, m in enumerate(multipliers))
    run = RunData(Path("."), (), history, None, has_events_file=False, has_history_file=True)
    previous = [1.0, *multipliers][: len(multipliers)]
    expected = sum(m < p and not math.isclose(m, p) for m, p in zip(multipliers, previous, strict=True))
    assert summarise(run).lr_backoffs == expected


@given(st.lists(st.integers(min_value=0, max_value=100_000), max_size=3000), st.integers(min_value=5, max_value=500))
def test_thin_steps_keeps_order_and_the_first_and_bounds_the_count(steps: list[int], limit: int) -> None:
    from nanguard.report.plots.curves import thin_steps

    kept = thin_steps(steps, limit)
    assert kept == sorted(set(kept)) and set(kept) <= set(steps)
    assert len(kept) <= limit + 1
    if steps:
        assert kept[0] == min(steps)


def test_an_empty_history_says_nothing_was_checked_not_every_step_finite(tmp_path: Path) -> None:
    """A script that crashed before its first optimizer step must not read "every step finite"."""
    (tmp_path / "history.csv").write_text("step,loss\n")
    overview = summarise(load_run(tmp_path))
    assert overview.headline == "No events, and no optimizer step was recorded: nothing was checked."
    assert overview.outcome.sentence == "how the run ended is unknown (history.csv has no rows)"
