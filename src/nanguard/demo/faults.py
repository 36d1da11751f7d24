"""The faults the demo injects, each a small copy of a bug that ends real training runs in NaN.

A :class:`FaultPlan` says at which step each fault strikes; the training loop asks it, step by step,
for the batch to train on, whether to corrupt a weight, and what the (buggy) LR schedule says. The
plan is the same for every run of a demo, so the guarded and the unguarded run meet the same faults.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from nanguard.demo.task import PAD_ID, Batch

ALL_PADDING = "all_padding"
NAN_IN_DATA = "nan_in_data"
LR_SPIKE = "lr_spike"
CORRUPT_WEIGHT = "corrupt_weight"

CORRUPTED_MODULE = "blocks.1.mlp.fc"
LR_SPIKE_FACTOR = 100.0


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int  # the training step it strikes (for the LR spike: the first step of the schedule's bad window)
    description: str
    expected_cause: str  # the cause in nanguard's taxonomy that names this fault


@dataclass(frozen=True)
class FaultPlan:
    all_padding_step: int
    nan_in_data_step: int
    lr_spike_step: int
    lr_spike_steps: int
    corrupt_weight_step: int

    @classmethod
    def spread_over(cls, steps: int) -> FaultPlan:
        """Faults at fixed fractions of the run, late enough that the guard's statistics are warm."""
        return cls(
            all_padding_step=round(0.30 * steps),
            nan_in_data_step=round(0.42 * steps),
            lr_spike_step=round(0.54 * steps),
            lr_spike_steps=1,
            corrupt_weight_step=round(0.74 * steps),
        )

    @classmethod
    def none(cls) -> FaultPlan:
        """No faults at all: the fault-free reference run."""
        return cls(-1, -1, -1, 0, -1)

    def faults(self) -> list[Fault]:
        if self.all_padding_step < 0:
            return []
        spike_end = self.lr_spike_step + self.lr_spike_steps - 1
        window = f"step {self.lr_spike_step}" if self.lr_spike_steps == 1 else f"steps {self.lr_spike_step}-{spike_end}"
        return [
            Fault(ALL_PADDING, self.all_padding_step,
                  "an all-padding row: row 0 of the batch is only padding (attention_mask all 0)",
                  "masked_softmax_all_masked"),
            Fault(NAN_IN_DATA, self.nan_in_data_step, "a NaN in the data: one value of the batch's loss_mask is NaN",
                  "input_nonfinite"),
            Fault(LR_SPIKE, self.lr_spike_step,
                  f"a learning-rate spike: a scheduler bug multiplies the LR by {LR_SPIKE_FACTOR:g} at schedule {window}",
                  "learning_rate_spike"),
            Fault(CORRUPT_WEIGHT, self.corrupt_weight_step,
                  f"a corrupted weight: an inf is written into {CORRUPTED_MODULE}.weight between two steps",
                  "weights_nonfinite"),
        ]

    # ------------------------------------------------------------------ what the training loop asks
    def batch_for(self, step: int, batch: Batch) -> tuple[Batch, str | None]:
        """The batch to train on at ``step`` (the clean one unless a data fault strikes) and that fault's kind."""
        if step == self.all_padding_step:
            bad = batch.clone()
            bad.input_ids[0] = PAD_ID
            bad.attention_mask[0] = 0
            bad.labels[0] = PAD_ID
            bad.loss_mask[0] = 0.0
            return bad, ALL_PADDING
        if step == self.nan_in_data_step:
            bad = batch.clone()
            bad.loss_mask[1, 3] = math.nan
            return bad, NAN_IN_DATA
        return batch, None

    def corrupt_weights(self, step: int, model: torch.nn.Module) -> str | None:
        """Before the forward of ``corrupt_weight_step``: write an inf into one weight, as a bad in-place update would."""
        if step != self.corrupt_weight_step:
            return None
        weight = model.get_parameter(f"{CORRUPTED_MODULE}.weight")
        with torch.no_grad():
            weight[0, 0] = math.inf
        return CORRUPT_WEIGHT

    def lr_is_spiked(self, schedule_step: int) -> bool:
        return 0 <= self.lr_spike_step <= schedule_step < self.lr_spike_step + self.lr_spike_steps

    def buggy(self, schedule: Callable[[int], float]) -> Callable[[int], float]:
        """``schedule`` with the LR-spike bug: for a few steps the factor comes out 100x too large."""

        def factor(schedule_step: int) -> float:
            value = schedule(schedule_step)
            return value * LR_SPIKE_FACTOR if self.lr_is_spiked(schedule_step) else value

        return factor
