"""Leave no trace (DESIGN.md principle 8): whatever a guard patches it undoes on close, nothing of it stays on
the user's objects, and two guards in one process never see each other. Each test is named after the
defect of 0.1 it reproduces."""

from __future__ import annotations

import copy
import gc
import io
import pickle
import weakref

import torch
import torch.nn.functional as F
from torch import nn

import nanguard
from nanguard import patches
from tests.conftest import read_events
from tests.guard.helpers import batches, make_mlp, train

ORIGINAL_BACKWARD = torch.autograd.backward
ORIGINAL_SCALE = torch.amp.GradScaler.scale
ORIGINAL_SCALER_STEP = torch.amp.GradScaler.step
ORIGINAL_SCHEDULER_STEP = torch.optim.lr_scheduler.LRScheduler.step


def _guard(model, opt, tmp_path, **kwargs):
    return nanguard.Guard(model, opt, out_dir=tmp_path, console=False, report=False, **kwargs)


def _hooks(module: nn.Module) -> int:
    return sum(len(getattr(m, name)) for m in module.modules() for name in (
        "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))


def test_close_leaves_every_patched_thing_as_it_was(tmp_path):
    model = make_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5)
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    opt_dict, sched_dict, scaler_dict = dict(vars(opt)), dict(vars(sched)), dict(vars(scaler))
    call_in_class = "__call__" in type(model).__dict__
    guard = _guard(model, opt, tmp_path, scheduler=sched, scaler=scaler)
    assert patches.active()  # something is patched while the guard is open
    for x, y in batches(6):
        loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        sched.step()
    guard.close()
    assert patches.active() == []
    assert torch.autograd.backward is ORIGINAL_BACKWARD
    assert torch.amp.GradScaler.scale is ORIGINAL_SCALE and torch.amp.GradScaler.step is ORIGINAL_SCALER_STEP
    assert torch.optim.lr_scheduler.LRScheduler.step is ORIGINAL_SCHEDULER_STEP
    assert "step" not in type(sched).__dict__
    assert ("__call__" in type(model).__dict__) == call_in_class
    assert vars(opt).get("step") is opt_dict.get("step")  # the LR scheduler's own wrapper, as before the guard
    assert set(vars(opt)) <= set(opt_dict) | {"_opt_called"}
    assert set(vars(sched)) == set(sched_dict)
    assert set(vars(scaler)) <= set(scaler_dict) | {"_scale", "_growth_tracker", "_per_optimizer_states"}
    assert _hooks(model) == 0


def test_closed_guard_no_longer_patches_autograd_backward_or_other_schedulers(tmp_path):
    """0.1: ``torch.autograd.backward`` stayed patched for the whole process after close, and the scheduler hold
    replaced ``type(scheduler).step`` on the class, so every StepLR in the process was affected."""
    model, other = make_mlp(), make_mlp()
    opt, other_opt = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(other.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    other_sched = torch.optim.lr_scheduler.StepLR(other_opt, step_size=1, gamma=0.5)
    guard = _guard(model, opt, tmp_path, scheduler=sched)

    def nan_at_2(step, x, y):
        return (x * float("nan") if step == 2 else x), y

    train(model, opt, 4, corrupt=nan_at_2, scheduler=sched)
    for x, y in batches(4):  # an unguarded loop in the same process, stepping its own StepLR
        F.cross_entropy(other(x), y).backward()
        other_opt.step()
        other_opt.zero_grad()
        other_sched.step()
    assert sched.last_epoch == 3  # one step held back after the skipped step 2
    assert other_sched.last_epoch == 4  # the other scheduler was never held
    guard.close()
    assert torch.autograd.backward is ORIGINAL_BACKWARD
    assert torch.optim.lr_scheduler.LRScheduler.step is ORIGINAL_SCHEDULER_STEP
    assert [e["step"] for e in read_events(tmp_path)] == [2]


def _scaled_steps(model, opt, scaler, steps):
    for x, y in batches(steps):
        loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()


def test_grad_scaler_works_after_close_and_under_a_second_guard(tmp_path):
    """0.1: after close, the same GradScaler (or a second Guard on the same optimizer and scaler, as the HF
    callback's rebind path does) crashed with ``ValueError: I/O operation on closed file``."""
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    first = _guard(model, opt, tmp_path / "first", scaler=scaler)
    _scaled_steps(model, opt, scaler, 3)
    first.close()
    _scaled_steps(model, opt, scaler, 2)  # unguarded now: must just work
    second = _guard(model, opt, tmp_path / "second", scaler=scaler)
    _scaled_steps(model, opt, scaler, 3)
    second.close()
    assert first.step_count == 3 and second.step_count == 3
    assert (tmp_path / "second" / "history.csv").read_text().count("\n") == 4
    pickle.dumps(scaler.state_dict())
    copy.deepcopy(scaler)  # nothing of nanguard left on the scaler


class _Generator(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 6))

    def forward(self, z):
        return self.net(z)


class _Discriminator(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))

    def forward(self, x):
        return self.net(x)


def test_gan_guards_log_their_own_losses_and_skip_only_their_own_bad_step(tmp_path):
    """0.1: with a guard on G and one on D, D's history logged loss_g + loss_d, and D skipped its own finite step
    because G's loss was NaN."""
    torch.manual_seed(0)
    gen, disc = _Generator(), _Discriminator()
    opt_g, opt_d = torch.optim.Adam(gen.parameters(), lr=1e-3), torch.optim.Adam(disc.parameters(), lr=1e-3)
    guard_g, guard_d = _guard(gen, opt_g, tmp_path / "g"), _guard(disc, opt_d, tmp_path / "d")
    real = torch.randn(256, 6) + 2
    losses_g, losses_d = [], []
    for step in range(30):
        z, x = torch.randn(16, 4), real[step * 8 % 240:][:16]
        fake = gen(z)
        loss_d = F.binary_cross_entropy_with_logits(disc(x), torch.ones(16, 1)) + \
            F.binary_cross_entropy_with_logits(disc(fake.detach()), torch.zeros(16, 1))
        opt_d.zero_grad()
        loss_d.backward()
        opt_d.step()
        loss_g = F.binary_cross_entropy_with_logits(disc(fake), torch.ones(16, 1))
        if step == 20:
            loss_g = loss_g * float("nan")  # the generator's loss only
        opt_g.zero_grad()
        loss_g.backward()
        opt_g.step()
        losses_g.append(loss_g.item())
        losses_d.append(loss_d.item())
    guard_g.close()
    guard_d.close()
    assert [(e["step"], e["trigger"]) for e in read_events(tmp_path / "g")] == [(20, "nonfinite_loss")]
    assert read_events(tmp_path / "d") == []
    assert guard_d.summary()["skipped"] == 0
    assert guard_d.loss_history == losses_d
    assert guard_g.loss_history == losses_g[:20] + losses_g[21:]


def test_guarded_model_can_be_pickled_saved_and_deep_copied_without_nanguard(tmp_path):
    """0.1: ``torch.save(model)`` failed (``Can't pickle local object 'Guard._hook_model.<locals>.post_hook'``) and
    ``copy.deepcopy(model)`` for an EMA copy carried the hooks along."""
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = _guard(model, opt, tmp_path)
    train(model, opt, 3)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    restored = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    ema = copy.deepcopy(model)
    clone = pickle.loads(pickle.dumps(model))
    for other in (restored, ema, clone):
        assert _hooks(other) == 0
        assert torch.equal(other[0].weight, model[0].weight)
    steps = guard.step_count
    x, y = next(batches(1))
    F.cross_entropy(ema(x), y).backward()  # the copy trains on its own: the guard does not see it
    assert guard.step_count == steps
    guard.close()


def test_deep_copy_of_a_guarded_model_does_not_keep_the_guard_alive(tmp_path):
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = _guard(model, opt, tmp_path)
    train(model, opt, 2)
    ema = copy.deepcopy(model)
    guard.close()
    ref = weakref.ref(guard)
    del guard
    gc.collect()
    assert ref() is None
    assert ema(torch.randn(2, 8)).shape == (2, 4)


def test_process_wide_patches_stay_while_any_guard_needs_them_and_go_with_the_last(tmp_path):
    a, b = make_mlp(), make_mlp()
    guard_a = _guard(a, torch.optim.SGD(a.parameters(), lr=0.1), tmp_path / "a")
    guard_b = _guard(b, torch.optim.SGD(b.parameters(), lr=0.1), tmp_path / "b")
    both = patches.active()
    assert "torch.autograd.backward" in both
    guard_a.close()
    assert patches.active() == both  # b still needs every one of them (same classes, same backward)
    assert torch.autograd.backward is not ORIGINAL_BACKWARD
    guard_b.close()
    assert patches.active() == []
    assert torch.autograd.backward is ORIGINAL_BACKWARD
