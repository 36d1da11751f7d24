"""Is a GradScaler skip an overflow the scaler will outgrow, or a NaN that no loss scale can fix?

``torch.amp.GradScaler`` skips a step whenever the scaled gradients hold an inf or a NaN and halves its
scale, on the assumption that the scale made them overflow. When the gradient is NaN for a reason of its
own (``sqrt`` at 0 in a pairwise distance, a ``where`` whose untaken branch is NaN), every step is skipped
and the scale collapses towards 0 while the weights never move. The test that tells the two apart is a
replay of the step with the loss scale at 1: an overflow comes out finite, a NaN that survives is not an
overflow, and the operator tracer can then name its cause.

:func:`at_unit_scale` is that condition for any replay (forensics replays a GradScaler step with it, so the
trace sees the gradients as they are, not multiplied by 65,536); :func:`unit_scale_replay` is the test.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from nanguard.forensics import replay as replaying
from nanguard.forensics.request import StepCapture
from nanguard.state import SavedState, Subjects

Instruments = Callable[[], contextlib.AbstractContextManager[Any]]


def scale_tensor(scaler: Any) -> torch.Tensor | None:
    """The enabled GradScaler's scale tensor (the one ``scaler.scale`` multiplies by), or None."""
    if scaler is None or not bool(getattr(scaler, "is_enabled", lambda: False)()):
        return None
    scale = getattr(scaler, "_scale", None)
    return scale if isinstance(scale, torch.Tensor) else None


@contextlib.contextmanager
def unit_scale(scaler: Any) -> Iterator[None]:
    """The scaler multiplies losses by 1 inside the block (its scale tensor is filled in place, so a recorded
    ``loss * scale`` and a closure that calls ``scaler.scale`` both see it); the old value comes back after."""
    scale = scale_tensor(scaler)
    if scale is None:
        yield
        return
    saved = scale.detach().clone()
    with torch.no_grad():
        scale.fill_(1.0)
    try:
        yield
    finally:
        with torch.no_grad():
            scale.copy_(saved)


def at_unit_scale(scaler: Any, instruments: Instruments | None) -> Instruments | None:
    """``instruments`` (or nothing) with the loss scale at 1 around them, when an enabled scaler exists."""
    if scale_tensor(scaler) is None:
        return instruments

    @contextlib.contextmanager
    def both() -> Iterator[None]:
        with unit_scale(scaler), (instruments() if instruments is not None else contextlib.nullcontext()):
            yield

    return both


@dataclass
class ScaleTest:
    """What the replay at loss scale 1 showed. ``survives``: the gradients were still non-finite (None: the
    replay could not run, so nothing is known)."""

    survives: bool | None
    scale: float
    evidence: list[str] = field(default_factory=list)


def unit_scale_replay(subjects: Subjects, capture: StepCapture | None,
                      scope: contextlib.AbstractContextManager[Any]) -> ScaleTest:
    """Replay the step with the loss scale at 1 inside ``scope`` (isolated from training's records) and leave
    every piece of state as it was. Costs one forward and backward; runs only on a GradScaler skip."""
    scale = scale_tensor(subjects.scaler)
    scale_value = float(scale) if scale is not None else math.nan
    if capture is None or capture.rerun is None:
        return ScaleTest(None, scale_value, ["the step could not be replayed (no closure and no recorded call)"])
    names = {id(p): name for name, p in subjects.named_parameters()}
    state = SavedState.capture(subjects, scoped=True, tensors=capture.batch.values())
    try:
        with scope:
            outcome = replaying.replay(capture, state, names, label="loss scale 1",
                                       instruments=lambda: unit_scale(subjects.scaler))
    finally:
        state.restore()
    if outcome.error is not None:
        return ScaleTest(None, scale_value, [f"the replay at loss scale 1 failed: {outcome.error}"])
    if not outcome.loss_finite and outcome.loss is not None:
        return ScaleTest(None, scale_value, ["the replay at loss scale 1 gave a non-finite loss: not this step"])
    return ScaleTest(not outcome.grads_finite, scale_value, _evidence(outcome, scale_value))


def _evidence(outcome: replaying.ReplayOutcome, scale: float) -> list[str]:
    if outcome.grads_finite:
        return [f"replayed with the loss scale at 1 instead of {scale:.4g}: the gradients are finite, so this skip is "
                "an fp16 overflow that the GradScaler handles by lowering its scale"]
    bad = outcome.grad_nonfinite
    name, counts = next(iter(bad.items()))
    return [f"GradScaler skipped this step (scale {scale:.4g}); replayed with the loss scale at 1, the gradients are "
            f"still non-finite ({len(bad)} tensor(s), e.g. `{name}`: {counts['nan']} NaN, {counts['inf']} inf of "
            f"{counts['numel']}): the loss scale is not what makes them non-finite, so lowering it cannot help and the "
            "scaler would skip every step like this one while the weights never move"]


__all__ = ["ScaleTest", "at_unit_scale", "scale_tensor", "unit_scale", "unit_scale_replay"]
