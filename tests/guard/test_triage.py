"""With forensics off (or failing), the guard still names the cause from the batch and the state."""

from __future__ import annotations

import torch

import nanguard
from tests.conftest import read_events
from tests.guard.helpers import make_mlp, train


def _guard(tmp_path, model, opt):
    return nanguard.Guard(model, opt, out_dir=tmp_path, console=False, report=False, forensics=False)


def test_without_forensics_a_nan_batch_is_input_nonfinite_with_its_field(tmp_path):
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = _guard(tmp_path, model, opt)

    def corrupt(step, x, y):
        if step == 9:
            x = x.clone()
            x[2, 2] = float("nan")
        return x, y

    train(model, opt, 12, corrupt=corrupt)
    guard.close()
    event = read_events(tmp_path)[0]
    assert (event["step"], event["diagnosis"]["cause"], event["diagnosis"]["tensor"]) == (9, "input_nonfinite", "x")


def test_without_forensics_an_inf_weight_is_weights_nonfinite_with_its_module(tmp_path):
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = _guard(tmp_path, model, opt)

    def after(step):
        if step == 5:
            with torch.no_grad():
                model[2].bias[1] = float("inf")

    train(model, opt, 8, after_step=after)
    guard.close()
    diagnosis = read_events(tmp_path)[0]["diagnosis"]
    assert (diagnosis["cause"], diagnosis["module"], diagnosis["tensor"]) == ("weights_nonfinite", "2", "2.bias")


def test_without_forensics_a_rescaled_batch_is_input_extreme_scale(tmp_path):
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = _guard(tmp_path, model, opt)

    def corrupt(step, x, y):
        return (x * 1e5 if step == 60 else x), y

    train(model, opt, 64, corrupt=corrupt)
    guard.close()
    event = read_events(tmp_path)[0]
    assert (event["step"], event["diagnosis"]["cause"], event["diagnosis"]["tensor"]) == (60, "input_extreme_scale", "x")
