"""``Guard.state_dict()`` saved next to the checkpoint brings a resumed run back to where it was."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

import nanguard
from tests.conftest import read_events
from tests.guard.helpers import batches, make_mlp


def _steps(model, opt, data, spike_at=None):
    for step, (x, y) in data:
        loss = F.cross_entropy(model(x), y)
        (loss * 1000 if step == spike_at else loss).backward()
        opt.step()
        opt.zero_grad()


def test_resumed_guard_continues_its_statistics_counters_and_step_numbers(tmp_path):
    data = list(enumerate(batches(80)))
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = nanguard.Guard(model, opt, out_dir=tmp_path / "first", console=False, report=False)
    _steps(model, opt, data[:50])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "nanguard": guard.state_dict()}, buffer)
    guard.close()

    checkpoint = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    model2 = make_mlp()
    model2.load_state_dict(checkpoint["model"])
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.05)
    opt2.load_state_dict(checkpoint["optimizer"])
    resumed = nanguard.Guard(model2, opt2, out_dir=tmp_path / "second", console=False, report=False)
    resumed.load_state_dict(checkpoint["nanguard"])
    assert resumed.step_count == 50
    assert resumed.detector.loss.state_dict() == guard.detector.loss.state_dict()
    _steps(model2, opt2, data[50:], spike_at=55)  # past the warm-up already: the spike is caught at once
    resumed.close()
    assert [(e["step"], e["trigger"]) for e in read_events(tmp_path / "second")] == [(55, "loss_spike")]
    assert resumed.summary()["steps"] == 80


def test_load_state_dict_rejects_what_is_not_a_guard_state(tmp_path):
    model = make_mlp()
    guard = nanguard.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), out_dir=tmp_path, console=False,
                           report=False)
    with pytest.raises(nanguard.NanguardError, match=r"Guard\.load_state_dict"):
        guard.load_state_dict({"model": {}})
    guard.close()
