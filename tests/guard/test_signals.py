"""Detection: spikes and divergence fire when they should, and a healthy run produces no event at all."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nanguard
from tests.conftest import read_events
from tests.guard.helpers import batches, make_mlp


def _run(tmp_path, model, opt, steps, *, batch=32, scheduler=None, loss_fn=None, **guard_kwargs):
    guard = nanguard.Guard(model, opt, out_dir=tmp_path, console=False, report=False, scheduler=scheduler, **guard_kwargs)
    for x, y in batches(steps, batch=batch):
        loss = (loss_fn or (lambda x, y: F.cross_entropy(model(x), y)))(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
    guard.close()
    return guard, read_events(tmp_path)


def test_noisy_small_batch_sgd_raises_no_event(tmp_path):
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard, events = _run(tmp_path, model, opt, 400, batch=2)
    assert events == []
    assert guard.summary()["skipped"] == 0


def test_warmup_schedule_with_fast_early_loss_drop_raises_no_event(tmp_path):
    model = make_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * (0.5 ** (s / 200)))
    _, events = _run(tmp_path, model, opt, 300, scheduler=sched)
    assert events == []


class _CausalLM(nn.Module):
    def __init__(self, vocab: int = 16, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        causal = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).triu(1)
        scores = scores.masked_fill(causal, float("-inf"))
        return self.out(torch.softmax(scores, dim=-1) @ v + h)


def test_causal_minus_inf_masks_raise_no_event(tmp_path):
    model = _CausalLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    guard = nanguard.Guard(model, opt, out_dir=tmp_path, console=False, report=False)
    gen = torch.Generator().manual_seed(0)
    for _ in range(150):
        ids = torch.randint(0, 16, (8, 12), generator=gen)
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 16), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    guard.close()
    assert read_events(tmp_path) == []


def test_grad_scaler_early_overflow_skips_raise_no_event(tmp_path):
    model = make_mlp()
    # lr 1e-3 on a loss x100 is SGD at lr 0.1: a healthy run (at lr 0.1 it explodes, and the early-run rule says so).
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=1e37, growth_interval=1000)
    guard = nanguard.Guard(model, opt, scaler=scaler, out_dir=tmp_path, console=False, report=False)
    for x, y in batches(40):
        loss = F.cross_entropy(model(x), y) * 100  # 100 x 1e37 overflows float32 gradients, as fp16 would
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    guard.close()
    assert read_events(tmp_path) == []
    assert guard.step_count == 40
    assert 1 <= guard.summary()["skipped"] <= 10  # the scaler's own skips are counted, not reported
    assert scaler.get_scale() < 1e37
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_loss_spike_after_warmup_is_skipped(tmp_path):
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    def loss_fn(x, y, counter=[0]):  # noqa: B006 - a step counter local to this test
        counter[0] += 1
        loss = F.cross_entropy(model(x), y)
        return loss * 1000 if counter[0] == 80 else loss

    _guard, events = _run(tmp_path, model, opt, 100, loss_fn=loss_fn)
    assert [(e["step"], e["trigger"], e["action"]) for e in events] == [(79, "loss_spike", "skip")]
    assert events[0]["diagnosis"]["cause"] == "loss_spike"


def test_gradient_spike_with_normal_loss_is_a_gradient_explosion(tmp_path):
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = nanguard.Guard(model, opt, out_dir=tmp_path, console=False, report=False)
    for step, (x, y) in enumerate(batches(100)):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        if step == 70:
            for p in model.parameters():
                p.grad.mul_(1e4)
        opt.step()
    guard.close()
    events = read_events(tmp_path)
    assert [(e["step"], e["trigger"], e["action"]) for e in events] == [(70, "grad_spike", "skip")]
    assert events[0]["diagnosis"]["cause"] == "gradient_explosion"


def test_adaptive_clipping_is_opt_in_silent_and_counted(tmp_path):
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = nanguard.Guard(model, opt, config="clip", out_dir=tmp_path, console=False, report=False)
    for step, (x, y) in enumerate(batches(100)):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        if step == 70:
            for p in model.parameters():
                p.grad.mul_(2.5)  # above the clip threshold, below the skip threshold
        opt.step()
    guard.close()
    assert read_events(tmp_path) == []
    assert guard.summary()["clipped"] >= 1


class _GradientAscent(torch.optim.Optimizer):
    """Climbs the loss: a stand-in for a learning rate far too high that diverges slowly."""

    def __init__(self, params, lr):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=group["lr"])


def test_slow_divergence_backs_off_the_learning_rate(tmp_path):
    model = make_mlp()
    opt = _GradientAscent(model.parameters(), lr=0.02)
    guard, events = _run(tmp_path, model, opt, 200, divergence_window=40)
    divergence = [e for e in events if e["trigger"] == "divergence"]
    assert divergence, events
    assert divergence[0]["action"] == "lr_backoff"
    assert divergence[0]["diagnosis"]["cause"] == "divergence"
    assert guard.lr_multiplier < 1.0


@pytest.mark.parametrize("z", [2.5, 6.0])
def test_running_stats_do_not_fire_during_warmup(z):
    from nanguard.step.detector import RunningStats

    stats = RunningStats(alpha=0.97, warmup=25, clip_z=2.5)
    for i in range(24):
        value = 1.0 + 0.01 * i
        assert not stats.is_spike(value * 100, z, 2.0)
        stats.update(value)
    stats.update(1.0)
    assert stats.is_spike(100.0, z, 2.0)
