"""Forensics never spends work beyond its budget, and never with ``forensics=False``.

0.1 re-ran the previous batch (an extra forward and backward) on bad steps even with forensics off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import nanguard
from tests.conftest import read_events
from tests.guard.helpers import batches


class _Counting(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.net(x)


def _run_with_spikes(tmp_path, spike_steps: set[int], **config) -> tuple[_Counting, list[dict]]:
    model = _Counting()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = nanguard.Guard(model, opt, out_dir=tmp_path, console=False, report=False, **config)
    for step, (x, y) in enumerate(batches(60)):
        loss = F.cross_entropy(model(x), y)
        if step in spike_steps:
            loss = loss * 1000  # a finite loss spike: the kind of event that re-runs the previous batch
        opt.zero_grad()
        loss.backward()
        opt.step()
    guard.close()
    return model, read_events(tmp_path)


def test_previous_batch_is_not_rerun_with_forensics_off(tmp_path):
    model, events = _run_with_spikes(tmp_path, {40}, forensics=False)
    assert [(e["step"], e["trigger"]) for e in events] == [(40, "loss_spike")]
    assert model.calls == 60  # the training's own forward calls and nothing else
    assert not any("previous batch" in line for line in events[0]["diagnosis"]["evidence"])


def test_previous_batch_rerun_counts_against_the_budget(tmp_path):
    model, events = _run_with_spikes(tmp_path, {40, 50}, forensics_max_events=1)
    assert [e["step"] for e in events] == [40, 50]
    first, second = (e["diagnosis"]["evidence"] for e in events)
    assert any("previous batch" in line for line in first)  # the funded event re-ran the previous batch
    assert not any("previous batch" in line for line in second)  # the budget was spent: nothing re-run
    funded_calls = model.calls - 60
    assert funded_calls >= 1
    assert events[1]["diagnosis"]["cause"] == "loss_spike"
