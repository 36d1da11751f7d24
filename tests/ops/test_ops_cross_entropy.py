"""checked_cross_entropy and check_class_targets: bad labels and masked targets named before the loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanguard.errors import NanguardError, UsageError
from nanguard.ops import (
    LabelOutOfRangeError,
    MaskedTargetError,
    check_class_targets,
    checked_cross_entropy,
    mask_value,
)

SETTINGS = settings(
    max_examples=30, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)


@st.composite
def classification_batches(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, C) and valid targets: class indices or ignore_index (-100)."""
    n, c = draw(st.integers(1, 6)), draw(st.integers(1, 8))
    labels = st.one_of(st.integers(0, c - 1), st.just(-100))
    target = torch.tensor(draw(st.lists(labels, min_size=n, max_size=n)))
    values = draw(st.lists(st.floats(-50, 50, width=32), min_size=n * c, max_size=n * c))
    return torch.tensor(values).reshape(n, c), target


@SETTINGS
@given(
    batch=classification_batches(),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    label_smoothing=st.sampled_from([0.0, 0.1]),
    weighted=st.booleans(),
)
def test_checked_cross_entropy_equals_cross_entropy_on_valid_targets(
    batch: tuple[torch.Tensor, torch.Tensor], reduction: str, label_smoothing: float, weighted: bool
) -> None:
    logits, target = batch
    weight = torch.linspace(0.5, 1.5, logits.shape[1]) if weighted else None
    kwargs = {"weight": weight, "reduction": reduction, "label_smoothing": label_smoothing}
    expected = F.cross_entropy(logits, target, **kwargs)  # type: ignore[arg-type]
    torch.testing.assert_close(checked_cross_entropy(logits, target, **kwargs), expected, equal_nan=True)  # type: ignore[arg-type]


@SETTINGS
@given(batch=classification_batches(), data=st.data())
def test_checked_cross_entropy_names_any_out_of_range_label(
    batch: tuple[torch.Tensor, torch.Tensor], data: st.DataObject
) -> None:
    logits, target = batch
    num_classes = logits.shape[1]
    position = data.draw(st.integers(0, target.numel() - 1))
    label = data.draw(
        st.one_of(st.integers(num_classes, num_classes + 1000), st.integers(-1000, -1)).filter(
            lambda v: v != -100
        )
    )
    target[position] = label
    with pytest.raises(LabelOutOfRangeError) as caught:
        checked_cross_entropy(logits, target)
    error = caught.value
    assert (error.positions, error.labels, error.num_classes, error.count) == (
        [(position,)],
        [label],
        num_classes,
        1,
    )
    assert f"label {label} at position ({position},)" in str(error)
    assert f"[0, {num_classes})" in str(error)


def test_checked_cross_entropy_names_label_101_of_101_classes() -> None:
    logits = torch.randn(4, 101)
    target = torch.tensor([3, 100, 101, -100])  # 101 is one past the last class
    with pytest.raises(LabelOutOfRangeError) as caught:
        checked_cross_entropy(logits, target)
    message = str(caught.value)
    assert "label 101 at position (2,)" in message
    assert "outside [0, 101) for 101 classes" in message
    assert "0..100" in message and "ignore_index" in message  # what to fix
    assert "\n" not in message
    assert isinstance(caught.value, NanguardError) and isinstance(caught.value, ValueError)


def test_checked_cross_entropy_lists_the_first_offenders_and_counts_the_rest() -> None:
    target = torch.full((20,), 7)
    with pytest.raises(LabelOutOfRangeError) as caught:
        checked_cross_entropy(torch.randn(20, 5), target)
    assert caught.value.count == 20 and len(caught.value.positions) < 20
    assert "more)" in str(caught.value)


@pytest.mark.parametrize("fill", [-math.inf, mask_value(torch.float32)])
def test_checked_cross_entropy_detects_a_masked_target_logit(fill: float) -> None:
    logits = torch.randn(3, 5)
    logits[1, 4] = fill
    target = torch.tensor([0, 4, 2])
    with pytest.raises(MaskedTargetError) as caught:
        checked_cross_entropy(logits, target)
    assert caught.value.positions == [(1,)] and caught.value.labels == [4]
    assert "masked class" in str(caught.value) and "label 4 at position (1,)" in str(caught.value)


def test_checked_cross_entropy_allows_masked_non_target_and_ignored_rows() -> None:
    logits = torch.randn(3, 5)
    logits[:, 4] = -math.inf  # masked, but no counted target sits on it
    logits[2, 0] = -math.inf  # row 2's target is class 0, but row 2 is ignored
    target = torch.tensor([0, 1, -100])
    loss = checked_cross_entropy(logits, target)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, F.cross_entropy(logits, target))


def test_checked_cross_entropy_refuses_label_smoothing_over_masked_logits() -> None:
    logits = torch.randn(2, 4)
    logits[1, 3] = -math.inf
    target = torch.tensor([0, 1])
    assert torch.isinf(F.cross_entropy(logits, target, label_smoothing=0.1))  # even though targets are fine
    with pytest.raises(MaskedTargetError, match=r"label_smoothing=0\.1") as caught:
        checked_cross_entropy(logits, target, label_smoothing=0.1)
    assert caught.value.positions == [(1,)]


def test_checked_cross_entropy_spatial_targets() -> None:
    logits = torch.randn(2, 3, 4, 4)  # (N, C, H, W) segmentation
    target = torch.randint(0, 3, (2, 4, 4))
    torch.testing.assert_close(checked_cross_entropy(logits, target), F.cross_entropy(logits, target))
    target[1, 2, 3] = 3
    with pytest.raises(LabelOutOfRangeError, match=r"label 3 at position \(1, 2, 3\)"):
        checked_cross_entropy(logits, target)


def test_checked_cross_entropy_unbatched_input() -> None:
    logits = torch.randn(5)
    torch.testing.assert_close(
        checked_cross_entropy(logits, torch.tensor(2)), F.cross_entropy(logits, torch.tensor(2))
    )
    with pytest.raises(LabelOutOfRangeError, match=r"label 5 at position \(\)"):
        checked_cross_entropy(logits, torch.tensor(5))


def test_checked_cross_entropy_probability_targets() -> None:
    logits = torch.randn(3, 4)
    probabilities = torch.softmax(torch.randn(3, 4), -1)
    torch.testing.assert_close(
        checked_cross_entropy(logits, probabilities), F.cross_entropy(logits, probabilities)
    )
    logits[2, 1] = mask_value(torch.float32)
    with pytest.raises(MaskedTargetError, match="target probability") as caught:
        checked_cross_entropy(logits, probabilities)
    assert caught.value.positions == [(2,)]
    probabilities[2] = torch.tensor([0.5, 0.0, 0.25, 0.25])  # no mass on the masked class: fine
    assert torch.isfinite(checked_cross_entropy(logits, probabilities))


def test_checked_cross_entropy_probability_targets_refuse_minus_inf_even_without_mass() -> None:
    logits = torch.randn(2, 3)
    logits[1, 2] = -math.inf
    probabilities = torch.tensor([[0.2, 0.3, 0.5], [0.5, 0.5, 0.0]])
    assert torch.isnan(F.cross_entropy(logits, probabilities))  # 0 * -inf
    with pytest.raises(MaskedTargetError, match="0 \\* -inf = NaN") as caught:
        checked_cross_entropy(logits, probabilities)
    assert caught.value.positions == [(1,)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_checked_cross_entropy_low_precision_logits(dtype: torch.dtype) -> None:
    logits = torch.randn(3, 6).to(dtype)
    target = torch.tensor([5, 0, 2])
    torch.testing.assert_close(checked_cross_entropy(logits, target), F.cross_entropy(logits, target))
    logits[0, 5] = mask_value(dtype)
    with pytest.raises(MaskedTargetError):
        checked_cross_entropy(logits, target)


def test_checked_cross_entropy_refuses_mismatched_shapes() -> None:
    with pytest.raises(UsageError, match=r"target shape \[3\] does not fit input shape \[2, 5\]"):
        checked_cross_entropy(torch.randn(2, 5), torch.tensor([0, 1, 2]))


def test_checked_cross_entropy_gradient_flows_like_cross_entropy() -> None:
    logits = torch.randn(4, 3, requires_grad=True)
    reference = logits.detach().clone().requires_grad_(True)
    target = torch.tensor([0, 2, -100, 1])
    checked_cross_entropy(logits, target).backward()
    F.cross_entropy(reference, target).backward()
    torch.testing.assert_close(logits.grad, reference.grad)


# ------------------------------------------------------------------------------- check_class_targets


def test_check_class_targets_for_data_pipelines() -> None:
    check_class_targets(torch.tensor([0, 9, -100]), num_classes=10)
    with pytest.raises(LabelOutOfRangeError, match=r"label -1 at position \(1,\)"):
        check_class_targets(torch.tensor([0, -1, 3]), num_classes=10)
    check_class_targets(torch.tensor([0, -1]), num_classes=10, ignore_index=-1)
    with pytest.raises(UsageError, match="integer tensor"):
        check_class_targets(torch.tensor([0.0, 1.0]), num_classes=10)
