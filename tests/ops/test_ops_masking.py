"""mask_value, masked_softmax and mask_logits: masking without -inf, finite on every row."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanguard.errors import NanguardError, UsageError
from nanguard.ops import LabelOutOfRangeError, MaskedTargetError, mask_logits, mask_value, masked_softmax

SETTINGS = settings(
    max_examples=30, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOLERANCE = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-6},
    torch.float16: {"rtol": 1e-3, "atol": 1e-3},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-2},
}
# Zeros, subnormals, the dtypes' edges and huge values: what breaks naive masking and softmax.
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
    88.0,
    -88.0,
    300.0,
    6e4,
    -6e4,
    1e15,
    -1e15,
    3e38,
    -3e38,
]


def adversarial(dtype: torch.dtype) -> st.SearchStrategy[float]:
    biggest = torch.finfo(dtype).max
    anything = st.one_of(st.sampled_from(SPECIAL), st.floats(-1e4, 1e4, width=32))
    return anything.map(lambda v: max(-biggest, min(biggest, v)))


@st.composite
def scores_and_mask(draw: st.DrawFn, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A (rows, cols) score matrix and a keep-mask whose rows are all kept, all masked, or mixed."""
    rows, cols = draw(st.integers(1, 4)), draw(st.integers(1, 6))
    values = draw(st.lists(adversarial(dtype), min_size=rows * cols, max_size=rows * cols))
    scores = torch.tensor(values, dtype=torch.float32).reshape(rows, cols).to(dtype)
    mask_rows = []
    for _ in range(rows):
        kind = draw(st.sampled_from(["all_kept", "all_masked", "mixed"]))
        mixed = draw(st.lists(st.booleans(), min_size=cols, max_size=cols))
        mask_rows.append([kind == "all_kept"] * cols if kind != "mixed" else mixed)
    return scores, torch.tensor(mask_rows, dtype=torch.bool)


# ------------------------------------------------------------------------------------- mask_value


@pytest.mark.parametrize("dtype", [*FLOAT_DTYPES, torch.float64])
def test_mask_value_survives_a_second_mask_and_a_row_max_shift(dtype: torch.dtype) -> None:
    fill = torch.tensor(mask_value(dtype), dtype=dtype)
    half_max = torch.tensor(torch.finfo(dtype).max / 2, dtype=dtype)
    assert torch.isfinite(fill) and fill < 0
    assert torch.isfinite(fill + fill)  # two masks added together
    assert torch.isfinite(fill - half_max)  # subtracting a large positive row max
    assert torch.isfinite(fill + fill - 0)  # and still a valid softmax input
    probs = torch.softmax(torch.stack([torch.zeros((), dtype=dtype), fill]).float(), dim=0)
    assert probs.tolist() == [1.0, 0.0]  # as good as -inf for a row with a real entry


def test_mask_value_finfo_min_would_overflow_where_mask_value_does_not() -> None:
    minimum = torch.tensor(torch.finfo(torch.float16).min, dtype=torch.float16)
    assert torch.isinf(minimum + minimum)  # why the fill is not finfo.min itself
    fill = torch.tensor(mask_value(torch.float16), dtype=torch.float16)
    assert torch.isfinite(fill + fill)


@pytest.mark.parametrize("bad", [torch.int64, torch.bool, "float32"])
def test_mask_value_refuses_non_float_dtypes(bad: object) -> None:
    with pytest.raises(UsageError, match="floating-point"):
        mask_value(bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------- masked_softmax


def test_masked_softmax_all_masked_row_gives_zeros_not_nan() -> None:
    scores = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], requires_grad=True)
    keep = torch.tensor([[True, False, True], [False, False, False]])
    naive = torch.softmax(scores.detach().masked_fill(~keep, -math.inf), dim=-1)
    assert torch.isnan(naive[1]).all()  # the failure this op exists for

    probs = masked_softmax(scores, keep)
    assert probs[1].tolist() == [0.0, 0.0, 0.0]
    kept = torch.softmax(torch.tensor([1.0, 3.0]), dim=-1)
    torch.testing.assert_close(probs[0].detach(), torch.stack([kept[0], torch.tensor(0.0), kept[1]]))
    (probs * torch.arange(6.0).reshape(2, 3)).sum().backward()
    assert scores.grad is not None and torch.isfinite(scores.grad).all()
    assert scores.grad[1].tolist() == [0.0, 0.0, 0.0]


def test_masked_softmax_row_of_only_minus_inf_gives_zeros() -> None:
    scores = torch.full((1, 4), -math.inf, requires_grad=True)
    probs = masked_softmax(scores, torch.ones(1, 4, dtype=torch.bool))
    assert probs.tolist() == [[0.0, 0.0, 0.0, 0.0]]
    probs.sum().backward()
    assert scores.grad is not None and torch.isfinite(scores.grad).all()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@SETTINGS
@given(data=st.data())
def test_masked_softmax_is_finite_with_finite_grads(dtype: torch.dtype, data: st.DataObject) -> None:
    scores, keep = data.draw(scores_and_mask(dtype))
    scores.requires_grad_(True)
    probs = masked_softmax(scores, keep)
    assert probs.dtype == dtype
    assert torch.isfinite(probs).all()
    assert (probs[~keep] == 0).all()
    row_sums = probs.float().sum(-1)
    expected = keep.any(-1).float()
    torch.testing.assert_close(row_sums, expected, rtol=0, atol=2e-2 if dtype != torch.float32 else 1e-5)
    upstream = torch.linspace(-1, 1, probs.numel()).reshape(probs.shape)
    (probs.float() * upstream).sum().backward()
    assert scores.grad is not None and torch.isfinite(scores.grad).all()
    assert (scores.grad[~keep] == 0).all()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@SETTINGS
@given(data=st.data())
def test_masked_softmax_matches_torch_softmax_on_rows_with_a_kept_entry(
    dtype: torch.dtype, data: st.DataObject
) -> None:
    scores, keep = data.draw(scores_and_mask(dtype))
    reference = torch.softmax(scores.float().masked_fill(~keep, -math.inf), dim=-1).to(dtype)
    probs = masked_softmax(scores, keep)
    live = keep.any(-1)
    torch.testing.assert_close(probs[live], reference[live], **TOLERANCE[dtype])


def test_masked_softmax_accepts_a_broadcast_key_padding_mask() -> None:
    scores = torch.randn(2, 3, 4, 4)
    key_padding = torch.tensor([[True, True, False, False], [False, False, False, False]])
    probs = masked_softmax(scores, key_padding[:, None, None, :])
    expected = torch.softmax(scores[0, ..., :2], dim=-1)
    torch.testing.assert_close(probs[0, ..., :2], expected)
    assert (probs[0, ..., 2:] == 0).all()
    assert (probs[1] == 0).all()


def test_masked_softmax_along_another_dim() -> None:
    scores = torch.randn(3, 5)
    keep = torch.tensor([True, False, True])[:, None].expand(3, 5)
    probs = masked_softmax(scores, keep, dim=0)
    torch.testing.assert_close(probs[[0, 2]], torch.softmax(scores[[0, 2]], dim=0))
    assert (probs[1] == 0).all()


def test_masked_softmax_ignores_nan_at_masked_entries_but_not_at_kept_ones() -> None:
    scores = torch.tensor([[1.0, math.nan, 2.0]], requires_grad=True)
    probs = masked_softmax(scores, torch.tensor([[True, False, True]]))
    torch.testing.assert_close(probs[0, [0, 2]], torch.softmax(torch.tensor([1.0, 2.0]), -1))
    probs.sum().backward()
    assert scores.grad is not None and torch.isfinite(scores.grad).all()
    assert torch.isnan(masked_softmax(scores.detach(), torch.ones(1, 3, dtype=torch.bool))).all()


def test_masked_softmax_dtype_argument_casts_first_like_torch() -> None:
    scores = torch.randn(2, 5, dtype=torch.float16)
    keep = torch.ones(2, 5, dtype=torch.bool)
    probs = masked_softmax(scores, keep, dtype=torch.float32)
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs, torch.softmax(scores, dim=-1, dtype=torch.float32))


def test_masked_softmax_reads_integer_masks_as_nonzero_keep() -> None:
    scores = torch.randn(2, 3)
    attention_mask = torch.tensor([[1, 1, 0], [0, 0, 0]])  # Hugging Face style
    torch.testing.assert_close(
        masked_softmax(scores, attention_mask), masked_softmax(scores, attention_mask.bool())
    )


def test_masked_softmax_refuses_float_and_unbroadcastable_masks() -> None:
    scores = torch.randn(2, 3)
    with pytest.raises(UsageError, match="ambiguous"):
        masked_softmax(scores, torch.zeros(2, 3))
    with pytest.raises(UsageError, match=r"\(2, 4\).*\(2, 3\)"):
        masked_softmax(scores, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(UsageError, match="does not broadcast"):  # a mask may not enlarge the input
        masked_softmax(scores, torch.ones(5, 2, 3, dtype=torch.bool))
    with pytest.raises(UsageError, match="floating-point"):
        masked_softmax(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.bool))


# ------------------------------------------------------------------------------------- mask_logits


@st.composite
def head_batches(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits (N, C), a (C,) valid-class mask with at least one valid class, targets on valid classes."""
    n, c = draw(st.integers(1, 5)), draw(st.integers(1, 7))
    valid = draw(st.lists(st.booleans(), min_size=c, max_size=c).filter(any))
    valid_classes = [i for i, ok in enumerate(valid) if ok]
    targets = draw(st.lists(st.sampled_from(valid_classes), min_size=n, max_size=n))
    values = draw(st.lists(st.floats(-30, 30, width=32), min_size=n * c, max_size=n * c))
    logits = torch.tensor(values).reshape(n, c)
    return logits, torch.tensor(valid), torch.tensor(targets)


@SETTINGS
@given(batch=head_batches())
def test_mask_logits_loss_equals_cross_entropy_over_the_valid_classes(
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> None:
    logits, valid, target = batch
    masked = mask_logits(logits, valid, target)
    torch.testing.assert_close(masked, logits.masked_fill(~valid, mask_value(logits.dtype)), rtol=0, atol=0)
    assert torch.isfinite(masked).all()
    remap = torch.cumsum(valid.long(), 0) - 1  # class index -> index among valid classes
    expected = F.cross_entropy(logits[:, valid], remap[target])
    torch.testing.assert_close(F.cross_entropy(masked, target), expected)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_mask_logits_fills_invalid_classes_with_a_finite_value_in_every_dtype(dtype: torch.dtype) -> None:
    logits = torch.randn(4, 6).to(dtype).requires_grad_(True)
    valid = torch.tensor([True, True, False, True, False, False])
    target = torch.tensor([0, 1, 3, 0])
    masked = mask_logits(logits, valid, target)
    assert masked.dtype == dtype and torch.isfinite(masked).all()
    loss = F.cross_entropy(masked.float(), target)
    loss.backward()
    assert torch.isfinite(loss) and logits.grad is not None and torch.isfinite(logits.grad).all()
    assert (logits.grad[:, ~valid] == 0).all()


def test_mask_logits_per_sample_masks_and_spatial_layout() -> None:
    logits = torch.randn(2, 4, 3)  # (N, C, d)
    per_sample = torch.tensor([[True, True, False, False], [False, True, True, True]])
    masked = mask_logits(logits, per_sample[:, :, None])
    assert (masked[0, 2:] == mask_value(torch.float32)).all() and (
        masked[1, 0] == mask_value(torch.float32)
    ).all()
    by_class = mask_logits(logits, torch.tensor([True, False, True, True]))  # (C,) goes along dim 1
    assert (by_class[:, 1] == mask_value(torch.float32)).all()
    torch.testing.assert_close(by_class[:, [0, 2, 3]], logits[:, [0, 2, 3]])


def test_mask_logits_raises_naming_samples_and_labels_on_masked_targets() -> None:
    logits = torch.randn(4, 5)
    per_sample = torch.tensor(
        [[True, True, False, False, False]] * 2 + [[False, False, True, True, True]] * 2
    )
    target = torch.tensor([1, 3, 4, 0])  # samples 1 and 3 carry the other dataset's labels
    with pytest.raises(MaskedTargetError) as caught:
        mask_logits(logits, per_sample, target)
    assert caught.value.positions == [(1,), (3,)]
    assert caught.value.labels == [3, 0]
    assert caught.value.count == 2
    message = str(caught.value)
    assert "label 3 at position (1,)" in message and "label 0 at position (3,)" in message
    assert "\n" not in message
    assert isinstance(caught.value, NanguardError)


def test_mask_logits_unmask_keeps_the_target_class_without_checking() -> None:
    logits = torch.randn(3, 4)
    valid = torch.tensor([True, False, False, True])
    target = torch.tensor([1, 0, -100])
    masked = mask_logits(logits, valid, target, on_masked_target="unmask")
    assert masked[0, 1] == logits[0, 1]  # target on an invalid class stays unmasked
    assert masked[1, 1] == mask_value(torch.float32) and masked[2, 1] == mask_value(torch.float32)
    assert (masked[:, 2] == mask_value(torch.float32)).all()


def test_mask_logits_skips_ignore_index_and_rejects_out_of_range_targets() -> None:
    logits = torch.randn(3, 4)
    valid = torch.tensor([True, True, False, False])
    assert torch.isfinite(mask_logits(logits, valid, torch.tensor([0, -100, 1]))).all()
    with pytest.raises(LabelOutOfRangeError, match=r"label 4 at position \(2,\)"):
        mask_logits(logits, valid, torch.tensor([0, 1, 4]))
    with pytest.raises(UsageError, match="on_masked_target"):
        mask_logits(logits, valid, torch.tensor([0, 1, 1]), on_masked_target="ignore")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="target shape"):
        mask_logits(logits, valid, torch.tensor([0, 1]))
