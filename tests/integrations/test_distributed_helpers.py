"""Single-process behaviour of the lockstep helpers (the 2-rank behaviour is in test_distributed.py)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from nanguard import distributed as dist_utils
from nanguard.step.lockstep import decide_together
from nanguard.step.norms import all_finite, total_norm


def test_decide_together_without_distributed_runs_locally_and_survives_failures() -> None:
    assert decide_together(None, lambda: "mine", lambda: "fallback") == "mine"

    def broken() -> str:
        raise RuntimeError("replay failed")

    assert decide_together(1, broken, lambda: "fallback") == "fallback"


def test_unwrap_model_finds_the_users_module() -> None:
    inner = nn.Linear(2, 2)
    assert dist_utils.unwrap_model(nn.DataParallel(inner)) is inner
    assert dist_utils.unwrap_model(inner) is inner


def test_plain_models_are_not_sharded_and_isolated_replay_is_a_no_op() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    assert not dist_utils.uses_sharded_parameters([model])
    assert not dist_utils.is_dtensor(model[0].weight)
    with dist_utils.isolated_replay([model]):
        model(torch.randn(4, 2)).sum().backward()
    assert model[0].weight.grad is not None


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=1, max_size=12),
       st.sampled_from([None, float("nan"), float("inf")]))
def test_total_norm_of_plain_tensors_matches_torch(values: list[float], poison: float | None) -> None:
    tensors = [torch.tensor(values), torch.tensor(values[::-1], dtype=torch.float64)]
    if poison is not None:
        tensors[1][0] = poison
    expected = torch.nn.utils.get_total_norm([t.float() for t in tensors])
    got = total_norm(tensors)
    assert got.dtype == torch.float32
    assert bool(all_finite(tensors)) == (poison is None)
    if poison is None:
        assert torch.allclose(got, expected, rtol=1e-5)
    else:
        assert not torch.isfinite(got)


def test_event_details_with_nan_rank_flags_are_strict_json() -> None:
    """Regression: rank 0 crashed writing an event whose per-rank flags held the bad rank's NaN loss."""
    import json

    from nanguard.events import Event

    event = Event(step=3, trigger="nonfinite_loss", action="skip", details={"rank_flags": [[1.0], [float("nan")], [float("-inf")]]})
    payload = json.dumps(event.to_dict(), allow_nan=False)
    assert json.loads(payload)["details"]["rank_flags"] == [[1.0], ["nan"], ["-inf"]]
