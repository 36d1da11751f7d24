"""Training that silently stops (issue 15): the stall watch's findings, and the healthy runs it leaves alone.

Each case runs a tiny model for as many steps as the finding needs; every event is checked for its step,
trigger, cause and the words of its fix, and the healthy runs for no event at all.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import nanguard
from nanguard.forensics.rules.stall import half_ulp
from nanguard.step.stall import LR_ZERO_STEPS
from tests.conftest import read_events
from tests.guard.helpers import batches, make_mlp


def _guard(model: nn.Module, opt: torch.optim.Optimizer, tmp_path, **kwargs) -> nanguard.Guard:
    return nanguard.Guard(model, opt, out_dir=tmp_path, console=False, report=False, **kwargs)


def _regression(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(128, 8, generator=gen)
    return x, x @ torch.randn(8, 1, generator=gen)


# ---------------------------------------------------------------------------------- case 2: clip before unscale
def _scaled_run(tmp_path, misuse: str | None, steps: int = 6) -> list[dict]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=65536.0)
    guard = _guard(model, opt, tmp_path, scaler=scaler)
    x, y = _regression()
    for _ in range(steps):
        loss = ((model(x) - y) ** 2).mean()
        scaler.scale(loss).backward()
        if misuse == "clip":
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        elif misuse == "norm":
            if torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]) > 1e3:
                pass  # a threshold compared with a scaled norm
        elif misuse == "value":
            torch.nn.utils.clip_grad_value_(model.parameters(), 0.5)
        else:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    guard.close()
    return read_events(tmp_path)


def test_clip_grad_norm_before_unscale_is_reported_at_the_first_step(tmp_path):
    (event,) = _scaled_run(tmp_path, "clip")
    d = event["diagnosis"]
    assert (event["step"], event["trigger"], event["action"], d["cause"]) == (0, "stalled", "none",
                                                                               "scaled_gradient_misuse")
    assert "65536" in d["evidence"][0].replace("6.554e+04", "65536")
    assert "smaller than intended" in d["evidence"][1]
    assert "scaler.unscale_(optimizer)" in d["fixes"][0] and "clip_grad_norm_" in d["fixes"][0]


def test_grad_norm_compared_before_unscale_is_reported(tmp_path):
    (event,) = _scaled_run(tmp_path, "norm")
    assert (event["step"], event["diagnosis"]["cause"]) == (0, "scaled_gradient_misuse")
    assert "get_total_norm" in event["diagnosis"]["evidence"][0]
    assert "threshold" in event["diagnosis"]["evidence"][1]


def test_clip_grad_value_before_unscale_is_reported(tmp_path):
    (event,) = _scaled_run(tmp_path, "value")
    assert event["diagnosis"]["cause"] == "scaled_gradient_misuse"
    assert "clip_grad_value_" in event["diagnosis"]["evidence"][0]


def test_unscale_before_clip_stays_silent(tmp_path):
    assert _scaled_run(tmp_path, None) == []


# ---------------------------------------------------------------------------------- case 3: updates round away
def _low_precision_run(tmp_path, dtype: torch.dtype, steps: int, *, lr: float = 2e-4) -> tuple[list[dict], float]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8)  # weights of order 1: half a bf16 ULP (~0.002) is far above an Adam step of lr
    model.to(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    guard = _guard(model, opt, tmp_path)
    x, y = _regression()
    for _ in range(steps):
        loss = ((model(x.to(dtype)).float() - y) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    guard.close()
    return read_events(tmp_path), loss.item()


def test_bf16_weights_without_masters_stall_within_150_steps(tmp_path):
    events, _ = _low_precision_run(tmp_path, torch.bfloat16, 150)
    (event,) = events
    d = event["diagnosis"]
    assert event["step"] < 150 and (event["trigger"], event["action"], d["cause"]) == ("stalled", "none",
                                                                                        "update_underflow")
    assert "bit-identical" in d["evidence"][0] and "bfloat16" in d["evidence"][1]
    assert "fp32 master weights" in d["fixes"][0] and "autocast" in d["fixes"][0]
    assert "Kahan" in d["fixes"][1] and "last resort" in d["fixes"][2]


def test_the_same_run_in_fp32_stays_silent(tmp_path):
    events, _ = _low_precision_run(tmp_path, torch.float32, 150)
    assert events == []


@settings(max_examples=200, deadline=None)
@given(st.floats(min_value=1e-4, max_value=6e4, allow_nan=False), st.sampled_from([torch.bfloat16, torch.float16]))
def test_half_ulp_is_half_the_spacing_above_a_representable_weight(value, dtype):
    t = torch.tensor(value, dtype=dtype)
    if float(t) == 0 or not math.isfinite(float(t)) or float(t) < torch.finfo(dtype).tiny:
        return
    spacing = float(torch.nextafter(t, torch.tensor(math.inf, dtype=dtype)).double() - t.double())
    assert half_ulp(float(t), dtype) == spacing / 2
    assert float((t.double() + 0.99 * spacing / 2).to(dtype)) == float(t)  # below half a ULP: rounds away


# ---------------------------------------------------------------------------------- learning rate of 0, no grads
def _classify(tmp_path, model: nn.Module, steps: int, *, params=None, scheduler=None, lr: float = 0.1,
              **guard_kwargs) -> list[dict]:
    opt = torch.optim.SGD(params if params is not None else model.parameters(), lr=lr)
    sched = scheduler(opt) if scheduler is not None else None
    guard = _guard(model, opt, tmp_path, scheduler=sched, **guard_kwargs)
    for x, y in batches(steps):
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()
    guard.close()
    return read_events(tmp_path)


def test_lambda_lr_that_returns_zero_is_reported(tmp_path):
    torch.manual_seed(0)
    events = _classify(tmp_path, make_mlp(), 40,
                       scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 if s < 10 else 0.0))
    (event,) = events
    d = event["diagnosis"]
    assert (event["trigger"], d["cause"]) == ("stalled", "update_underflow")
    assert event["step"] == 10 + LR_ZERO_STEPS - 1
    assert "lr = 0" in d["evidence"][0] and "since step 10" in d["evidence"][0]
    assert "LambdaLR" in d["fixes"][0]


def test_cosine_schedule_that_ends_at_zero_stays_silent(tmp_path):
    torch.manual_seed(0)
    events = _classify(tmp_path, make_mlp(), 40,
                       scheduler=lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=39))
    assert events == []


class _Detached(nn.Module):
    """A two-branch model whose second branch's output is detached: its parameters never train."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(8, 4)
        self.side = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x) + self.side(x).detach()


def test_parameters_cut_off_by_detach_are_named(tmp_path):
    torch.manual_seed(0)
    events = _classify(tmp_path, _Detached(), 12, stall_every=5)
    (event,) = events
    d = event["diagnosis"]
    assert (event["trigger"], d["cause"], d["module"]) == ("stalled", "update_underflow", "side")
    assert event["step"] <= 10
    assert "`side.weight`" in d["evidence"][0] and ".detach()" in d["fixes"][0]


class _Frozen(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Linear(8, 32)
        self.backbone.requires_grad_(False)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.backbone(x)))


def test_frozen_backbone_stays_silent(tmp_path):
    torch.manual_seed(0)
    assert _classify(tmp_path, _Frozen(), 12, stall_every=5) == []


def test_model_converged_to_its_floor_stays_silent(tmp_path):
    """A noiseless linear task that SGD solves to fp32's floor: its updates round away too, but with the
    gradients, which have collapsed; that is a finished run, not a stalled one."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=gen)
    y = x @ torch.randn(64, 4, generator=gen)
    model = nn.Linear(64, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    guard = _guard(model, opt, tmp_path, stall_every=25)
    for _ in range(600):
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    guard.close()
    assert loss.item() < 1e-10
    assert read_events(tmp_path) == []


def test_bf16_autocast_with_fp32_weights_stays_silent(tmp_path):
    torch.manual_seed(0)
    model = make_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4)
    guard = _guard(model, opt, tmp_path, stall_every=10)
    for x, y in batches(60):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    guard.close()
    assert read_events(tmp_path) == []


def test_stall_every_zero_turns_the_watch_off(tmp_path):
    """The same stalled bf16 run that the watch reports at its default interval: silent with ``stall_every=0``."""
    torch.manual_seed(0)
    model = nn.Linear(8, 1).to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    guard = _guard(model, opt, tmp_path, stall_every=0)
    x, y = _regression()
    for _ in range(120):
        ((model(x.bfloat16()).float() - y) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
    guard.close()
    assert read_events(tmp_path) == []


def test_a_resumed_guard_does_not_report_the_same_misuse_again(tmp_path):
    first = _scaled_run(tmp_path / "a", "clip", steps=2)
    assert [e["diagnosis"]["cause"] for e in first] == ["scaled_gradient_misuse"]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu")
    guard = _guard(model, opt, tmp_path / "b", scaler=scaler)
    x, y = _regression()
    for step in range(2):
        scaler.scale(((model(x) - y) ** 2).mean()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        if step == 0:
            path = tmp_path / "guard.pt"
            torch.save(guard.state_dict(), path)
            guard.close()
            guard = _guard(model, opt, tmp_path / "c", scaler=scaler)
            guard.load_state_dict(torch.load(path, weights_only=True))
    guard.close()
    assert len(read_events(tmp_path / "b")) == 1
    assert read_events(tmp_path / "c") == []


def test_the_fused_device_path_reads_its_samples_where_it_reads_verdicts(tmp_path):
    """Fused AdamW with verdicts read late (as on a GPU): the bf16 stall is still found, from the read-back."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8)
    model.to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4, fused=True)
    guard = _guard(model, opt, tmp_path, stall_every=10)
    guard.pipeline.defer_host_verdict = True
    x, y = _regression()
    for _ in range(40):
        ((model(x.bfloat16()).float() - y) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
    guard.close()
    (event,) = read_events(tmp_path)
    assert (event["trigger"], event["diagnosis"]["cause"]) == ("stalled", "update_underflow")
    assert event["step"] in (10, 20)
