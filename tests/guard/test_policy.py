"""The escalation ladder on its own: what each rung decides, and that every reason it gives is true."""

from __future__ import annotations

import pytest

from nanguard.actions.policy import Action, EscalationPolicy
from nanguard.config import GuardConfig


@pytest.mark.parametrize(
    ("cause", "update_applied", "expected"),
    [
        ("invalid_math_domain", False, Action.SKIP),  # streak of skipped steps: weights intact, keep skipping
        ("weights_nonfinite", False, Action.ABORT),  # corrupt state and nothing to restore
        ("invalid_math_domain", True, Action.ABORT),  # a bad update reached the weights
    ],
)
def test_a_streak_without_a_snapshot_aborts_only_when_the_state_is_damaged(
    cause: str, update_applied: bool, expected: Action
) -> None:
    config = GuardConfig()
    policy = EscalationPolicy(config)
    decisions = [policy.decide("nonfinite_loss", cause, can_rollback=False, update_applied=update_applied)
                 for _ in range(config.rollback_after)]
    assert decisions[-1].action is expected
    if expected is Action.SKIP:
        assert "weights were not touched" in decisions[-1].reason
    else:
        assert "corrupt" in decisions[-1].reason


def test_skipping_without_a_snapshot_still_stops_after_abort_after_bad_steps() -> None:
    config = GuardConfig()
    policy = EscalationPolicy(config)
    decisions = [policy.decide("nonfinite_loss", "unknown", can_rollback=False, update_applied=False)
                 for _ in range(config.abort_after)]
    assert [d.action for d in decisions[:-1]] == [Action.SKIP] * (config.abort_after - 1)
    assert decisions[-1].action is Action.ABORT and f"{config.abort_after} bad steps in a row" in decisions[-1].reason


def test_a_streak_with_a_snapshot_rolls_back() -> None:
    config = GuardConfig()
    policy = EscalationPolicy(config)
    decisions = [policy.decide("nonfinite_loss", "unknown", can_rollback=True, update_applied=False)
                 for _ in range(config.rollback_after)]
    assert decisions[-1].action is Action.ROLLBACK and policy.rollbacks == 1
