"""The rule base on hand-built facts: precedence, and wording that quotes numbers."""

from __future__ import annotations

import pytest

from nanguard.causes import CAUSES as REGISTRY
from nanguard.events import CAUSES
from nanguard.forensics.replay import ReplayOutcome
from nanguard.forensics.rules import Facts, diagnose


def test_every_cause_has_fixes() -> None:
    assert set(REGISTRY) == set(CAUSES)
    assert all(entry.fixes for entry in REGISTRY.values())


def test_data_beats_state_beats_trace() -> None:
    facts = Facts(
        batch_nonfinite=[{"field": "x", "nan": 2, "inf": 0, "numel": 8, "rows": [1]}],
        weights=[{"name": "fc.weight", "module": "fc", "kind": "parameter", "nan": 1, "inf": 0, "numel": 4}],
        traced=ReplayOutcome(label="traced", loss=float("nan")),
    )
    assert diagnose(facts).cause == "input_nonfinite"
    facts.batch_nonfinite = []
    d = diagnose(facts)
    assert (d.cause, d.tensor, d.phase) == ("weights_nonfinite", "fc.weight", "state")
    assert "1 NaN" in d.evidence[0]


def test_update_flag_with_nonfinite_gradients_is_not_update_overflow() -> None:
    facts = Facts(
        update_made_weights_nonfinite=True,
        entry_grads=[{"name": "fc.weight", "nan": 3, "inf": 0, "numel": 4}],
    )
    assert diagnose(facts).cause != "update_overflow"
    facts.entry_grads = []
    assert diagnose(facts).cause == "update_overflow"


def test_unknown_says_what_was_checked() -> None:
    facts = Facts(checked=["batch finite", "operator trace"], failures=["trace: boom"])
    d = diagnose(facts)
    assert d.cause == "unknown" and "batch finite" in d.evidence[0]
    assert any("boom" in e for e in d.evidence)


def test_nondeterministic_needs_a_nonfinite_trigger() -> None:
    finite = ReplayOutcome(label="plain", loss=1.0)
    assert diagnose(Facts(trigger="nonfinite_loss", plain=finite)).cause == "nondeterministic"
    assert diagnose(Facts(trigger="loss_spike", plain=finite, loss=9.0)).cause == "loss_spike"


@pytest.mark.parametrize("batch_checked", [True, False])
def test_a_loss_spike_claims_a_clean_batch_only_when_a_batch_was_checked(batch_checked: bool) -> None:
    facts = Facts(trigger="loss_spike", loss=9.0, batch_checked=batch_checked,
                  plain=ReplayOutcome(label="plain", loss=9.0))
    d = diagnose(facts)
    assert d.cause == "loss_spike"
    claims_clean = any("batch finite" in line for line in d.evidence)
    says_unchecked = any("batch was not checked" in line for line in d.evidence)
    assert (claims_clean, says_unchecked) == (batch_checked, not batch_checked)
