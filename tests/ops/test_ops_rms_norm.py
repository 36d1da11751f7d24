"""rms_norm and RMSNorm: eps inside the sqrt, fp32 accumulation, finite gradients on zero rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanguard.errors import UsageError
from nanguard.ops import RMSNorm, rms_norm

SETTINGS = settings(
    max_examples=30, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOLERANCE = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.float16: {"rtol": 1e-3, "atol": 2e-3},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 2e-2},
}
SPECIAL = [
    0.0,
    -0.0,
    1e-45,
    1e-40,
    1.2e-38,
    6e-8,
    6.1e-5,
    1.0,
    -1.0,
    300.0,
    -300.0,
    6e4,
    -6e4,
    1e15,
    -1e15,
    3e38,
]


def adversarial(dtype: torch.dtype) -> st.SearchStrategy[float]:
    biggest = torch.finfo(dtype).max
    anything = st.one_of(st.sampled_from(SPECIAL), st.floats(-1e4, 1e4, width=32))
    return anything.map(lambda v: max(-biggest, min(biggest, v)))


@st.composite
def rows(draw: st.DrawFn, dtype: torch.dtype, magnitude: float | None = None) -> torch.Tensor:
    """(rows, width) activations; some rows are all-zero padding."""
    n, width = draw(st.integers(1, 4)), draw(st.integers(1, 8))
    values = st.floats(-magnitude, magnitude, width=32) if magnitude else adversarial(dtype)
    data = draw(st.lists(values, min_size=n * width, max_size=n * width))
    x = torch.tensor(data, dtype=torch.float32).reshape(n, width)
    padding = torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    return x.masked_fill(padding[:, None], 0.0).to(dtype)


def test_rms_norm_zero_row_has_finite_grad() -> None:
    x = torch.zeros(2, 4)
    x[0] = torch.tensor([1.0, -2.0, 3.0, 0.5])
    x.requires_grad_(True)
    naive = x.detach() / x.detach().pow(2).mean(-1, keepdim=True).sqrt()
    assert torch.isnan(naive[1]).all()  # 0 / 0 without eps: the padding-row failure

    out = rms_norm(x, (4,), eps=1e-6)
    assert out[1].tolist() == [0.0, 0.0, 0.0, 0.0]
    out.mul(torch.arange(8.0).reshape(2, 4)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    torch.testing.assert_close(x.grad[1], torch.arange(4.0, 8.0) / 1e-6**0.5)  # d/dx of x/sqrt(eps) at 0


def test_rms_norm_adds_eps_inside_the_sqrt() -> None:
    x = torch.tensor([[3.0, 4.0]])
    eps = 0.5
    expected = x / torch.sqrt((x**2).mean() + eps)
    torch.testing.assert_close(rms_norm(x, 2, eps=eps), expected)


def test_rms_norm_huge_fp32_row_is_normalised_not_zeroed() -> None:
    x = torch.tensor([[3e38, -1e38, 0.0, 1e30]], requires_grad=True)
    assert torch.isinf(x.detach().pow(2).sum())  # the unscaled sum of squares overflows
    out = rms_norm(x, 4)
    expected = F.rms_norm(x.detach().double(), [4], eps=1e-6).float()
    torch.testing.assert_close(out.detach(), expected)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_rms_norm_fp16_accumulates_in_fp32() -> None:
    x = torch.full((1, 8), 300.0, dtype=torch.float16)  # 300**2 = 9e4 overflows fp16
    assert torch.isinf(x.pow(2)).all()
    out = rms_norm(x, 8)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, torch.ones(1, 8, dtype=torch.float16))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@SETTINGS
@given(data=st.data())
def test_rms_norm_is_finite_with_finite_grads(dtype: torch.dtype, data: st.DataObject) -> None:
    x = data.draw(rows(dtype)).requires_grad_(True)
    weight = torch.linspace(0.5, 2.0, x.shape[-1]).to(dtype).requires_grad_(True)
    out = rms_norm(x, x.shape[-1:], weight)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    upstream = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
    (out.float() * upstream).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert weight.grad is not None and torch.isfinite(weight.grad).all()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@SETTINGS
@given(data=st.data())
def test_rms_norm_matches_torch_where_torch_is_finite(dtype: torch.dtype, data: st.DataObject) -> None:
    x = data.draw(rows(dtype))
    weight = torch.linspace(0.5, 2.0, x.shape[-1]).to(dtype)
    reference = F.rms_norm(x.double(), [x.shape[-1]], weight.double(), eps=1e-6).to(dtype)
    out = rms_norm(x, [x.shape[-1]], weight, eps=1e-6)
    finite_rows = torch.isfinite(reference).all(-1)  # huge rows included: the fp32 sum of squares is scaled
    torch.testing.assert_close(out[finite_rows], reference[finite_rows], **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@SETTINGS
@given(data=st.data())
def test_rms_norm_matches_torch_rms_norm_on_moderate_inputs(dtype: torch.dtype, data: st.DataObject) -> None:
    x = data.draw(rows(dtype, magnitude=100.0))
    out = rms_norm(x, x.shape[-1], None, eps=None)  # None: finfo(dtype).eps, as torch
    reference = F.rms_norm(x.float(), [x.shape[-1]], None, eps=torch.finfo(dtype).eps).to(dtype)
    torch.testing.assert_close(out, reference, **TOLERANCE[dtype])


def test_rms_norm_over_several_trailing_dims() -> None:
    x = torch.randn(2, 3, 4)
    weight = torch.rand(3, 4)
    torch.testing.assert_close(rms_norm(x, (3, 4), weight), F.rms_norm(x, [3, 4], weight, eps=1e-6))


def test_rms_norm_refuses_bad_shapes_and_eps() -> None:
    x = torch.randn(2, 4)
    with pytest.raises(UsageError, match="trailing dimensions"):
        rms_norm(x, 3)
    with pytest.raises(UsageError, match="weight shape"):
        rms_norm(x, 4, torch.ones(3))
    with pytest.raises(UsageError, match="eps must be > 0"):
        rms_norm(x, 4, eps=0.0)
    with pytest.raises(UsageError, match="at least one"):
        rms_norm(x, ())
    with pytest.raises(UsageError, match="floating-point"):
        rms_norm(torch.ones(2, 4, dtype=torch.long), 4)


# ------------------------------------------------------------------------------------------ RMSNorm


def test_rmsnorm_module_is_a_drop_in_for_torch_rmsnorm() -> None:
    ours, theirs = RMSNorm(6, eps=1e-6), torch.nn.RMSNorm(6, eps=1e-6)
    with torch.no_grad():
        theirs.weight.copy_(torch.linspace(0.1, 2.0, 6))
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 5, 6)
    torch.testing.assert_close(ours(x), theirs(x))
    theirs.load_state_dict(ours.state_dict())  # and back
    assert [name for name, _ in ours.named_parameters()] == ["weight"]


def test_rmsnorm_module_zero_rows_and_options() -> None:
    norm = RMSNorm([4], elementwise_affine=False, dtype=torch.bfloat16)
    assert norm.weight is None and list(norm.parameters()) == []
    x = torch.zeros(2, 4, dtype=torch.bfloat16, requires_grad=True)
    norm(x).float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert "eps=1e-06" in repr(RMSNorm(4))
    with pytest.raises(UsageError, match="eps must be > 0"):
        RMSNorm(4, eps=-1.0)
    assert RMSNorm(4, dtype=torch.float16).weight.dtype == torch.float16  # type: ignore[union-attr]
