"""The fault-dynamics suite (issue 12, items 1-5): each run must end finite with the right first event."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nanguard
from nanguard.actions.divergence import DivergenceWatch
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
    assert events[0]["diagnosis"]["cause"] in ("divergence", "gradient_explosion")
    assert "diverging from its start" in events[0]["diagnosis"]["evidence"][0]


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


def test_a_level_shift_is_not_accepted_on_a_loss_already_climbing(tmp_path):
    """WLM GRU at AdamW lr 20: the loss climbed 25 -> 249 through accepted steps, then three frozen-weight spikes
    sat on one level and were taken for a new normal. A climbing run is not a level shift."""
    def change(step, y):
        return y * (1.0 + 0.05 * max(0, step - 80)) * (10.0 if step >= 120 else 1.0)
    try:
        _switch(tmp_path, change, steps=140)
    except nanguard.TrainingAborted:  # a run that keeps exploding may end in an abort; never in an acceptance
        pass
    assert "level_shift" not in [e["diagnosis"]["cause"] for e in read_events(tmp_path)]


def test_adaptive_clip_is_off_by_default_and_on_in_the_clip_preset():
    assert not GuardConfig.preset("safe").spikes.adaptive_clip
    assert GuardConfig.preset("clip").spikes.adaptive_clip


def _fit(tmp_path, lr_at, steps: int, *, guarded: bool = True, **kw) -> tuple[nn.Module, list[float], object]:
    """SGD on a small regression; ``lr_at(step)`` multiplies the schedule's LR (a unit bug in a LambdaLR)."""
    torch.manual_seed(0)
    x, y = _regression()
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    guard = _guard(model, opt, tmp_path, scheduler=sched, **kw) if guarded else None
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (32,), generator=gen)
        loss = F.mse_loss(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        final = float(F.mse_loss(model(x), y))
    if guard is not None:
        guard.close()
    return model, [final], guard


def test_a_schedule_kept_high_is_pinned_and_the_run_finishes(tmp_path):
    """Item 2: LR x1000 from step 25 on used to end in five back-offs, five rollbacks and an abort."""
    _, (final,), guard = _fit(tmp_path, lambda s: 1000.0 if s >= 25 else 1.0, 120)
    _, (clean,), _ = _fit(tmp_path / "clean", lambda s: 1.0, 120, guarded=False)
    events = read_events(tmp_path)
    assert [(e["trigger"], e["action"], e["diagnosis"]["cause"]) for e in events] == \
        [("loss_spike", "rollback", "learning_rate_spike")]
    assert events[0]["step"] == 26 and events[0]["details"]["rolled_back_to_step"] <= 25
    assert guard.lr.pinned == pytest.approx(0.05)
    assert math.isfinite(final) and final <= 1.05 * clean + 0.01


def test_the_pin_is_released_when_the_schedule_comes_back(tmp_path):
    _, (final,), guard = _fit(tmp_path, lambda s: 1000.0 if 25 <= s < 60 else 1.0, 120)
    events = read_events(tmp_path)
    assert [e["diagnosis"]["cause"] for e in events] == ["learning_rate_spike"]
    assert guard.lr.pinned is None and guard.lr.applied[-1][1] == pytest.approx(0.05)
    assert math.isfinite(final)


def test_rollback_never_returns_to_the_snapshot_taken_after_the_bad_update(tmp_path):
    """Item 3: LR x5000 at step 150 only; the snapshot taken after step 150 holds the damage."""
    _, (final,), guard = _fit(tmp_path, lambda s: 5000.0 if s == 150 else 1.0, 200, snapshot_every=50)
    _, (clean,), _ = _fit(tmp_path / "clean", lambda s: 1.0, 150, guarded=False)  # 50 steps were rolled back
    events = read_events(tmp_path)
    assert events[0]["step"] == 151 and events[0]["action"] == "rollback"
    assert events[0]["details"]["rolled_back_to_step"] <= 150
    assert all(s.step <= 150 or s.step > 152 for s in guard.rollback.ring)
    assert math.isfinite(final) and final <= 1.05 * clean + 0.01


def _switch(tmp_path, change, steps: int = 300, *, guarded: bool = True) -> float:
    """Adam on a small regression whose batches go through ``change(step, y)``; returns the last 20 steps' mean loss."""
    torch.manual_seed(0)
    x, y = _regression()
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    guard = _guard(model, opt, tmp_path) if guarded else None
    gen = torch.Generator().manual_seed(1)
    losses = []
    for step in range(steps):
        idx = torch.randint(0, x.shape[0], (32,), generator=gen)
        loss = F.mse_loss(model(x[idx]), change(step, y[idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    if guard is not None:
        guard.close()
    return sum(losses[-20:]) / 20


def test_a_task_switch_is_one_level_shift_and_the_run_trains_on(tmp_path):
    """Item 4: targets x10 from step 100 on used to go skip -> rollback -> LR back-off -> abort."""
    final = _switch(tmp_path, lambda step, y: y * 10 if step >= 100 else y)
    events = read_events(tmp_path)
    assert [(e["step"], e["diagnosis"]["cause"], e["action"]) for e in events] == [(100, "level_shift", "none")]
    assert events[0]["details"]["held_steps"] == [100, 101, 102]
    plain = _switch(tmp_path, lambda step, y: y * 10 if step >= 100 else y, guarded=False)
    assert final <= 1.05 * plain  # trained on the new level as plain PyTorch does (3 updates fewer), not aborted


def test_a_one_off_label_outlier_is_skipped_not_taken_for_a_level_shift(tmp_path):
    _switch(tmp_path, lambda step, y: y * 30 if step == 100 else y)
    events = read_events(tmp_path)
    assert [(e["step"], e["action"]) for e in events] == [(100, "skip")]
    assert events[0]["diagnosis"]["cause"] != "level_shift"


def _watch(window: int = 200) -> DivergenceWatch:
    return DivergenceWatch(GuardConfig(divergence_window=window))


def test_a_slow_divergence_is_flagged_by_the_time_the_smoothed_loss_doubles():
    """Item 5: SGD with momentum 0.9, loss 1.5 -> 6 over 300 steps, used to be flagged only at step 299."""
    gen = torch.Generator().manual_seed(0)
    noise = 1.0 + 0.1 * torch.randn(300, generator=gen)
    watch = _watch()
    fired = [t for t in range(300) if watch.observe(1.5 * 4 ** (t / 300) * float(noise[t])) is not None]
    # The 20-step mean reaches twice its best (about 1.57) near step 170.
    assert fired and 120 <= fired[0] <= 185


def test_a_loss_heading_to_zero_is_not_divergence():
    """Item 5: Adam overfitting got 17 divergence -> lr_backoff events at losses between 1e-8 and 6e-6."""
    gen = torch.Generator().manual_seed(0)
    watch = _watch()
    losses = [math.exp(-t / 11) for t in range(200)]  # 1 -> 1e-8
    level = 1e-8
    for _ in range(800):  # then wanders up and down three orders of magnitude near zero
        level = min(6e-6, max(1e-9, level * math.exp(0.3 * float(torch.randn((), generator=gen)) + 0.01)))
        losses.append(level)
    assert [loss for loss in losses if watch.observe(loss) is not None] == []


def test_a_negative_loss_is_never_called_diverging():
    watch = _watch(40)
    assert all(watch.observe(-5.0 + 0.01 * t) is None for t in range(400))
