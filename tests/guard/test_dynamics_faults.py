"""The fault-dynamics suite (issue 12, items 1-5): each run must end finite with the right first event."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nanguard
from nanguard.config import GuardConfig
from nanguard.step.detector import RunningStats
from tests.conftest import read_events
from tests.guard.helpers import batches, make_mlp


def _regression(n: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=gen)
    return x, x @ torch.randn(8, 1, generator=gen) + 0.1 * torch.randn(n, 1, generator=gen)


def _guard(model: nn.Module, opt: torch.optim.Optimizer, tmp_path, **kw) -> nanguard.Guard:
    return nanguard.Guard(model, opt, out_dir=tmp_path, console=False, report=False, **kw)


def test_explosion_from_step_zero_is_caught_in_the_first_steps(tmp_path):
    """Item 1: a learning rate far too high from the first step used to warm the statistics up on the explosion."""
    torch.manual_seed(0)
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=10.0)
    guard = _guard(model, opt, tmp_path)
    with pytest.raises(nanguard.TrainingAborted):
        for x, y in batches(60):
            loss = F.cross_entropy(model(x), y) * 100
            opt.zero_grad()
            loss.backward()
            opt.step()
    guard.close()
    events = read_events(tmp_path)
    assert events and events[0]["step"] <= 10
    assert events[0]["trigger"] in ("loss_spike", "grad_spike")


def test_early_rule_ignores_losses_that_start_non_positive():
    stats = RunningStats(alpha=0.97, warmup=25, clip_z=2.5, early_min=3, early_ratio=10.0)
    for value in (-1.0, 0.5, 0.4):
        stats.update(value)
    assert stats.spike_limit(6.0, 2.0) == math.inf
    positive = RunningStats(alpha=0.97, warmup=25, clip_z=2.5, early_min=3, early_ratio=10.0)
    for value in (2.0, 2.5, 1.5):
        positive.update(value)
    assert positive.spike_limit(6.0, 2.0) == 25.0
    assert positive.is_spike(26.0, 6.0, 2.0) and not positive.is_spike(24.0, 6.0, 2.0)


def test_adaptive_clip_is_off_by_default_and_on_in_the_clip_preset():
    assert not GuardConfig.preset("safe").spikes.adaptive_clip
    assert GuardConfig.preset("clip").spikes.adaptive_clip
