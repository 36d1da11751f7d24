"""Checks that need no trace: batch, state, optimizer, exceptions, spikes."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from nanguard.forensics import checks
from tests.forensics.models import MLP, TinyLM


def test_batch_nonfinite_names_field_counts_and_rows() -> None:
    x = torch.zeros(4, 3)
    x[1, 0], x[3, 2] = float("nan"), float("-inf")
    found = checks.batch_nonfinite({"x": x, "ids": torch.arange(4)})
    assert found == [{"field": "x", "nan": 1, "inf": 1, "numel": 12, "rows": [1, 3], "positions": [[1, 0], [3, 2]]}]


@settings(max_examples=50, deadline=None)
@given(
    history=st.lists(st.floats(0.5, 10.0), min_size=3, max_size=20),
    factor=st.floats(1e-3, 1e6),
)
def test_batch_scale_flags_only_orders_of_magnitude(history: list[float], factor: float) -> None:
    median = sorted(history)[len(history) // 2]
    value = max(history) * factor
    found = checks.batch_scale({"x": torch.tensor([value])}, {"x": history})
    ratio = value / torch.tensor(history).median().item()
    if found:
        assert found[0]["ratio"] >= checks.EXTREME_SCALE_RATIO and value > 10 * max(history)
    else:
        assert (
            ratio < checks.EXTREME_SCALE_RATIO * 1.0001 or value <= 10 * max(history) * 1.0001 or median <= 0
        )


def test_batch_scale_needs_history() -> None:
    assert checks.batch_scale({"x": torch.tensor([1e9])}, {"x": [1.0]}) == []


def test_parse_exception_recognises_data_faults() -> None:
    try:
        F.cross_entropy(torch.randn(2, 3), torch.tensor([0, 3]))
    except IndexError as exc:
        parsed = checks.parse_exception(exc)
    assert parsed is not None and (parsed["kind"], parsed["value"]) == ("target_out_of_bounds", 3)
    assert checks.parse_exception(ValueError("Expected more than 1 value per channel when training"))[
        "kind"
    ] == ("batchnorm_single_value")
    assert checks.parse_exception(RuntimeError("boom"))["kind"] == "other"
    assert checks.parse_exception(None) is None


def test_token_problems_static_prefers_token_fields() -> None:
    model = TinyLM(vocab=11)
    batch = {"input_ids": torch.tensor([[1, 11]]), "labels": torch.tensor([[50, 2]])}
    found = checks.token_problems_static([model], batch)
    assert [(f["field"], f["num_embeddings"], f["max"]) for f in found] == [("input_ids", 11, 11)]


def test_state_and_optimizer_checks_name_tensors() -> None:
    model = MLP()
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    names = {id(p): n for n, p in model.named_parameters()}
    assert checks.optimizer_state_nonfinite(opt, names) == []
    opt.state[model.fc2.bias]["exp_avg"][0] = float("inf")
    with torch.no_grad():
        model.fc1.weight[0, 0] = float("nan")
    (weight,) = checks.state_nonfinite(list(model.named_parameters()), "parameter")
    assert (weight["name"], weight["module"], weight["nan"]) == ("fc1.weight", "fc1", 1)
    (state,) = checks.optimizer_state_nonfinite(opt, names)
    assert (state["name"], state["inf"]) == ("fc2.bias.exp_avg", 1)


def test_simulated_update_reports_without_touching_the_real_optimizer() -> None:
    model = MLP().half()
    opt = torch.optim.Adam(model.parameters(), eps=1e-8)
    (model(torch.randn(2, 4).half()).float().sum() * 1e-4).backward()
    before = [p.detach().clone() for p in model.parameters()]
    names = {id(p): n for n, p in model.named_parameters()}
    result = checks.simulate_update(opt, names)
    assert result is not None and result["became_nonfinite"]
    assert not opt.state, "the real optimizer took no step"
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert checks.eps_underflow(opt) == [{"group": 0, "eps": 1e-8, "dtype": "float16"}]


def test_spike_evidence_uses_guard_stats_or_history() -> None:
    from_stats = checks.spike_evidence(50.0, [], {"grad_mean": 2.0, "grad_std": 1.0}, "grad_norm")
    assert from_stats is not None and from_stats["ratio"] == 25.0 and from_stats["z"] == 48.0
    from_history = checks.spike_evidence(10.0, [1.0, 1.0, 1.0, 1.0, 1.0, 3.0], {}, "loss")
    assert from_history is not None and from_history["mean"] == 1.0
    assert checks.spike_evidence(math.nan, [1.0] * 10, {}, "loss") is None


@given(start=st.floats(0.1, 10.0), slope=st.floats(-0.01, 0.05))
def test_loss_trend_ratio_has_the_sign_of_the_slope(start: float, slope: float) -> None:
    history = [start + slope * i for i in range(40)]
    trend = checks.loss_trend(history)
    assert trend is not None
    if slope > 1e-6:
        assert trend["ratio"] > 1.0
    elif slope < -1e-6:
        assert trend["ratio"] < 1.0
