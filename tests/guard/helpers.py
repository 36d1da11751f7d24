"""A tiny classification task and loop used by the guard tests."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def make_task(n: int = 512, dim: int = 8, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, dim, generator=gen)
    y = x[:, :classes].argmax(1)
    return x, y


def make_mlp(dim: int = 8, classes: int = 4) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, 32), nn.ReLU(), nn.Linear(32, classes))


def batches(steps: int, batch: int = 32, seed: int = 2):
    x, y = make_task()
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=gen)
        yield x[idx].clone(), y[idx].clone()


def train(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    steps: int,
    *,
    corrupt: Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
    after_step: Callable[[int], None] | None = None,
    scheduler=None,
) -> list[float]:
    losses = []
    for step, (x, y) in enumerate(batches(steps)):
        if corrupt is not None:
            x, y = corrupt(step, x, y)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
        if after_step is not None:
            after_step(step)
    return losses


def state_copy(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt_state = {
        i: {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in s.items()}
        for i, s in enumerate(opt.state.values())
    }
    return params, opt_state


def assert_same_state(a: tuple[dict, dict], b: tuple[dict, dict]) -> None:
    for key in a[0]:
        assert torch.equal(a[0][key], b[0][key]), key
    assert a[1].keys() == b[1].keys()
    for i in a[1]:
        for key, value in a[1][i].items():
            other = b[1][i][key]
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, other), (i, key)
            else:
                assert value == other, (i, key)
