"""safe_log, safe_div and masked_mean: log(0), x/0 and the empty masked mean stay finite."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanguard.errors import UsageError
from nanguard.ops import masked_mean, safe_div, safe_log

SETTINGS = settings(
    max_examples=30, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOLERANCE = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-6},
    torch.float16: {"rtol": 1e-3, "atol": 1e-3},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-2},
}
SPECIAL = [
    0.0,
    -0.0,
    1e-45,
    1e-40,
    1.2e-38,
    6e-8,
    6.1e-5,
    1e-3,
    1.0,
    -1.0,
    300.0,
    6e4,
    -6e4,
    1e15,
    -1e15,
    3e38,
    -3e38,
]


def adversarial(dtype: torch.dtype, limit: float = math.inf) -> st.SearchStrategy[float]:
    biggest = min(torch.finfo(dtype).max, limit)
    anything = st.one_of(st.sampled_from(SPECIAL), st.floats(-1e4, 1e4, width=32))
    return anything.map(lambda v: max(-biggest, min(biggest, v)))


def tensor_of(
    draw: st.DrawFn, values: st.SearchStrategy[float], size: int, dtype: torch.dtype
) -> torch.Tensor:
    return torch.tensor(draw(st.lists(values, min_size=size, max_size=size)), dtype=torch.float32).to(dtype)


# ---------------------------------------------------------------------------------------- safe_log


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_safe_log_of_zero_is_finite_with_finite_grad(dtype: torch.dtype) -> None:
    x = torch.tensor([0.0, 1.0, 0.5], dtype=dtype, requires_grad=True)
    assert torch.isinf(torch.log(x.detach()[0]))
    out = safe_log(x)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert out[0].item() == pytest.approx(math.log(torch.finfo(dtype).tiny), rel=1e-2)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert x.grad[0].item() == 0.0


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@SETTINGS
@given(data=st.data())
def test_safe_log_is_finite_and_equals_log_above_the_floor(dtype: torch.dtype, data: st.DataObject) -> None:
    x = tensor_of(data.draw, adversarial(dtype).map(abs), data.draw(st.integers(1, 12)), dtype)
    x.requires_grad_(True)
    out = safe_log(x)
    assert torch.isfinite(out).all()
    out.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    above = x.detach() >= torch.finfo(dtype).tiny
    torch.testing.assert_close(out[above], torch.log(x.detach()[above]), **TOLERANCE[dtype])


def test_safe_log_eps_below_the_dtype_tiny_is_raised_to_it() -> None:
    x = torch.zeros(1, dtype=torch.float16)
    assert torch.isinf(torch.log(torch.tensor(1e-8, dtype=torch.float16)))  # 1e-8 rounds to 0 in fp16
    assert torch.isfinite(safe_log(x, eps=1e-8)).all()
    torch.testing.assert_close(safe_log(torch.zeros(1), eps=1e-3), torch.log(torch.tensor([1e-3])))


def test_safe_log_clamps_negatives_and_passes_nan() -> None:
    out = safe_log(torch.tensor([-1.0, math.nan, math.inf]))
    assert torch.isfinite(out[0]) and torch.isnan(out[1]) and out[2] == math.inf
    assert safe_log(torch.tensor([0, 1])).dtype == torch.get_default_dtype()
    with pytest.raises(UsageError, match="eps must be > 0"):
        safe_log(torch.ones(1), eps=0.0)


# ---------------------------------------------------------------------------------------- safe_div


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@SETTINGS
@given(data=st.data())
def test_safe_div_is_zero_where_b_is_zero_and_a_over_b_elsewhere(
    dtype: torch.dtype, data: st.DataObject
) -> None:
    size = data.draw(st.integers(1, 10))
    a = tensor_of(data.draw, adversarial(dtype), size, dtype).requires_grad_(True)
    b = tensor_of(data.draw, adversarial(dtype), size, dtype).requires_grad_(True)
    out = safe_div(a, b)
    zero = b.detach() == 0
    assert (out[zero] == 0).all()
    torch.testing.assert_close(out[~zero], (a / b).detach()[~zero], rtol=0, atol=0)
    out.float().sum().backward()
    assert a.grad is not None and b.grad is not None
    assert (a.grad[zero] == 0).all() and (b.grad[zero] == 0).all()
    # Elsewhere the gradients are torch.div's, overflow included (-a/b**2 can exceed fp16).
    a_ref, b_ref = a.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    (a_ref / b_ref).float().sum().backward()
    assert a_ref.grad is not None and b_ref.grad is not None
    torch.testing.assert_close(a.grad[~zero], a_ref.grad[~zero], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(b.grad[~zero], b_ref.grad[~zero], rtol=0, atol=0, equal_nan=True)


def test_safe_div_zero_by_zero_is_zero_even_with_nonfinite_numerator() -> None:
    a = torch.tensor([0.0, 5.0, math.inf, math.nan], requires_grad=True)
    b = torch.zeros(4, requires_grad=True)
    out = safe_div(a, b)
    assert out.tolist() == [0.0, 0.0, 0.0, 0.0]
    out.sum().backward()
    assert a.grad is not None and b.grad is not None
    assert a.grad.tolist() == [0.0] * 4 and b.grad.tolist() == [0.0] * 4


def test_safe_div_eps_clamps_small_denominators_keeping_their_sign() -> None:
    a = torch.ones(4)
    b = torch.tensor([0.0, 1e-9, -1e-9, 2.0])
    torch.testing.assert_close(safe_div(a, b, eps=1e-3), torch.tensor([0.0, 1e3, -1e3, 0.5]))
    with pytest.raises(UsageError, match="eps must be > 0"):
        safe_div(a, b, eps=-1.0)


def test_safe_div_broadcasts_and_takes_scalars_like_torch_div() -> None:
    a = torch.arange(6.0).reshape(2, 3)
    b = torch.tensor([0.0, 2.0, 4.0])
    torch.testing.assert_close(safe_div(a, b), torch.tensor([[0.0, 0.5, 0.5], [0.0, 2.0, 1.25]]))
    torch.testing.assert_close(safe_div(1.0, b), torch.tensor([0.0, 0.5, 0.25]))
    torch.testing.assert_close(safe_div(a, 0.0), torch.zeros(2, 3))
    integer = safe_div(torch.tensor([3, 4]), torch.tensor([2, 0]))
    assert integer.dtype == torch.get_default_dtype() and integer.tolist() == [1.5, 0.0]
    assert safe_div(torch.ones(2, dtype=torch.float16), torch.ones(2)).dtype == torch.float32


# ------------------------------------------------------------------------------------- masked_mean


def test_masked_mean_empty_mask_is_zero_with_finite_grad() -> None:
    x = torch.randn(2, 3, requires_grad=True)
    keep = torch.tensor([[True, False, True], [False, False, False]])
    naive = (x.detach() * keep).sum(-1) / keep.sum(-1)
    assert torch.isnan(naive[1])  # 0/0: the failure this op exists for

    out = masked_mean(x, keep, dim=-1)
    assert out[1].item() == 0.0
    torch.testing.assert_close(out[0], x[0, [0, 2]].mean())
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert x.grad.tolist() == [[0.5, 0.0, 0.5], [0.0, 0.0, 0.0]]


def test_masked_mean_of_everything_masked_is_zero() -> None:
    x = torch.randn(4, requires_grad=True)
    out = masked_mean(x, torch.zeros(4, dtype=torch.bool))
    assert out.shape == () and out.item() == 0.0
    out.backward()
    assert x.grad is not None and x.grad.tolist() == [0.0] * 4


@st.composite
def values_and_masks(draw: st.DrawFn, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = draw(st.integers(1, 4)), draw(st.integers(1, 6))
    x = tensor_of(draw, adversarial(dtype, limit=1e4), rows * cols, dtype).reshape(rows, cols)
    mask = torch.tensor(draw(st.lists(st.booleans(), min_size=rows * cols, max_size=rows * cols)))
    mask = mask.reshape(rows, cols)
    return x.masked_fill(~mask, math.nan), mask  # masked entries hold garbage, as padding does


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@SETTINGS
@given(data=st.data())
def test_masked_mean_is_finite_and_matches_the_mean_of_selected_entries(
    dtype: torch.dtype, data: st.DataObject
) -> None:
    x, keep = data.draw(values_and_masks(dtype))
    x.requires_grad_(True)
    per_row = masked_mean(x, keep, dim=1)
    overall = masked_mean(x, keep)
    assert per_row.dtype == dtype and torch.isfinite(per_row).all() and torch.isfinite(overall)
    for row in range(x.shape[0]):
        chosen = x.detach()[row][keep[row]].double()
        expected = chosen.mean().to(dtype) if chosen.numel() else torch.zeros((), dtype=dtype)
        # An fp32 sum of terms that cancel is only accurate to ~eps * sum(|x|).
        cancellation = 1e-6 * chosen.abs().sum().item()
        tolerance = {**TOLERANCE[dtype], "atol": TOLERANCE[dtype]["atol"] + cancellation}
        torch.testing.assert_close(per_row[row], expected, **tolerance)
    (per_row.float().sum() + overall.float()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert (x.grad[~keep] == 0).all()


def test_masked_mean_fp16_sum_does_not_overflow() -> None:
    x = torch.full((1000,), 100.0, dtype=torch.float16)  # the sum, 1e5, does not fit fp16
    out = masked_mean(x, torch.ones(1000, dtype=torch.bool))
    assert out.dtype == torch.float16 and out.item() == 100.0


@pytest.mark.parametrize(
    ("dim", "keepdim"), [(None, False), (None, True), (0, False), (-1, True), ((0, 2), False)]
)
def test_masked_mean_dims_and_shapes_match_torch_mean(
    dim: int | tuple[int, ...] | None, keepdim: bool
) -> None:
    x = torch.randn(2, 3, 4)
    keep = torch.ones(2, 3, 4, dtype=torch.bool)
    expected = (
        x.mean(dim=dim, keepdim=keepdim) if dim is not None else x.mean().reshape([1] * 3 if keepdim else [])
    )
    torch.testing.assert_close(masked_mean(x, keep, dim=dim, keepdim=keepdim), expected)


def test_masked_mean_broadcast_mask_and_bad_masks() -> None:
    tokens = torch.randn(2, 5, 8)  # (batch, seq, hidden); mask over (batch, seq)
    padding = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]])
    pooled = masked_mean(tokens, padding[:, :, None], dim=1)
    torch.testing.assert_close(pooled[0], tokens[0, :3].mean(0))
    assert (pooled[1] == 0).all()
    with pytest.raises(UsageError, match="ambiguous"):
        masked_mean(tokens, padding.float()[:, :, None], dim=1)
    with pytest.raises(UsageError, match="does not broadcast"):
        masked_mean(tokens, padding.bool(), dim=1)
