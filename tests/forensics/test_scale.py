"""GradScaler skips replayed at loss scale 1 (issue 15, case 1): a NaN that survives is traced and reported at
the first skip; an overflow that the scaler outgrows stays silent."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import nanguard
from nanguard.errors import TrainingAborted
from nanguard.forensics.scale import scale_tensor, unit_scale
from tests.conftest import read_events


def _metric_run(tmp_path, steps: int, *, eps: float = 0.0, init_scale: float = 65536.0, weight: float = 1.0,
                **kwargs) -> tuple[list[dict], float]:
    """Pairwise distances over the whole batch, diagonal included: sqrt's derivative at 0 is infinite."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    guard = nanguard.Guard(model, opt, scaler=scaler, out_dir=tmp_path, console=False, report=False, **kwargs)
    gen = torch.Generator().manual_seed(1)
    x, labels = torch.randn(16, 8, generator=gen), torch.randint(0, 4, (16,), generator=gen)
    try:
        for _ in range(steps):
            e = model(x)
            d = torch.sqrt(((e[:, None] - e[None]) ** 2).sum(-1) + eps)
            same = labels[:, None] == labels[None]
            loss = weight * ((d * same).mean() + torch.relu(1 - d)[~same].mean())
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
    except TrainingAborted:
        pass  # a NaN at every step from the first: the policy gives up once no snapshot is left to restore
    guard.close()
    return read_events(tmp_path), scaler.get_scale()


def test_scale_independent_nan_is_traced_to_sqrt_at_the_first_skip(tmp_path):
    events, _ = _metric_run(tmp_path, 3)
    first = events[0]
    d = first["diagnosis"]
    assert (first["step"], first["trigger"], d["cause"], d["op"]) == (0, "nonfinite_grad", "backward_singularity",
                                                                       "aten::sqrt")
    assert "loss scale at 1" in d["evidence"][0] and "lowering it cannot help" in d["evidence"][0]
    assert any("SqrtBackward0" in line for line in d["evidence"])
    assert "sqrt(x + eps)" in d["fixes"][0]
    assert all(e["diagnosis"]["cause"] != "backward_overflow" for e in events)


def test_without_the_replay_the_same_run_falls_back_to_the_patience(tmp_path):
    events, scale = _metric_run(tmp_path, 8, scaler_replay=False, scaler_overflow_patience=5)
    (event,) = events
    assert (event["step"], event["diagnosis"]["cause"]) == (4, "backward_overflow")
    assert scale < 65536.0 / 2**4


def test_scaler_overflow_that_scale_one_fixes_stays_silent(tmp_path):
    """fp16's normal early skips: a scale so large the scaled gradients overflow; the scaler halves it until
    they fit, and nanguard says nothing."""
    events, scale = _metric_run(tmp_path, 12, eps=1e-6, init_scale=2.0**127, weight=100.0)
    assert scale < 2.0**127  # the scaler did skip (and lower its scale)
    assert events == []


def test_unit_scale_restores_the_scale_tensor():
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(torch.tensor(1.0))  # the scale tensor exists from the first scale() call
    tensor = scale_tensor(scaler)
    assert tensor is not None
    with unit_scale(scaler):
        assert float(scaler.scale(torch.tensor(3.0))) == 3.0
    assert float(tensor) == 1024.0 and scaler.get_scale() == 1024.0


@pytest.mark.parametrize("enabled", [False])
def test_unit_scale_of_a_disabled_scaler_does_nothing(enabled):
    scaler = torch.amp.GradScaler("cpu", enabled=enabled)
    assert scale_tensor(scaler) is None
    with unit_scale(scaler):
        pass


def test_an_overflow_that_survives_loss_scale_1_is_not_told_to_use_a_grad_scaler(tmp_path):
    """Raw counts in fp16: the gradients overflow at any scale, with the GradScaler already there."""
    from nanguard.zoo.scenarios import mlp_fp16_raw_counts_grad_overflow as scenario

    def attach(model, optimizer, *, scheduler, scaler):
        return nanguard.Guard(model, optimizer, scaler=scaler, out_dir=tmp_path, console=False, report=False)

    scenario.main(attach=attach, steps=2)
    d = read_events(tmp_path)[0]["diagnosis"]
    assert d["cause"] == "backward_overflow"
    assert not any("Use a GradScaler" in fix for fix in d["fixes"])
    assert "even at loss scale 1" in d["fixes"][0] and "input_layer" in d["fixes"][0]
