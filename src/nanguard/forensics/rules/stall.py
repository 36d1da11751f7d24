"""The words for training that stopped moving: a diagnosis per finding of the stall watch.

The stall watch (:mod:`nanguard.step.stall`) and the misuse check (:mod:`nanguard.step.misuse`) measure; this
module turns what they measured into one :class:`~nanguard.events.Diagnosis` each, with evidence that says
only what was measured and fixes from the cause registry. Nothing here replays a step: the measurements are
the evidence. (A GradScaler skip whose NaN survives loss scale 1 is diagnosed by the replay rules, through
the ordinary investigation; see :mod:`nanguard.forensics.scale`.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from nanguard.causes import fixes_for
from nanguard.events import Diagnosis
from nanguard.forensics.rules.facts import fmt

MANTISSA_BITS = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23, torch.float64: 52}


def half_ulp(value: float, dtype: torch.dtype) -> float:
    """Half the spacing of ``dtype``'s numbers at ``value``: an update smaller than this rounds away."""
    if value <= 0 or not math.isfinite(value) or dtype not in MANTISSA_BITS:
        return math.nan
    exponent = math.frexp(value)[1] - 1  # value = m * 2**exponent with 1 <= m < 2
    return 2.0 ** (exponent - MANTISSA_BITS[dtype] - 1)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class GroupSample:
    """One (param group, dtype) of one stall sample: how many sampled elements had a gradient, how many the
    update left bit-identical, and the summed update and weight magnitudes over those elements."""

    group: int
    dtype: torch.dtype
    tensors: int
    with_grad: int
    unchanged: int
    update_sum: float
    weight_sum: float

    @property
    def fraction(self) -> float:
        return self.unchanged / self.with_grad if self.with_grad else 0.0

    @property
    def ratio(self) -> float:
        """Mean update over mean weight magnitude (the update-to-weight ratio)."""
        return self.update_sum / self.weight_sum if self.weight_sum > 0 else math.nan

    @property
    def mean_weight(self) -> float:
        return self.weight_sum / self.with_grad if self.with_grad else math.nan


def underflow(samples: list[tuple[int, list[GroupSample]]], lr: float | None, optimizer: str) -> Diagnosis:
    """Updates left most weights bit-identical at consecutive samples, while the gradients had not vanished."""
    step, groups = samples[-1]
    worst = max(groups, key=lambda g: (g.fraction, g.with_grad))
    fractions = ", ".join(f"{fmt(100 * _fraction(gs))}% at step {s}" for s, gs in samples)
    dtype = dtype_name(worst.dtype)
    weight = worst.mean_weight
    half = half_ulp(weight, worst.dtype)
    evidence = [
        f"the update left {fractions} of the sampled weights that had a non-zero gradient bit-identical "
        f"(sampled on the device every few steps; {sum(g.with_grad for g in groups)} elements at step {step})",
        f"worst: param group {worst.group}, {dtype} ({worst.tensors} tensor(s)): {fmt(100 * worst.fraction)}% "
        f"unchanged, update-to-weight ratio {fmt(worst.ratio)}; half a {dtype} ULP at the mean |w| = {fmt(weight)} "
        f"is {fmt(half)} ({fmt(half / weight if weight > 0 else math.nan)} of the weight)",
        "the gradients had not vanished (their norm is well above 1/1000 of its peak), so the weights should "
        "still move: the updates round away",
    ]
    if lr is not None:
        evidence.append(f"{optimizer} at lr {fmt(lr)}"
                        + (f": an Adam-type step moves a weight by about lr, below half a ULP of {fmt(weight)}"
                           if "Adam" in optimizer and lr < half else ""))
    low = worst.dtype in (torch.float16, torch.bfloat16)
    fixes = fixes_for("update_underflow", dtype=f"torch.{dtype}" if low else "torch.bfloat16",
                      half_ulp=half, weight=weight)
    if not low:  # fp32 weights already: the fix is the learning rate (or the schedule), not masters
        fixes = [f"The weights are already {dtype}: the learning rate (lr {fmt(lr)}) is too small for updates to "
                 "change them; check the schedule and the optimizer's scaling.", fixes[-1]]
    return Diagnosis(cause="update_underflow", phase="optimizer", confidence=0.8, evidence=evidence, fixes=fixes)


def _fraction(groups: list[GroupSample]) -> float:
    total = sum(g.with_grad for g in groups)
    return sum(g.unchanged for g in groups) / total if total else 0.0


@dataclass(frozen=True)
class ZeroLr:
    """A param group whose learning rate went from positive to 0 and stayed there."""

    group: int
    since: int
    steps: int
    before: float
    tensors: int
    module: str | None


def lr_zero(groups: list[ZeroLr], scheduler: str | None) -> Diagnosis:
    lines = [f"param group {g.group} ({g.tensors} tensor(s)" + (f" of '{g.module}'" if g.module else "")
             + f") has trained with lr = 0 for {g.steps} steps, since step {g.since} (it was {fmt(g.before)} "
             "before): its updates are zero and its weights no longer move" for g in groups]
    lines.append(f"the LR scheduler that sets it: {scheduler}" if scheduler else
                 "no LR scheduler is attached to the guard; something in the training code set the learning rate")
    modules = {g.module for g in groups}
    return Diagnosis(cause="update_underflow", phase="optimizer", module=modules.pop() if len(modules) == 1 else None,
                     confidence=0.9, evidence=lines,
                     fixes=fixes_for("update_underflow", "lr_zero", scheduler=scheduler or "the code that sets lr",
                                     since=min(g.since for g in groups)))


def no_gradient(module: str, params: list[str], first_step: int, step: int) -> Diagnosis:
    shown = ", ".join(f"`{p}`" for p in params[:4]) + (f" and {len(params) - 4} more" if len(params) > 4 else "")
    place = f"module '{module}'" if module else "the root module"
    evidence = [
        f"{shown} of {place} require grad and are held by the optimizer, but got no gradient at step {first_step} "
        f"nor at step {step}, while {place} ran in forward with gradients enabled at step {step}",
        "their output is cut off from the loss (a `.detach()`, `torch.no_grad()` or `.data`), so they never train",
    ]
    return Diagnosis(cause="update_underflow", phase="backward", module=module, confidence=0.9, evidence=evidence,
                     fixes=fixes_for("update_underflow", "no_grad", module=f"'{module}'" if module else "the model"))


@dataclass(frozen=True)
class MisuseFacts:
    """One misuse, with its numbers read (host floats)."""

    call: str
    scale: float
    norm: float | None
    max_norm: float | None
    clip_value: float | None


def misuse(facts: MisuseFacts) -> Diagnosis:
    scale = facts.scale
    call = facts.call
    before = f"after `scaler.scale(loss).backward()` and before `scaler.unscale_(optimizer)`, while the gradients " \
             f"were still multiplied by the loss scale {fmt(scale)}"
    if facts.clip_value is not None:
        evidence = [f"`clip_grad_value_(clip_value={fmt(facts.clip_value)})` ran {before}",
                    f"after `scaler.step` unscales them, gradient elements are capped at ±{fmt(facts.clip_value / scale)} "
                    f"instead of ±{fmt(facts.clip_value)}: {fmt(scale)}x too tight"]
    else:
        evidence = [f"`{call}` measured the gradients {before}: it returned {fmt(facts.norm)}, "
                    f"{fmt(scale)} times the true norm {fmt(_true(facts.norm, scale))}"]
        evidence.append(_clip_effect(facts) if facts.max_norm is not None else
                        "any threshold compared with that norm, and any value logged from it, is off by the same factor")
    return Diagnosis(cause="scaled_gradient_misuse", phase="optimizer", confidence=0.95, evidence=evidence,
                     fixes=fixes_for("scaled_gradient_misuse", call=call.rstrip("_") + "_(...)" if call.endswith("_")
                                     else f"{call}(...)", scale=scale))


def _true(norm: float | None, scale: float) -> float:
    return norm / scale if norm is not None and scale > 0 else math.nan


def _clip_effect(facts: MisuseFacts) -> str:
    assert facts.max_norm is not None
    norm, scale, limit = facts.norm, facts.scale, facts.max_norm
    true = _true(norm, scale)
    if norm is None or not math.isfinite(norm) or norm <= limit:
        return (f"clipping at max_norm={fmt(limit)} acts on the true norm as if max_norm were {fmt(limit / scale)}: "
                "every step whose true norm exceeds that is shrunk")
    applied = limit / scale
    intended = min(true, limit)
    return (f"so it clipped them to norm {fmt(limit)} in scaled units, {fmt(applied)} once unscaled, where the true "
            f"norm called for {fmt(intended)}: this update is {fmt(intended / applied)}x smaller than intended")


__all__ = ["GroupSample", "MisuseFacts", "ZeroLr", "dtype_name", "half_ulp", "lr_zero", "misuse", "no_gradient",
           "underflow"]
