"""The replay-free triage: what its ``unknown`` says it checked."""

from __future__ import annotations

import torch
from torch import nn

from nanguard.forensics.triage import Signals, quick_diagnosis


def test_unknown_without_a_recorded_batch_does_not_claim_the_batch_was_checked() -> None:
    """Regression: Lightning's ``training_step`` calling ``self.net(x)`` (not ``self(x)``) under DDP/FSDP2 records
    no batch, yet the evidence said "weights, optimizer state and batch are finite"."""
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    no_batch = quick_diagnosis(Signals(trigger="nonfinite_loss", loss=None, grad_norm=None), [model], optimizer)
    assert no_batch.cause == "unknown"
    assert "batch was not checked" in no_batch.evidence[0] and "batch are finite" not in no_batch.evidence[0]
    finite = Signals(trigger="nonfinite_loss", loss=None, grad_norm=None, batch={"x": torch.ones(3, 2)})
    assert "batch are finite" in quick_diagnosis(finite, [model], optimizer).evidence[0]
