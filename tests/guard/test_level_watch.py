"""The level watch (nanguard.actions.level): a persistent jump is a level shift; a rise or noise is not."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from nanguard.actions.level import BEFORE, PERSIST, LevelWatch


def _feed(values: list[float], *, warm: bool = True) -> list[int]:
    watch = LevelWatch()
    return [shift.step for step, v in enumerate(values) if (shift := watch.observe(step, v, warm=warm)) is not None]


def test_a_jump_after_a_falling_warm_up_is_one_shift_at_its_first_step():
    warm_up = [4.2 - 0.05 * i for i in range(50)]  # 4.2 -> 1.75, the shape of nanoGPT's first 60 iterations
    settled = [1.7 + 0.1 * (i % 3) for i in range(10)]
    new_level = [6.3, 6.5, 6.3, 5.9, 5.7, 5.5, 5.2, 5.0]
    assert _feed(warm_up + settled + new_level) == [60]


def test_no_shift_before_the_statistics_are_warm_or_on_non_positive_losses():
    values = [1.0] * 20 + [5.0] * 5
    assert _feed(values, warm=False) == []
    assert _feed([-v for v in values]) == []


@given(start=st.floats(1e-9, 1e6), rate=st.floats(1.0, 100.0))
def test_a_steady_exponential_rise_is_never_a_level_shift(start, rate):
    values = [start * rate ** i for i in range(BEFORE + PERSIST + 5)]
    assert _feed([v for v in values if v < 1e300]) == []
