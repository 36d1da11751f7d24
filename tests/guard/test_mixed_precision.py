"""bf16 autocast and fp16 with GradScaler: the same detection, with the scaler's state respected."""

from __future__ import annotations

import jsonschema
import torch
import torch.nn.functional as F

import nanguard
from tests.conftest import load_schema, read_events
from tests.guard.helpers import batches, make_mlp


def test_bf16_autocast_nan_batch_is_skipped(tmp_path):
    model = make_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    guard = nanguard.Guard(model, opt, out_dir=tmp_path, console=False, report=False)
    for step, (x, y) in enumerate(batches(40)):
        if step == 30:
            x = x.clone()
            x[2, 3] = float("inf")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    guard.close()
    events = read_events(tmp_path)
    assert [(e["step"], e["action"]) for e in events] == [(30, "skip")]
    assert events[0]["diagnosis"]["cause"] == "input_nonfinite"
    for event in events:
        jsonschema.validate(event, load_schema())


def test_grad_scaler_nan_loss_is_an_event_not_a_scaler_skip(tmp_path):
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    guard = nanguard.Guard(model, opt, scaler=scaler, out_dir=tmp_path, console=False, report=False)
    for step, (x, y) in enumerate(batches(30)):
        if step == 15:
            x = x.clone()
            x[0] = float("nan")
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    guard.close()
    events = read_events(tmp_path)
    assert [(e["step"], e["trigger"], e["action"]) for e in events] == [(15, "nonfinite_loss", "skip")]
    assert guard.step_count == 30
    # The loss recorded in history is the unscaled one.
    history = (tmp_path / "history.csv").read_text().splitlines()
    first_loss = float(history[1].split(",")[2])
    assert 0.5 < first_loss < 3.0


def test_persistent_scaler_overflow_becomes_a_backward_overflow_event(tmp_path):
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=1)
    guard = nanguard.Guard(model, opt, scaler=scaler, out_dir=tmp_path, console=False, report=False, scaler_overflow_patience=5)
    for step, (x, y) in enumerate(batches(12)):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        scaler.scale(loss).backward()
        if step >= 3:
            model[0].weight.grad[0, 0] = float("inf")  # gradients overflow every step from here on
        scaler.step(opt)
        scaler.update()
    guard.close()
    events = read_events(tmp_path)
    assert events and events[0]["trigger"] == "nonfinite_grad"
    assert events[0]["diagnosis"]["cause"] == "backward_overflow"
    assert events[0]["step"] == 7
