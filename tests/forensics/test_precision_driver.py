"""fp16 overflow with a float32 counterfactual that is far off too (issue 11, item 9): the driver leads.

A learning rate 100x too high blows up any dtype; fp16 only reaches inf first. When the float32 replay of
the step is itself many times its running level, the fixes must lead with the learning rate, not with
"run it in float32 / use bfloat16"; the overflow stays in ``contributing`` and the place stays the birth's.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from nanguard.forensics import InvestigationRequest, investigate
from tests.forensics.helpers import bad_step, closure_for


def _regression(half: bool) -> tuple[nn.Module, torch.optim.Optimizer, Callable[[], torch.Tensor], dict]:
    torch.manual_seed(0)
    x = torch.randn(64, 16)
    y = x @ torch.randn(16, 4)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    if half:
        model = model.half()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def loss_fn() -> torch.Tensor:
        if half:  # a pure-half model: the MSE is computed in float16 too
            return F.mse_loss(model(x.half()), y.half())
        with torch.autocast("cpu", dtype=torch.float16):
            return F.mse_loss(model(x), y)

    return model, opt, loss_fn, {"x": x, "y": y}


def _run_to_overflow(half: bool, lr: float) -> tuple[InvestigationRequest, list[float]]:
    """12 steps at lr 0.01, then ``lr`` until the fp16 step is non-finite; that step, described as the guard would."""
    model, opt, loss_fn, batch = _regression(half)
    history: list[float] = []
    for step in range(40):
        if step == 12:
            for group in opt.param_groups:
                group["lr"] = lr
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        if not math.isfinite(float(loss.detach())):
            break
        opt.step()
        history.append(float(loss.detach()))
    else:
        raise AssertionError("the run never overflowed float16")
    request = bad_step(model, opt, closure_for(model, opt, loss_fn), batch, loss_history=history, lr=lr)
    return request, history


def test_fp16_at_100x_learning_rate_is_led_by_divergence_not_the_fp16_range():
    request, history = _run_to_overflow(half=True, lr=1.0)
    assert request.trigger == "nonfinite_loss" and history[-1] > 10 * history[0]  # the loss was running away
    d = investigate(request).diagnosis
    assert d.cause == "divergence"
    # The place stays the birth's: the first inf of the fp16 replay.
    assert (d.phase, d.op, d.module) == ("forward", "aten::addmm", "2")
    assert "float32 replay of this step is far off too" in d.evidence[0]
    assert d.fixes[0].startswith("Lower the learning rate") and "now 1" in d.fixes[0]
    assert [c["cause"] for c in d.contributing] == ["forward_overflow"]
    first_fp16_advice = next(i for i, fix in enumerate(d.fixes) if "bfloat16" in fix)
    assert first_fp16_advice >= 2  # the dtype advice follows the driver's


def test_amp_overflow_after_one_huge_update_is_a_gradient_explosion():
    """Autocast fp16, a flat loss history and a gradient-norm history: the fp32 gradients explode."""
    request, history = _run_to_overflow(half=False, lr=1.0)
    request.loss_history = [history[0]] * len(history)  # no trend: not a divergence
    request.grad_norm_history = [1.0] * 12
    d = investigate(request).diagnosis
    assert d.cause == "gradient_explosion"
    assert d.tensor is not None and d.tensor.endswith("weight")
    assert any("x its running level 1" in line for line in d.evidence[:1])
    assert d.fixes[0].startswith("Clip gradients")
    assert [c["cause"] for c in d.contributing] == ["forward_overflow"]


def test_fp16_overflow_with_a_sound_float32_replay_stays_a_forward_overflow():
    """The same fp16 overflow, but the float32 step sits at its running level: precision is the root."""
    torch.manual_seed(0)
    items, labels = torch.randn(16, 6, 8), torch.randint(0, 3, (16,))
    encode, score, out = nn.Linear(8, 16), nn.Linear(16, 1), nn.Linear(16, 3)
    with torch.no_grad():
        score.bias.fill_(12.0)  # exp(12) > 65504: float16 overflows, float32 does not
    model = nn.ModuleDict({"encode": encode, "score": score, "out": out}).half()

    def loss_fn() -> torch.Tensor:
        h = torch.relu(model["encode"](items.half()))
        s = torch.exp(model["score"](h))
        return F.cross_entropy(model["out"](((s / s.sum(1, keepdim=True)) * h).sum(1)).float(), labels)

    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    request = bad_step(model, opt, closure_for(model, opt, loss_fn), {"items": items, "labels": labels},
                       loss_history=[1.1] * 12, grad_norm_history=[0.5] * 12)
    d = investigate(request).diagnosis
    assert (d.cause, d.op) == ("forward_overflow", "aten::exp")
    assert d.contributing == []
    assert "bfloat16" in d.fixes[0]
