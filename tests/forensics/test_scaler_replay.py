"""A GradScaler never breaks the replay (0.1 deep-copied the scaler: it held the guard and an open file, or it was
in mid-iteration, "A GradScaler instance may only be pickled at the beginning of an iteration"; every script that
created a scaler, even ``enabled=False`` as nanoGPT's train.py does, got ``cause: unknown``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import nanguard
from tests.conftest import read_events


class _Attention(nn.Module):
    """One attention layer whose mask can leave a row with no position to attend to."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 16)
        self.qkv = nn.Linear(16, 48)
        self.head = nn.Linear(16, 11)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        scores = (q @ k.transpose(-1, -2) / math.sqrt(16)).masked_fill(~mask[:, None, :], float("-inf"))
        return self.head(torch.softmax(scores, dim=-1) @ v)


def _train_with_scaler(tmp_path, scaler: torch.amp.GradScaler, *, bad_step: int = 12) -> dict:
    torch.manual_seed(0)
    model = _Attention()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    guard = nanguard.Guard(model, opt, out_dir=tmp_path, console=False, report=False)
    gen = torch.Generator().manual_seed(1)
    for step in range(20):
        ids, labels = torch.randint(0, 11, (4, 6), generator=gen), torch.randint(0, 11, (4, 6), generator=gen)
        mask = torch.ones(4, 6, dtype=torch.bool)
        if step == bad_step:
            mask[2] = False  # an all-padding row
        loss = F.cross_entropy(model(ids, mask).flatten(0, 1), labels.flatten())
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    guard.close()
    (event,) = read_events(tmp_path)
    return event


def test_replay_with_a_disabled_grad_scaler_as_nanogpt_creates_it(tmp_path):
    scaler = torch.amp.GradScaler("cpu", enabled=False)  # nanoGPT: GradScaler(enabled=(dtype == 'float16'))
    event = _train_with_scaler(tmp_path, scaler)
    d = event["diagnosis"]
    assert (event["step"], d["cause"], d["op"], d["module"]) == (12, "masked_softmax_all_masked", "aten::_softmax", "")
    assert d["reproducible"] is True


def test_replay_with_an_enabled_grad_scaler_in_mid_iteration(tmp_path):
    """The scaler has unscaled this step's gradients (``scaler.step`` calls ``unscale_``) when the guard replays."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=True)
    event = _train_with_scaler(tmp_path, scaler)
    d = event["diagnosis"]
    assert (event["step"], d["cause"], d["op"]) == (12, "masked_softmax_all_masked", "aten::_softmax")
    assert not any("restore" in line or "pickle" in line for line in d["evidence"])
    assert scaler.get_scale() > 0 and scaler.state_dict()["_growth_tracker"] >= 0
