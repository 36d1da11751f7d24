"""End-to-end behaviour of each action of the escalation ladder, on a tiny CPU model."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import nanguard
from nanguard.errors import TrainingAborted
from tests.conftest import read_events
from tests.guard.helpers import assert_same_state, batches, make_mlp, state_copy, train


def _nan_at(bad_step: int):
    def corrupt(step, x, y):
        if step == bad_step:
            x = x.clone()
            x[3, 2] = float("nan")
        return x, y

    return corrupt


@pytest.mark.parametrize("fused", [False, True])
def test_nan_batch_is_skipped_without_touching_weights_or_optimizer_state(tmp_path, fused):
    model = make_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
    guard = nanguard.Guard(model, opt, out_dir=tmp_path, console=False, report=False)
    snapshots = {}

    def corrupt(step, x, y):
        if step == 20:
            snapshots["before"] = state_copy(model, opt)
            x = x.clone()
            x[0, 0] = float("nan")
        return x, y

    def after(step):
        if step == 20:
            snapshots["after"] = state_copy(model, opt)

    train(model, opt, 40, corrupt=corrupt, after_step=after)
    guard.close()
    assert_same_state(snapshots["before"], snapshots["after"])
    events = read_events(tmp_path)
    assert [(e["step"], e["trigger"], e["action"]) for e in events] == [(20, "nonfinite_loss", "skip")]
    assert events[0]["diagnosis"]["cause"] == "input_nonfinite"
    assert events[0]["diagnosis"]["tensor"] == "x"
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert guard.summary()["skipped"] == 1
    # Adam's own step counter did not count the skipped step.
    assert int(next(iter(opt.state.values()))["step"]) == 39


def test_final_loss_close_to_fault_free_run(tmp_path):
    clean_model, bad_model = make_mlp(), make_mlp()
    bad_model.load_state_dict(clean_model.state_dict())
    clean_opt = torch.optim.SGD(clean_model.parameters(), lr=0.1, momentum=0.9)
    bad_opt = torch.optim.SGD(bad_model.parameters(), lr=0.1, momentum=0.9)
    clean = train(clean_model, clean_opt, 150)
    guard = nanguard.Guard(bad_model, bad_opt, out_dir=tmp_path, console=False, report=False)
    guarded = train(bad_model, bad_opt, 150, corrupt=_nan_at(30))
    guard.close()
    tail_clean = sum(clean[-20:]) / 20
    tail_guarded = sum(guarded[-20:]) / 20
    assert math.isfinite(tail_guarded)
    assert abs(tail_guarded - tail_clean) / tail_clean < 0.15


def test_unguarded_run_with_same_fault_goes_nan():
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train(model, opt, 40, corrupt=_nan_at(20))
    assert not all(torch.isfinite(p).all() for p in model.parameters())


def test_corrupted_weight_triggers_rollback_and_weights_end_finite(tmp_path):
    model = make_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    guard = nanguard.Guard(model, opt, out_dir=tmp_path, console=False, report=False, snapshot_every=10)

    def after(step):
        if step == 35:
            with torch.no_grad():
                model[0].weight[1, 1] = float("inf")

    train(model, opt, 60, after_step=after)
    guard.close()
    events = read_events(tmp_path)
    assert events[0]["step"] == 36
    assert events[0]["action"] == "rollback"
    assert events[0]["diagnosis"]["cause"] == "weights_nonfinite"
    assert events[0]["diagnosis"]["tensor"] == "0.weight"
    assert events[0]["details"]["rolled_back_to_step"] == 31  # the state from just before step 31, i.e. after step 30
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_rollback_restores_params_and_optimizer_state_bit_for_bit(tmp_path):
    model = make_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    guard = nanguard.Guard(model, opt, out_dir=tmp_path, console=False, report=False, snapshot_every=10)
    saved = {}

    def after(step):
        if step == 9:  # the snapshot is taken after the step whose index is a multiple of 10
            saved["state"] = None
        if step == 10:
            saved["state"] = state_copy(model, opt)
        if step == 16:  # five good steps after the snapshot: it is trusted
            with torch.no_grad():
                model[2].bias[0] = float("nan")

    for step, (x, y) in enumerate(batches(18)):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        after(step)
        if step == 17:
            break
    guard.close()
    events = read_events(tmp_path)
    assert events[0]["action"] == "rollback"
    assert events[0]["details"]["rolled_back_to_step"] == 11
    assert_same_state(saved["state"], state_copy(model, opt))


def test_three_bad_steps_in_a_row_escalate_from_skip_to_rollback(tmp_path):
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = nanguard.Guard(model, opt, out_dir=tmp_path, console=False, report=False, rollback_after=3)

    def corrupt(step, x, y):
        if 20 <= step < 23:
            x = torch.full_like(x, float("nan"))
        return x, y

    train(model, opt, 30, corrupt=corrupt)
    guard.close()
    actions = [(e["step"], e["action"]) for e in read_events(tmp_path)]
    assert actions == [(20, "skip"), (21, "skip"), (22, "rollback")]
    assert guard.lr_multiplier < 1.0


class _RecordingSGD(torch.optim.SGD):
    """SGD that remembers the learning rate each applied update used."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.applied_lrs: list[float] = []

    def step(self, closure=None):
        self.applied_lrs.append(self.param_groups[0]["lr"])
        return super().step(closure)


def test_lr_backoff_is_a_multiplier_the_scheduler_cannot_undo(tmp_path):
    model = make_mlp()
    opt = _RecordingSGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    guard = nanguard.Guard(model, opt, scheduler=sched, out_dir=tmp_path, console=False, report=False,
                           rollback_after=1, lr_backoff=0.5, lr_restore_steps=1000)
    train(model, opt, 30, corrupt=_nan_at(10), scheduler=sched)
    guard.close()
    assert opt.applied_lrs[0] == pytest.approx(0.1)
    # After the rollback at step 10 every applied step used a backed-off LR, although the scheduler reset it to 0.1.
    assert len(opt.applied_lrs) == 29
    assert all(lr < 0.1 for lr in opt.applied_lrs[10:])
    assert opt.applied_lrs[10] == pytest.approx(0.05, rel=0.01)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)  # the scheduler's own value is untouched


def test_skipped_step_does_not_advance_the_scheduler(tmp_path):
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    guard = nanguard.Guard(model, opt, scheduler=sched, out_dir=tmp_path, console=False, report=False)
    train(model, opt, 10, corrupt=_nan_at(5), scheduler=sched)
    guard.close()
    assert sched.last_epoch == 9  # 10 scheduler.step() calls, one of them held back


def test_abort_writes_a_loadable_emergency_checkpoint(tmp_path):
    model = make_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    nanguard.Guard(model, opt, out_dir=tmp_path, console=False, report=False, rollback_after=2, abort_after=4, max_rollbacks=1)

    def corrupt(step, x, y):
        return (torch.full_like(x, float("nan")) if step >= 5 else x), y

    with pytest.raises(TrainingAborted) as info:
        train(model, opt, 30, corrupt=corrupt)
    assert "emergency checkpoint" in str(info.value).lower()
    checkpoint = torch.load(info.value.checkpoint, weights_only=True)
    assert set(checkpoint["model"]) == set(model.state_dict())
    assert all(torch.isfinite(t).all() for t in checkpoint["model"].values())
    events = read_events(tmp_path)
    assert events[-1]["action"] == "abort"
    assert (tmp_path / "summary.json").exists()


def test_history_csv_is_readable_by_pandas_with_one_row_per_step(tmp_path):
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = nanguard.Guard(model, opt, out_dir=tmp_path, console=False, report=False)
    train(model, opt, 25, corrupt=_nan_at(7))
    guard.close()
    frame = pd.read_csv(tmp_path / "history.csv")
    assert list(frame["step"]) == list(range(25))
    assert frame.loc[7, "action"] == "skip" and frame.loc[7, "trigger"] == "nonfinite_loss"
    assert math.isinf(frame.loc[7, "loss"]) or math.isnan(frame.loc[7, "loss"])
    assert frame.loc[24, "skipped_total"] == 1
    assert (frame["lr_multiplier"] == 1.0).all()


def test_closure_api_steps_and_reports(tmp_path):
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = nanguard.Guard(model, opt, out_dir=tmp_path, console=False, report=False)
    for step, (x, y) in enumerate(batches(12)):
        if step == 6:
            y = y.clone()
            x = x * float("nan")

        def closure(x=x, y=y):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        loss = guard.step(closure)
        assert isinstance(loss, torch.Tensor)
    guard.close()
    events = read_events(tmp_path)
    assert [(e["step"], e["action"]) for e in events] == [(6, "skip")]
    assert guard.step_count == 12


def test_previous_run_files_are_set_aside_not_overwritten(tmp_path):
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        guard = nanguard.Guard(model, opt, out_dir=tmp_path, console=False, report=False)
        train(model, opt, 3)
        guard.close()
    kept = list((tmp_path / "previous").glob("*/events.jsonl"))
    assert len(kept) == 1 and (tmp_path / "events.jsonl").exists()


def test_a_users_own_events_file_is_never_moved(tmp_path):
    (tmp_path / "events.jsonl").write_text('{"old": true}\n')
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = nanguard.Guard(model, opt, out_dir=tmp_path, console=False, report=False)
    train(model, opt, 3)
    guard.close()
    assert (tmp_path / "events.jsonl").read_text() == '{"old": true}\n'
    assert not (tmp_path / "previous").exists()
    assert guard.out_dir != tmp_path and read_events(guard.out_dir) == []


def test_guard_rejects_a_non_optimizer_with_a_clear_error():
    with pytest.raises(nanguard.NanguardError, match=r"torch\.optim\.Optimizer"):
        nanguard.Guard(make_mlp(), "adam")  # type: ignore[arg-type]


def test_tensorboard_sink_gets_scalars_and_event_text(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = nanguard.Guard(model, opt, out_dir=tmp_path, console=False, report=False, tensorboard=True)
    train(model, opt, 12, corrupt=_nan_at(6))
    guard.close()
    accumulator = EventAccumulator(str(tmp_path / "tensorboard"))
    accumulator.Reload()
    tags = accumulator.Tags()
    assert any("loss" in tag for tag in tags["scalars"])
    assert tags["tensors"] or tags.get("text")


def test_optimizer_step_with_a_closure_is_guarded_and_evaluates_the_closure_once(tmp_path):
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = nanguard.Guard(model, opt, out_dir=tmp_path, console=False, report=False)
    calls = []
    for step, (x, y) in enumerate(batches(8)):
        if step == 4:
            x = torch.full_like(x, float("nan"))

        def closure(x=x, y=y, step=step):
            calls.append(step)
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
    guard.close()
    # Once per step; the bad step's closure is also what forensics re-runs to find the cause.
    assert all(calls.count(step) == 1 for step in range(8) if step != 4)
    assert calls.count(4) >= 1
    assert [(e["step"], e["action"]) for e in read_events(tmp_path)] == [(4, "skip")]


def test_two_guards_in_one_process_count_only_their_own_losses(tmp_path):
    """Regression: each guard summed every backward() in the process (a GAN's two losses became one)."""
    a, b = torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)
    opt_a, opt_b = torch.optim.SGD(a.parameters(), lr=0.0), torch.optim.SGD(b.parameters(), lr=0.0)
    guard_a = nanguard.Guard(a, opt_a, out_dir=tmp_path / "a", console=False, report=False)
    guard_b = nanguard.Guard(b, opt_b, out_dir=tmp_path / "b", console=False, report=False)
    x = torch.randn(8, 4)
    for _ in range(3):
        (a(x).pow(2).mean() + 1.0).backward()
        opt_a.step()
        opt_a.zero_grad()
        (b(x).pow(2).mean() + 100.0).backward()
        opt_b.step()
        opt_b.zero_grad()
    guard_a.close()
    guard_b.close()
    true_a = float(a(x).pow(2).mean() + 1.0)
    true_b = float(b(x).pow(2).mean() + 100.0)
    assert list(guard_a.loss_history) == pytest.approx([true_a] * 3)
    assert list(guard_b.loss_history) == pytest.approx([true_b] * 3)
