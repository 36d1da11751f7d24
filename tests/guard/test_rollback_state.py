"""What a rollback restores, exactly as documented (0.1's snapshot claimed the LR scheduler and never took it,
copied the spike statistics on every snapshot and never restored them; ``snapshot_device`` and ``alarm_z`` were
validated but did nothing)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import nanguard
from tests.conftest import read_events
from tests.guard.helpers import batches, make_mlp


def test_rollback_restores_the_detector_statistics_and_keeps_the_schedule_position(tmp_path):
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)
    guard = nanguard.Guard(model, opt, scheduler=sched, out_dir=tmp_path, console=False, report=False, snapshot_every=10)
    seen: dict = {}
    for step, (x, y) in enumerate(batches(40)):
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        if step == 30:
            # The snapshot taken just before step 31 is not trusted for a streak starting at 31 (it may hold the
            # damage of step 30's update): the rollback goes to the one before it.
            seen["stats"] = next(s for s in guard.rollback.ring if s.step == 21).extra["detector"]["loss"]
            seen["lr"] = opt.param_groups[0]["lr"]
            with torch.no_grad():
                model[0].weight[0, 0] = float("inf")
        if step == 31:
            seen["after"] = guard.detector.loss.state_dict()
            seen["lr_after"] = opt.param_groups[0]["lr"]
            seen["epoch"] = sched.last_epoch
    guard.close()
    (event,) = read_events(tmp_path)
    assert (event["step"], event["action"], event["details"]["rolled_back_to_step"]) == (31, "rollback", 21)
    assert seen["after"] == seen["stats"]  # the statistics came back with the weights
    assert seen["lr_after"] == seen["lr"] and seen["epoch"] == 31  # the schedule kept its position
    assert sched.last_epoch == 39  # one scheduler step held back for the step the guard dropped


def test_emergency_checkpoint_holds_the_scheduler_state_and_loads_with_weights_only(tmp_path):
    model = make_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    nanguard.Guard(model, opt, scheduler=sched, out_dir=tmp_path, console=False, report=False, rollback_after=2,
                   abort_after=4, max_rollbacks=1, snapshot_every=5)
    try:
        for step, (x, y) in enumerate(batches(40)):
            x = torch.full_like(x, float("nan")) if step >= 12 else x
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            sched.step()
    except nanguard.TrainingAborted as exc:
        checkpoint = torch.load(exc.checkpoint, weights_only=True)
    # Taken inside the optimizer.step() of the step before: that step's scheduler.step() had not run yet.
    assert checkpoint["scheduler"]["last_epoch"] == checkpoint["step"] - 1
    assert checkpoint["optimizer"]["state"] and checkpoint["optimizer"]["param_groups"][0]["params"] == [0, 1, 2, 3]
    assert set(checkpoint["model"]) == set(model.state_dict())


def test_snapshot_device_same_keeps_snapshots_beside_the_parameters(tmp_path):
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = nanguard.Guard(model, opt, out_dir=tmp_path, console=False, report=False, snapshot_device="same",
                           snapshot_every=5)
    for x, y in batches(12):
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    guard.close()
    snap = guard.rollback.ring[-1]
    assert snap.where == "same"
    assert all(c.saved.device == c.live.device and not c.saved.is_pinned() for c in snap.tensors)


def test_a_spike_below_alarm_z_is_skipped_without_a_replay(tmp_path):
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = nanguard.Guard(model, opt, out_dir=tmp_path, console=False, report=False,
                           spikes={"alarm_z": 1e9, "skip_z": 6.0})
    for step, (x, y) in enumerate(batches(60)):
        loss = F.cross_entropy(model(x), y)
        (loss * 50 if step == 45 else loss).backward()
        opt.step()
        opt.zero_grad()
    guard.close()
    (event,) = read_events(tmp_path)
    assert (event["step"], event["trigger"], event["action"]) == (45, "loss_spike", "skip")
    assert guard.desk.investigations == 0  # the spike did not reach alarm_z: triage, no replay spent
    assert "replays" not in event.get("details", {})
