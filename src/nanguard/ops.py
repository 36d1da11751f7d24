"""Numerically safe building blocks: drop-ins for the PyTorch ops behind most NaN post-mortems.

Each function keeps the signature of the op it replaces where there is one, computes the same
value wherever that op is finite, and stays finite (forward and backward) on the inputs that
break it: fully masked softmax rows, all-zero RMSNorm padding rows, ``log(0)``, ``0/0`` in a
masked mean, a target on a masked class, a label outside ``[0, C)``.

Conventions shared by every function here:

* **Boolean masks, True = keep.** ``mask[i]`` True means element ``i`` takes part (attends, is
  counted, is a valid class). Masks must broadcast to the input without enlarging it. Integer
  0/1 masks (Hugging Face's ``attention_mask``) are read as ``mask != 0``. Float masks are refused:
  a float mask may be additive (0 / -inf) or multiplicative (1 / 0) and guessing wrong silently
  inverts it.
* **Masked positions are ignored entirely**: their values (even NaN) do not reach the output, and
  they get exactly zero gradient.
* **Non-finite values at kept positions are not hidden.** A NaN or +inf the caller feeds in still
  shows up in the output: these ops remove singularities of the math, not evidence of a bug.
* **fp16/bf16 accumulate in fp32** and return the input's dtype, as PyTorch's own reductions do.
* **No host synchronisation**, except in the functions whose job is to check values
  (:func:`check_class_targets`, :func:`checked_cross_entropy`, :func:`mask_logits` with a target),
  which say so and cost one sync on the happy path.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nanguard.errors import NanguardError, UsageError

__all__ = [
    "LabelOutOfRangeError",
    "MaskedTargetError",
    "RMSNorm",
    "check_class_targets",
    "checked_cross_entropy",
    "mask_logits",
    "mask_value",
    "masked_mean",
    "masked_softmax",
    "rms_norm",
    "safe_div",
    "safe_log",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_MAX_LISTED = 8  # offending entries named in an error message; the count covers the rest


class LabelOutOfRangeError(NanguardError, ValueError):
    """Class-index targets outside ``[0, num_classes)`` that are not ``ignore_index``.

    ``positions`` and ``labels`` list the first offenders (index tuples into the target tensor and
    their values); ``count`` is how many there are in all.
    """

    def __init__(
        self,
        message: str,
        *,
        positions: list[tuple[int, ...]],
        labels: list[int],
        num_classes: int,
        count: int,
    ) -> None:
        super().__init__(message)
        self.positions = positions
        self.labels = labels
        self.num_classes = num_classes
        self.count = count


class MaskedTargetError(NanguardError, ValueError):
    """A target falls on a masked class (logit -inf or a mask fill): its loss is infinite or absurd.

    ``positions`` and ``labels`` list the first offenders; ``count`` is how many there are in all.
    """

    def __init__(
        self, message: str, *, positions: list[tuple[int, ...]], labels: list[int], count: int
    ) -> None:
        super().__init__(message)
        self.positions = positions
        self.labels = labels
        self.count = count


# --------------------------------------------------------------------------------------------- masks


def mask_value(dtype: torch.dtype) -> float:
    """The finite fill to use instead of ``-inf`` when masking logits or scores of ``dtype``.

    Returns half of ``torch.finfo(dtype).min`` (-1.7e38 for fp32, -1.7e38 for bf16, -32752 for
    fp16). ``-inf`` turns a fully masked softmax row into ``NaN`` (``-inf - -inf``) and a target on
    a masked class into an infinite loss; ``finfo.min`` itself is finite but one more addition (a
    second mask, an ALiBi or position bias, subtracting a large positive row max) overflows it to
    ``-inf``. Half of it leaves room for exactly that: two fills sum to ``finfo.min``, still
    finite, and ``fill - x`` stays finite for any logit ``|x| <= finfo.max / 2``. ``exp`` of the
    fill minus any realistic row max is exactly 0, so masked entries get zero probability as they
    would with ``-inf``. Apply the fill after scaling (``scores * scale`` with ``scale > 2`` would
    overflow it).
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise UsageError(f"mask_value(dtype) needs a floating-point torch.dtype, got {dtype!r}")
    return torch.finfo(dtype).min / 2


def _keep_mask(mask: object, input: Tensor, arg: str) -> Tensor:
    """``mask`` as a boolean keep-mask that broadcasts to ``input``, or a UsageError saying why not."""
    if not isinstance(mask, Tensor):
        raise UsageError(f"{arg} must be a boolean torch.Tensor (True = keep), got {type(mask).__name__}")
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise UsageError(
            f"{arg} must be boolean (True = keep), got dtype {mask.dtype}: a float mask is ambiguous; "
            f"pass mask.bool() for a 0/1 mask or (mask == 0) for an additive 0/-inf mask"
        )
    try:
        shape = torch.broadcast_shapes(mask.shape, input.shape)
    except RuntimeError:
        shape = None
    if shape != input.shape:
        raise UsageError(
            f"{arg} of shape {tuple(mask.shape)} does not broadcast to the input's shape "
            f"{tuple(input.shape)}; give it the input's shape or size-1 dimensions where it repeats"
        )
    return mask if mask.dtype == torch.bool else mask != 0


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def _require_floating(input: object, fn: str) -> Tensor:
    if not isinstance(input, Tensor) or not input.dtype.is_floating_point:
        got = input.dtype if isinstance(input, Tensor) else type(input).__name__
        raise UsageError(f"{fn} needs a floating-point tensor, got {got}")
    return input


def masked_softmax(input: Tensor, mask: Tensor, dim: int = -1, *, dtype: torch.dtype | None = None) -> Tensor:
    """``softmax(input, dim)`` over the entries where ``mask`` is True; masked entries get 0.

    ``mask`` is boolean, True = keep, and broadcasts to ``input`` (e.g. ``(B, 1, 1, S)`` key padding
    for ``(B, H, S, S)`` scores). A row with no kept entry (all masked, or every kept logit -inf)
    comes out as all zeros instead of NaN, with finite (zero) gradients: a fully padded query
    attends to nothing. Masked entries never affect the result, NaN there included. A NaN or +inf
    at a kept entry still makes its row NaN, as in :func:`torch.softmax`.

    ``dtype`` casts the input first, as in :func:`torch.softmax`; fp16/bf16 are computed in fp32.
    """
    _require_floating(input, "masked_softmax")
    keep = _keep_mask(mask, input, "mask")
    if dtype is not None:
        input = input.to(dtype)
    x = input.to(_accumulation_dtype(input.dtype))
    # The shift only guards exp against overflow; softmax does not depend on it, so no gradient.
    row_max = x.detach().masked_fill(~keep, -math.inf).amax(dim, keepdim=True)
    row_max = torch.where(row_max == -math.inf, 0.0, row_max)
    exps = torch.exp(torch.where(keep, x - row_max, -math.inf))
    total = exps.sum(dim, keepdim=True)
    probs = exps / torch.where(total == 0, 1.0, total)
    return probs.to(input.dtype)


def _class_keep_mask(valid_classes_mask: Tensor, logits: Tensor, class_dim: int) -> Tensor:
    """A ``(C,)`` mask applies along the class dimension; anything else must broadcast to ``logits``."""
    num_classes = logits.shape[class_dim]
    if (
        isinstance(valid_classes_mask, Tensor)
        and valid_classes_mask.shape == (num_classes,)
        and logits.dim() > 1
    ):
        shape = [1] * logits.dim()
        shape[class_dim] = num_classes
        valid_classes_mask = valid_classes_mask.reshape(shape)
    return _keep_mask(valid_classes_mask, logits, "valid_classes_mask")


def mask_logits(
    logits: Tensor,
    valid_classes_mask: Tensor,
    target: Tensor | None = None,
    *,
    ignore_index: int = -100,
    on_masked_target: Literal["raise", "unmask"] = "raise",
) -> Tensor:
    """Fill the logits of invalid classes with :func:`mask_value` (finite), for multi-dataset heads.

    ``logits`` is laid out as for :func:`torch.nn.functional.cross_entropy`: ``(C,)``, ``(N, C)`` or
    ``(N, C, d1, ...)``. ``valid_classes_mask`` is boolean, True = the class exists for this sample:
    either ``(C,)`` for the whole batch, or broadcastable to ``logits`` (e.g. ``(N, C)`` when each
    sample comes from a dataset with its own label space).

    With ``target`` (class indices; ``ignore_index`` entries are skipped) the fill never lands on a
    target. A target on an invalid class almost always means the label and the mask come from
    different datasets (a label-mapping bug), so by default this raises :class:`MaskedTargetError`
    naming the samples and labels; targets outside ``[0, C)`` raise :class:`LabelOutOfRangeError`.
    That check costs one host sync. ``on_masked_target="unmask"`` instead keeps each target's class
    unmasked, with no sync and no range check (use it when targets are known good).
    """
    _require_floating(logits, "mask_logits")
    class_dim = 0 if logits.dim() == 1 else 1
    keep = _class_keep_mask(valid_classes_mask, logits, class_dim)
    if target is not None:
        _check_target_shape(logits, target, "mask_logits")
        if on_masked_target == "raise":
            invalid, counted = _at_targets(~keep.expand(logits.shape), target, class_dim, ignore_index)
            masked = invalid & counted
            _raise_on_bad_targets(
                "mask_logits", logits.shape[class_dim], target, ignore_index, masked, _masked_by_mask_text
            )
        elif on_masked_target == "unmask":
            counted = _countable(target, logits.shape[class_dim], ignore_index)
            index = torch.where(counted, target, 0).unsqueeze(class_dim)
            is_target = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
            keep = keep | is_target.scatter(class_dim, index, counted.unsqueeze(class_dim))
        else:
            raise UsageError(f"on_masked_target must be 'raise' or 'unmask', got {on_masked_target!r}")
    return logits.masked_fill(~keep, mask_value(logits.dtype))


# ---------------------------------------------------------------------------------------- RMSNorm


def _as_shape(normalized_shape: int | Sequence[int] | torch.Size) -> tuple[int, ...]:
    shape = (
        (normalized_shape,) if isinstance(normalized_shape, int) else tuple(int(n) for n in normalized_shape)
    )
    if not shape:
        raise UsageError("normalized_shape must name at least one trailing dimension, got ()")
    return shape


def rms_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int] | torch.Size,
    weight: Tensor | None = None,
    eps: float | None = 1e-6,
) -> Tensor:
    """``x / sqrt(mean(x**2) + eps) * weight`` over the trailing ``normalized_shape`` dimensions.

    Same signature and result as :func:`torch.nn.functional.rms_norm`, with the stability choices
    made explicit: ``eps`` is added *inside* the square root (so an all-zero padding row divides
    by ``sqrt(eps)``, not by 0, and its gradient is finite), ``eps`` must be positive (``None``
    means ``torch.finfo(input.dtype).eps``, PyTorch's default), and the sum of squares of fp16/bf16
    input accumulates in fp32 (fp16's ``x**2`` overflows for ``|x| > 256``). Each row is first
    divided by a power of two near its largest magnitude, so ``x**2`` cannot overflow even for fp32
    or bf16 values near the dtype's maximum, where the unscaled formula returns 0 with NaN
    gradients. That costs one extra reduction (the row's max ``|x|``) over the input: in a hot
    loop where activations are known to be moderate, :func:`torch.nn.functional.rms_norm` is the
    faster choice. Returns the input's dtype; NaN/inf inputs give NaN rows, as in PyTorch.
    """
    _require_floating(input, "rms_norm")
    shape = _as_shape(normalized_shape)
    if tuple(input.shape[-len(shape) :]) != shape:
        raise UsageError(
            f"rms_norm: normalized_shape {list(shape)} must match the input's trailing dimensions, "
            f"input shape is {list(input.shape)}"
        )
    if weight is not None and tuple(weight.shape) != shape:
        raise UsageError(
            f"rms_norm: weight shape {list(weight.shape)} must equal normalized_shape {list(shape)}"
        )
    eps = torch.finfo(input.dtype).eps if eps is None else float(eps)
    if not eps > 0:  # also refuses NaN
        raise UsageError(f"rms_norm: eps must be > 0 so zero rows stay finite, got {eps}")
    x = input.to(_accumulation_dtype(input.dtype))
    dims = tuple(range(-len(shape), 0))
    # Dividing by a power of two >= 1 near the row's peak keeps x**2 from overflowing and is exact;
    # the result x / sqrt(mean(x**2) + eps) does not depend on the scale, so it needs no gradient.
    with torch.no_grad():
        peak = x.abs().amax(dims, keepdim=True)
        scale = torch.exp2(torch.floor(torch.log2(peak))).clamp_min(1.0)
    scaled = x / scale
    normed = scaled * torch.rsqrt(scaled.square().mean(dims, keepdim=True) + eps / scale.square())
    if weight is not None:
        normed = normed * weight
    return normed.to(input.dtype)


class RMSNorm(nn.Module):
    """Drop-in for :class:`torch.nn.RMSNorm` that runs :func:`rms_norm`.

    Same constructor and parameter name (``weight``), so ``load_state_dict`` works both ways; the
    default ``eps`` is 1e-6 rather than ``finfo(dtype).eps`` so the floor does not change with
    the dtype. Pass ``eps=None`` for PyTorch's default.
    """

    def __init__(
        self,
        normalized_shape: int | Sequence[int] | torch.Size,
        eps: float | None = 1e-6,
        elementwise_affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.normalized_shape = _as_shape(normalized_shape)
        if eps is not None and not eps > 0:
            raise UsageError(f"RMSNorm: eps must be > 0 so zero rows stay finite, got {eps}")
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self.weight: nn.Parameter | None
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(self.normalized_shape, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)

    def forward(self, input: Tensor) -> Tensor:
        return rms_norm(input, self.normalized_shape, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"


# ----------------------------------------------------------------------------------- log, div, mean


def safe_log(x: Tensor, eps: float | None = None) -> Tensor:
    """``log(max(x, eps))``: finite for zeros, with a finite gradient.

    ``eps`` defaults to ``torch.finfo(x.dtype).tiny`` (the smallest normal number: 1.2e-38 for
    fp32/bf16, 6.1e-5 for fp16) and is raised to it if smaller, since a smaller floor would round
    to 0 or a subnormal whose reciprocal (the gradient) overflows. Values below the floor,
    negatives included, give ``log(eps)`` and zero gradient: this is a clamp, not a domain check.
    NaN and +inf pass through. Integer input is computed in the default float dtype.
    """
    if not x.dtype.is_floating_point:
        x = x.to(torch.get_default_dtype())
    tiny = torch.finfo(x.dtype).tiny
    if eps is not None and not eps > 0:
        raise UsageError(f"safe_log: eps must be > 0, got {eps}")
    return torch.log(x.clamp_min(tiny if eps is None else max(float(eps), tiny)))


def safe_div(a: Tensor | float, b: Tensor | float, eps: float | None = None) -> Tensor:
    """``a / b``, except 0 where ``b == 0``, with zero gradient there.

    The semantics a masked mean needs: ``sum / count`` over an empty set is 0, whatever the sum
    holds, and no gradient flows through it. With ``eps``, nonzero denominators smaller than
    ``eps`` in magnitude are clamped to ``±eps`` (sign kept), bounding the quotient for
    denominators like norms that can be tiny but not meaningfully zero; exact zeros still give 0.
    Elsewhere this is :func:`torch.div` (true division, broadcasting, type promotion), so NaN/inf
    in ``a`` or ``b`` and a genuinely overflowing quotient are not hidden.
    """
    if not isinstance(b, Tensor):
        b = torch.as_tensor(b, device=a.device if isinstance(a, Tensor) else None)
    if not isinstance(a, Tensor):
        a = torch.as_tensor(a, device=b.device)
    if eps is not None and not eps > 0:
        raise UsageError(f"safe_div: eps must be > 0, got {eps}")
    empty = b == 0
    denominator = torch.where(empty, torch.ones_like(b), b)
    if eps is not None:
        clamped = torch.where(denominator < 0, -float(eps), float(eps)).to(denominator.dtype)
        denominator = torch.where(denominator.abs() < eps, clamped, denominator)
    # Where b == 0 this computes 0 / 1: no inf or NaN is ever formed, so none can reach a gradient.
    return torch.div(torch.where(empty, torch.zeros_like(a), a), denominator)


def masked_mean(
    x: Tensor,
    mask: Tensor,
    dim: int | Sequence[int] | None = None,
    keepdim: bool = False,
) -> Tensor:
    """Mean of ``x`` over the entries where ``mask`` is True, along ``dim`` (all dims if None).

    ``mask`` is boolean, True = include, and broadcasts to ``x``. An empty selection gives 0 with
    zero (finite) gradients, not ``0/0 = NaN``; masked entries are ignored entirely (NaN there
    does not leak into the mean). fp16/bf16 sum in fp32, so a mean that fits the dtype never
    fails because the intermediate sum did not.
    """
    if not x.dtype.is_floating_point:
        x = x.to(torch.get_default_dtype())
    keep = _keep_mask(mask, x, "mask")
    dims = tuple(range(x.dim())) if dim is None else ((dim,) if isinstance(dim, int) else tuple(dim))
    values = torch.where(keep, x.to(_accumulation_dtype(x.dtype)), 0.0)
    total = values.sum(dims, keepdim=keepdim)
    count = keep.expand(x.shape).sum(dims, keepdim=keepdim)
    return safe_div(total, count.to(total.dtype)).to(x.dtype)


# --------------------------------------------------------------------------------- target checks


def _check_target_shape(input: Tensor, target: Tensor, fn: str) -> None:
    if not isinstance(target, Tensor):
        raise UsageError(f"{fn}: target must be a torch.Tensor, got {type(target).__name__}")
    class_dim = 0 if input.dim() == 1 else 1
    expected = input.shape[:class_dim] + input.shape[class_dim + 1 :]
    if target.dtype.is_floating_point:
        if fn == "mask_logits":
            raise UsageError(
                "mask_logits: target must hold class indices (an integer tensor), got floating point"
            )
        expected = input.shape
    if target.shape != expected:
        raise UsageError(
            f"{fn}: target shape {list(target.shape)} does not fit input shape {list(input.shape)}; "
            f"class indices need shape {list(expected)} (the input without its class dimension {class_dim})"
        )


def _countable(target: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """Targets that name a real class: not ignore_index and inside [0, C)."""
    return (target != ignore_index) & (target >= 0) & (target < num_classes)


def _at_targets(
    per_class: Tensor, target: Tensor, class_dim: int, ignore_index: int
) -> tuple[Tensor, Tensor]:
    """``per_class`` (shaped like the logits) read at each target's class, and which targets count.

    Entries for targets that do not count (ignore_index, out of range) are read at class 0 and
    must be discarded with the returned mask.
    """
    counted = _countable(target, per_class.shape[class_dim], ignore_index)
    index = torch.where(counted, target, 0).unsqueeze(class_dim)
    return per_class.gather(class_dim, index).squeeze(class_dim), counted


def _offenders(bad: Tensor, target: Tensor) -> tuple[list[tuple[int, ...]], list[int], int]:
    """First offending positions (row-major), their labels, and the total count. Syncs."""
    positions = [tuple(p) for p in bad.nonzero()[:_MAX_LISTED].tolist()]
    labels = [int(v) for v in target[bad][:_MAX_LISTED].tolist()]
    return positions, labels, int(bad.sum())


def _listing(positions: list[tuple[int, ...]], labels: list[int], count: int) -> str:
    shown = ", ".join(
        f"label {label} at position {position}" for position, label in zip(positions, labels, strict=True)
    )
    return shown + (f" (and {count - len(positions)} more)" if count > len(positions) else "")


def _masked_by_mask_text(listing: str, count: int) -> str:
    return (
        f"{count} target(s) fall on a class that valid_classes_mask marks invalid: {listing}; masking them would "
        f"make the loss huge. Check that each sample's mask and label come from the same dataset's label "
        f"space, or pass on_masked_target='unmask'"
    )


def _masked_logit_text(listing: str, count: int) -> str:
    return (
        f"{count} target(s) fall on a masked class (logit -inf or a mask fill): {listing}; the loss there is "
        f"infinite (or ~1e38). Do not mask the target class (nanguard.ops.mask_logits(..., target=...)), "
        f"check the per-dataset class mask matches the labels, or set these targets to ignore_index"
    )


def _smoothing_text(label_smoothing: float) -> Callable[[str, int], str]:
    def text(listing: str, count: int) -> str:
        return (
            f"label_smoothing={label_smoothing} puts target mass on every class, but {count} counted row(s) "
            f"have a masked logit (-inf or a mask fill): {listing}; the loss there is infinite (or ~1e38). Use "
            f"label_smoothing=0 with masked logits, or slice the logits to the valid classes before the loss"
        )

    return text


def _raise_on_bad_targets(
    fn: str,
    num_classes: int,
    target: Tensor,
    ignore_index: int,
    masked: Tensor | None,
    masked_text: Callable[[str, int], str],
) -> None:
    """One host sync on the happy path; the error path may sync more to build its message."""
    out_of_range = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    anything_bad = out_of_range.any() if masked is None else out_of_range.any() | masked.any()
    if not bool(anything_bad):
        return
    if bool(out_of_range.any()):
        positions, labels, count = _offenders(out_of_range, target)
        raise LabelOutOfRangeError(
            f"{fn}: {count} target(s) outside [0, {num_classes}) for {num_classes} classes "
            f"(ignore_index={ignore_index}): {_listing(positions, labels, count)}. Targets must be class "
            f"indices 0..{num_classes - 1}: fix the label mapping or the head's number of classes "
            f"(it has {num_classes} outputs), or set padding targets to ignore_index",
            positions=positions,
            labels=labels,
            num_classes=num_classes,
            count=count,
        )
    assert masked is not None
    positions, labels, count = _offenders(masked, target)
    raise MaskedTargetError(
        f"{fn}: {masked_text(_listing(positions, labels, count), count)}",
        positions=positions,
        labels=labels,
        count=count,
    )


def check_class_targets(target: Tensor, num_classes: int, ignore_index: int = -100) -> None:
    """Raise :class:`LabelOutOfRangeError` if a target is outside ``[0, num_classes)`` and not ignored.

    For data pipelines and dataset checks; costs one host sync. The message names the offending
    labels, their positions in ``target``, and ``num_classes``.
    """
    if not isinstance(target, Tensor) or target.dtype.is_floating_point or target.dtype == torch.bool:
        got = target.dtype if isinstance(target, Tensor) else type(target).__name__
        raise UsageError(f"check_class_targets: target must be an integer tensor of class indices, got {got}")
    _raise_on_bad_targets("check_class_targets", num_classes, target, ignore_index, None, _masked_logit_text)


def _check_probability_targets(
    logits: Tensor, target: Tensor, class_dim: int, label_smoothing: float
) -> None:
    """Soft targets multiply every log-probability by its target mass, so ``0 * -inf`` is NaN too."""
    masked = logits <= mask_value(logits.dtype)
    with_mass = masked if label_smoothing > 0 else masked & (target > 0)
    minus_inf_rows = (logits == -math.inf).any(class_dim)
    bad_rows = with_mass.any(class_dim) | minus_inf_rows
    if not bool(bad_rows.any()):
        return
    positions = [tuple(p) for p in bad_rows.nonzero()[:_MAX_LISTED].tolist()]
    count = int(bad_rows.sum())
    if bool(with_mass.any()):
        why = "put target probability on a masked logit (-inf or a mask fill): the loss there is infinite"
    else:
        why = "have a -inf logit, and soft targets make the loss 0 * -inf = NaN even with zero mass on it"
    raise MaskedTargetError(
        f"checked_cross_entropy: {count} row(s) {why}; first at positions {positions}. Fill masks with "
        f"nanguard.ops.mask_value(dtype) instead of -inf, give masked classes zero target probability, and "
        f"use label_smoothing=0 with masked logits",
        positions=positions,
        labels=[],
        count=count,
    )


def checked_cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> Tensor:
    """:func:`torch.nn.functional.cross_entropy`, after checking the targets can give a finite loss.

    Raises :class:`LabelOutOfRangeError` for class-index targets outside ``[0, C)`` that are not
    ``ignore_index`` (on CUDA these otherwise surface as an unattributable device-side assert, on
    CPU as an IndexError without the label), and :class:`MaskedTargetError` when a target's logit
    is masked (``-inf``, or at or below :func:`mask_value` of the dtype): that loss is infinite.
    With ``label_smoothing > 0`` every class gets target mass, so any masked logit in a counted
    row is reported. Probability targets (same shape as ``input``) are checked for mass on masked
    logits and for any ``-inf`` logit (``0 * -inf`` is NaN in the soft-target loss).

    Cost: the checks run on the device and are reduced to one boolean read with one host sync
    (``.item()``) per call, plus one gather (one pass over the logits with label smoothing). A
    sync stalls the CPU until the GPU catches up, so use this in debugging, data-pipeline checks
    and the guard's replay, and plain ``F.cross_entropy`` on the hot path.
    """
    _require_floating(input, "checked_cross_entropy")
    _check_target_shape(input, target, "checked_cross_entropy")
    class_dim = 0 if input.dim() == 1 else 1
    num_classes = input.shape[class_dim]
    fill = mask_value(input.dtype)
    logits = input.detach()
    if target.dtype.is_floating_point:
        _check_probability_targets(logits, target, class_dim, label_smoothing)
    elif label_smoothing > 0:
        masked = (logits <= fill).any(class_dim) & (target != ignore_index)
        text = _smoothing_text(label_smoothing)
        _raise_on_bad_targets("checked_cross_entropy", num_classes, target, ignore_index, masked, text)
    else:
        target_logit, counted = _at_targets(logits, target, class_dim, ignore_index)
        masked = (target_logit <= fill) & counted
        _raise_on_bad_targets(
            "checked_cross_entropy", num_classes, target, ignore_index, masked, _masked_logit_text
        )
    return F.cross_entropy(
        input,
        target,
        weight=weight,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
    )
