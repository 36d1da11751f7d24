"""Rules the zoo showed were missing, checked on their own evidence (no training run needed)."""

from __future__ import annotations

from nanguard.forensics.checks import parse_exception
from nanguard.forensics.replay import ReplayOutcome
from nanguard.forensics.rules import FLOAT32_NORM_OVERFLOW, Facts, diagnose


def _state_nan(name: str = "head.weight") -> dict:
    return {"name": f"{name}.exp_avg_sq", "param": name, "key": "exp_avg_sq", "module": "head", "nan": 1, "inf": 0, "numel": 8}


def test_nan_in_optimizer_state_explains_an_update_that_made_weights_nonfinite() -> None:
    facts = Facts(trigger="nonfinite_weights", update_made_weights_nonfinite=True, optimizer_state=[_state_nan()],
                  weights=[{"name": "head.weight", "module": "head", "kind": "parameter", "nan": 1, "inf": 0, "numel": 8}])
    diagnosis = diagnose(facts)
    assert (diagnosis.cause, diagnosis.phase, diagnosis.tensor) == ("optimizer_state_nonfinite", "state", "head.weight.exp_avg_sq")


def test_an_update_overflow_without_nan_state_stays_update_overflow() -> None:
    inf_only = dict(_state_nan(), nan=0, inf=1)  # finite gradients can overflow a moment to inf
    facts = Facts(trigger="nonfinite_weights", update_made_weights_nonfinite=True, optimizer_state=[inf_only])
    assert diagnose(facts).cause == "update_overflow"


def test_finite_gradients_whose_norm_overflows_float32_are_an_explosion_not_a_transient() -> None:
    huge = FLOAT32_NORM_OVERFLOW * 10
    replay = ReplayOutcome(label="plain", loss=3e33, grad_norms={"rnn.weight_hh_l2": huge, "head.bias": 1.0})
    facts = Facts(trigger="nonfinite_grad", loss=3e33, grad_norm=float("inf"), plain=replay, traced=replay)
    diagnosis = diagnose(facts)
    assert (diagnosis.cause, diagnosis.module, diagnosis.tensor) == ("gradient_explosion", "rnn", "rnn.weight_hh_l2")


def test_a_finite_replay_with_ordinary_gradients_is_still_nondeterministic() -> None:
    replay = ReplayOutcome(label="plain", loss=0.5, grad_norms={"fc.weight": 0.3})
    facts = Facts(trigger="nonfinite_loss", loss=float("nan"), grad_norm=float("nan"), plain=replay, traced=replay)
    assert diagnose(facts).cause == "nondeterministic"


def test_embedding_bag_index_error_is_recognised_with_its_value() -> None:
    parsed = parse_exception(RuntimeError("Index 4 of input takes value 500 which is not in the valid range [0, 500)"))
    assert parsed is not None and (parsed["kind"], parsed["value"]) == ("index_out_of_range", 500)
