"""What the guard hands to forensics when a step went wrong.

The guard owns the training state and knows how to re-run the bad step; forensics owns the
instruments and the rules. This module is the whole contract between the two.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from nanguard.state import RngState


@dataclass(kw_only=True)
class StepCapture:
    """Everything needed to re-run one training step exactly.

    ``rerun`` re-executes forward, loss and backward of the bad step from the model's *current* state
    (gradients accumulate into ``.grad`` as in training) and returns the unscaled loss tensor. The guard
    builds it from the user's closure, or in zero-code mode from the recorded root-module calls and
    loss operations. It does not restore RNG state and does not touch the optimizer: the caller does.
    """

    rerun: Callable[[], torch.Tensor | None] | None
    batch: dict[str, Any] = field(default_factory=dict)
    rng_state: RngState | None = None
    autocast_dtype: torch.dtype | None = None
    device_type: str = "cpu"
    eager: bool = False  # the step ran a ``torch.compile``d module; the replay runs its ``_orig_mod`` eagerly
    # The recorded calls' replay, kept beside a closure's: a closure that re-runs nothing (Lightning's manual
    # optimization passes a do-nothing closure to ``optimizer.step``) is no replay of the step, they may be.
    recorded: StepCapture | None = None


@dataclass(kw_only=True)
class InvestigationRequest:
    """One bad step, as the guard saw it, plus the means to look closer."""

    step: int
    trigger: str
    models: Sequence[torch.nn.Module]
    optimizer: torch.optim.Optimizer | None
    capture: StepCapture | None = None
    loss: float | None = None
    grad_norm: float | None = None
    lr: float | None = None
    # True when model and optimizer hold the state from just before the bad step (its update was skipped).
    state_is_pre_step: bool = True
    # Weights were finite before the update and non-finite after it, with finite gradients.
    update_made_weights_nonfinite: bool = False
    scaler: Any | None = None
    # Recent accepted steps, oldest first; used for spike, divergence and data-scale evidence.
    loss_history: list[float] = field(default_factory=list)
    grad_norm_history: list[float] = field(default_factory=list)
    # Per batch field: absolute maxima of recent accepted batches (for input_extreme_scale).
    batch_scale_history: dict[str, list[float]] = field(default_factory=dict)
    # Running statistics of the spike detector at the time of the event: mean, std for loss and grad norm.
    spike_stats: dict[str, float] = field(default_factory=dict)
    # An exception raised by the step itself (e.g. "Target 101 is out of bounds"), if that is the event.
    exception: BaseException | None = None


__all__ = ["InvestigationRequest", "RngState", "StepCapture"]
