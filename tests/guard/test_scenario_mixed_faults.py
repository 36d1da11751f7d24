"""The issue's own acceptance run: one plain script with a NaN batch, a transient spike, an LR-schedule bug and a
corrupted weight. Each shows up at the right step with the right trigger and action, the weights stay finite and
the final loss is close to a fault-free run."""

from __future__ import annotations

import math

import pandas as pd
import torch
import torch.nn.functional as F

import nanguard
from tests.conftest import read_events
from tests.guard.helpers import batches, make_mlp

NAN_STEP, SPIKE_STEP, LR_BUG = 60, 100, (150, 153)
CORRUPT_AFTER = 200


def _lr_lambda(faulty: bool):
    def factor(step: int) -> float:
        if faulty and LR_BUG[0] <= step < LR_BUG[1]:
            return 300.0  # a schedule bug: a misplaced multiplier for a few steps
        return 1.0

    return factor


def _train(out_dir, *, faulty: bool, guarded: bool, steps: int = 300):
    torch.manual_seed(0)
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(faulty))
    guard = nanguard.Guard(model, opt, scheduler=sched, out_dir=out_dir, console=False, report=False,
                           snapshot_every=25) if guarded else None
    losses = []
    for step, (x, y) in enumerate(batches(steps)):
        if faulty and step == NAN_STEP:
            x = x.clone()
            x[4, 0] = float("nan")
        if faulty and step == SPIKE_STEP:
            x = x * 1e4
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if faulty and step == CORRUPT_AFTER:
            with torch.no_grad():
                model[2].weight[0, 3] = float("inf")
    if guard is not None:
        guard.close()
    return model, losses


def test_mixed_faults_are_each_handled_and_the_run_ends_close_to_fault_free(tmp_path):
    _, clean = _train(tmp_path / "clean", faulty=False, guarded=False)
    model, guarded = _train(tmp_path / "guarded", faulty=True, guarded=True)
    events = read_events(tmp_path / "guarded")
    by_step = {e["step"]: e for e in events}

    assert (by_step[NAN_STEP]["trigger"], by_step[NAN_STEP]["action"]) == ("nonfinite_loss", "skip")
    assert by_step[NAN_STEP]["diagnosis"]["cause"] == "input_nonfinite"
    assert by_step[SPIKE_STEP]["trigger"] == "loss_spike" and by_step[SPIKE_STEP]["action"] == "skip"
    assert by_step[SPIKE_STEP]["diagnosis"]["cause"] == "input_extreme_scale"
    lr_events = [e for e in events if LR_BUG[0] <= e["step"] <= LR_BUG[1] + 3]
    assert lr_events, "the LR bug went unnoticed"
    assert any(e["action"] == "rollback" for e in lr_events)
    corrupt = by_step[CORRUPT_AFTER + 1]
    assert (corrupt["trigger"], corrupt["action"]) == ("nonfinite_loss", "rollback")
    assert corrupt["diagnosis"]["cause"] == "weights_nonfinite"
    assert not any(e["action"] == "abort" for e in events)

    assert all(torch.isfinite(p).all() for p in model.parameters())
    tail_clean, tail_guarded = sum(clean[-30:]) / 30, sum(guarded[-30:]) / 30
    assert math.isfinite(tail_guarded)
    assert tail_guarded < tail_clean * 1.5 + 0.05

    history = pd.read_csv(tmp_path / "guarded" / "history.csv")
    assert len(history) == 300
    assert history.loc[NAN_STEP, "action"] == "skip"
    assert history["rollbacks_total"].iloc[-1] >= 2


def test_the_same_faults_without_the_guard_end_in_nan(tmp_path):
    model, losses = _train(tmp_path, faulty=True, guarded=False)
    assert not math.isfinite(losses[-1]) or not all(torch.isfinite(p).all() for p in model.parameters())
