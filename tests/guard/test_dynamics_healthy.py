"""The healthy-dynamics suite (issue 12): realistic small runs whose dynamics look alarming to a naive guard.

Under the default preset each must give no event and end bit for bit where the unguarded run ends
(principle 6 of the design); the task switch gives its one ``level_shift`` (action ``none``) and nothing else.
Every run is tiny (a few hundred steps of a small MLP) so the suite stays fast.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nanguard
from tests.conftest import read_events

Guards = Callable[..., Any]  # (model, optimizer, **guard kwargs) -> a Guard, or None for the plain run


def _data(n: int = 256, dim: int = 8, classes: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=gen)
    return x, x[:, :classes].argmax(1)


def _mlp(dim: int = 8, out: int = 4, hidden: int = 32) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, out))


def _classify(guards: Guards, opt_of, steps: int, *, batch: int = 32, sched_of=None, data_n: int = 256,
              accumulate: int = 1) -> list[nn.Module]:
    model = _mlp()
    opt = opt_of(model.parameters())
    sched = sched_of(opt) if sched_of is not None else None
    guard = guards(model, opt, scheduler=sched)
    x, y = _data(data_n)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for _ in range(accumulate):
            idx = torch.randint(0, x.shape[0], (batch,), generator=gen)
            (F.cross_entropy(model(x[idx]), y[idx]) / accumulate).backward()
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()
    if guard is not None:
        guard.close()
    return [model]


def warmup_cosine(guards: Guards) -> list[nn.Module]:
    def sched(opt):
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: (s + 1) / 20 if s < 20 else 0.5 * (1 + math.cos(math.pi * (s - 20) / 180)))
    return _classify(guards, lambda p: torch.optim.AdamW(p, lr=3e-3), 200, sched_of=sched)


def overfit_to_zero(guards: Guards) -> list[nn.Module]:
    return _classify(guards, lambda p: torch.optim.Adam(p, lr=1e-2), 400, batch=8, data_n=8)


def noisy_small_batch_sgd(guards: Guards) -> list[nn.Module]:
    return _classify(guards, lambda p: torch.optim.SGD(p, lr=0.1), 400, batch=2)


def sgdr_restarts(guards: Guards) -> list[nn.Module]:
    return _classify(guards, lambda p: torch.optim.SGD(p, lr=0.3, momentum=0.9), 300,
                     sched_of=lambda opt: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=60))


def one_cycle(guards: Guards) -> list[nn.Module]:
    return _classify(guards, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), 300,
                     sched_of=lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.2, total_steps=300))


def gradient_accumulation(guards: Guards) -> list[nn.Module]:
    return _classify(guards, lambda p: torch.optim.AdamW(p, lr=3e-3), 150, batch=8, accumulate=4)


def unfreeze_fine_tune(guards: Guards) -> list[nn.Module]:
    """A head trained on a frozen backbone, then everything at a lower LR (a second param group)."""
    torch.manual_seed(0)
    backbone, head = nn.Sequential(nn.Linear(8, 32), nn.ReLU()), nn.Linear(32, 4)
    for p in backbone.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW([{"params": head.parameters()}, {"params": backbone.parameters(), "lr": 3e-4}], lr=3e-3)
    model = nn.Sequential(backbone, head)
    guard = guards(model, opt)
    x, y = _data()
    gen = torch.Generator().manual_seed(1)
    for step in range(300):
        if step == 120:
            for p in backbone.parameters():
                p.requires_grad_(True)
        idx = torch.randint(0, x.shape[0], (32,), generator=gen)
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        opt.zero_grad()
    if guard is not None:
        guard.close()
    return [model]


def gan_oscillation(guards: Guards) -> list[nn.Module]:
    """A 1-D GAN: generator and discriminator losses trade places, one guard per optimizer."""
    torch.manual_seed(0)
    gen_net, disc = _mlp(2, 1, 16), nn.Sequential(_mlp(1, 1, 16))
    g_opt, d_opt = torch.optim.Adam(gen_net.parameters(), lr=2e-3), torch.optim.Adam(disc.parameters(), lr=2e-3)
    g_guard, d_guard = guards(gen_net, g_opt), guards(disc, d_opt)
    rng = torch.Generator().manual_seed(1)
    for _ in range(200):
        real = 2.0 + 0.5 * torch.randn(32, 1, generator=rng)
        fake = gen_net(torch.randn(32, 2, generator=rng))
        d_loss = F.binary_cross_entropy_with_logits(disc(real), torch.ones(32, 1)) + \
            F.binary_cross_entropy_with_logits(disc(fake.detach()), torch.zeros(32, 1))
        d_opt.zero_grad()
        d_loss.backward()
        d_opt.step()
        g_loss = F.binary_cross_entropy_with_logits(disc(fake), torch.ones(32, 1))
        g_opt.zero_grad()
        g_loss.backward()
        g_opt.step()
    for guard in (g_guard, d_guard):
        if guard is not None:
            guard.close()
    return [gen_net, disc]


def policy_gradient(guards: Guards) -> list[nn.Module]:
    """REINFORCE on a contextual bandit: the loss is -log p(a) * advantage, of either sign, its scale set by the returns."""
    torch.manual_seed(0)
    policy = _mlp(4, 3, 16)
    opt = torch.optim.Adam(policy.parameters(), lr=1e-2)
    guard = guards(policy, opt)
    rng = torch.Generator().manual_seed(1)
    for _ in range(200):
        ctx = torch.randn(16, 4, generator=rng)
        dist = torch.distributions.Categorical(logits=policy(ctx))
        action = dist.sample()
        reward = (action == ctx[:, :3].argmax(1)).float() * 10.0 + 0.5 * torch.randn(16, generator=rng)
        loss = -(dist.log_prob(action) * (reward - reward.mean())).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    if guard is not None:
        guard.close()
    return [policy]


def negative_contrastive(guards: Guards) -> list[nn.Module]:
    """A loss that is negative and heads to -1: minus the cosine similarity of two noisy views."""
    torch.manual_seed(0)
    encoder = _mlp(8, 8, 32)
    opt = torch.optim.SGD(encoder.parameters(), lr=0.05, momentum=0.9)
    guard = guards(encoder, opt)
    rng = torch.Generator().manual_seed(1)
    for _ in range(300):
        x = torch.randn(32, 8, generator=rng)
        a, b = x + 0.3 * torch.randn(32, 8, generator=rng), x + 0.3 * torch.randn(32, 8, generator=rng)
        loss = -F.cosine_similarity(encoder(a), encoder(b)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    if guard is not None:
        guard.close()
    return [encoder]


def grad_scaler_early_overflows(guards: Guards) -> list[nn.Module]:
    """A GradScaler starting at a scale that overflows float32 gradients skips its first steps itself."""
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 126, growth_interval=50)
    guard = guards(model, opt, scaler=scaler)
    x, y = _data()
    gen = torch.Generator().manual_seed(1)
    for _ in range(200):
        idx = torch.randint(0, x.shape[0], (32,), generator=gen)
        opt.zero_grad()
        scaler.scale(F.cross_entropy(model(x[idx]), y[idx]) * 4).backward()
        scaler.step(opt)
        scaler.update()
    if guard is not None:
        guard.close()
    return [model]


HEALTHY = [warmup_cosine, overfit_to_zero, noisy_small_batch_sgd, sgdr_restarts, one_cycle, gradient_accumulation,
           unfreeze_fine_tune, gan_oscillation, policy_gradient, negative_contrastive, grad_scaler_early_overflows]


def _run(scenario, out: Any) -> tuple[list[nn.Module], list[Any]]:
    torch.manual_seed(0)
    made: list[nanguard.Guard] = []

    def guards(model, opt, **kw):
        if out is None:
            return None
        kw = {k: v for k, v in kw.items() if v is not None}
        made.append(nanguard.Guard(model, opt, out_dir=out / str(len(made)), console=False, report=False, **kw))
        return made[-1]

    return scenario(guards), made


@pytest.mark.parametrize("scenario", HEALTHY, ids=lambda f: f.__name__)
def test_healthy_run_is_untouched_by_the_default_guard(scenario, tmp_path):
    plain, _ = _run(scenario, None)
    guarded, made = _run(scenario, tmp_path)
    events = [e for i in range(len(made)) for e in read_events(tmp_path / str(i))]
    assert events == []
    assert all(g.summary()["clipped"] == 0 and g.lr.multiplier == 1.0 for g in made)
    for a, b in zip(plain, guarded, strict=True):
        for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.equal(p, q), name


def test_a_curriculum_switch_is_one_level_shift_and_nothing_else(tmp_path):
    """Regression targets x10 from step 150 on (a new task): one level_shift, action none; the run trains on."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=gen)
    y = x @ torch.randn(8, 1, generator=gen)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    guard = nanguard.Guard(model, opt, out_dir=tmp_path, console=False, report=False)
    rng = torch.Generator().manual_seed(1)
    losses = []
    for step in range(400):
        idx = torch.randint(0, 256, (32,), generator=rng)
        loss = F.mse_loss(model(x[idx]), y[idx] * (10.0 if step >= 150 else 1.0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    guard.close()
    events = read_events(tmp_path)
    assert [(e["step"], e["diagnosis"]["cause"], e["action"]) for e in events] == [(150, "level_shift", "none")]
    assert losses[-1] < 0.2 * losses[150]


def _label_switch(out: Any) -> tuple[nn.Module, list[float]]:
    """Classes relabelled (y -> y + 2 mod 4) from step 60 on: the loss jumps from ~0.6 to ~2.5, 4x its recent
    highs but under a spike limit that the warm-up's fast drop inflated."""
    torch.manual_seed(0)
    x, y = _data()
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    guard = nanguard.Guard(model, opt, out_dir=out, console=False, report=False) if out is not None else None
    rng = torch.Generator().manual_seed(1)
    losses = []
    for step in range(100):
        idx = torch.randint(0, x.shape[0], (32,), generator=rng)
        loss = F.cross_entropy(model(x[idx]), (y[idx] + 2) % 4 if step >= 60 else y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    if guard is not None:
        guard.close()
    return model, losses


def test_a_data_switch_under_the_spike_limit_is_one_level_shift_and_nothing_changes(tmp_path):
    """Regression (real-code nanogpt/data_switch_at_60): a jump to a new level that the spike test let through
    was never recorded. Now it is one level_shift at the switch, action none, and the run stays bit-identical."""
    plain, losses = _label_switch(None)
    guarded, _ = _label_switch(tmp_path)
    assert min(losses[60:63]) > 2.0 * max(losses[44:60])
    events = read_events(tmp_path)
    assert [(e["step"], e["diagnosis"]["cause"], e["action"]) for e in events] == [(60, "level_shift", "none")]
    for (name, p), q in zip(plain.state_dict().items(), guarded.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
