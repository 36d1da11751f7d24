"""A step that raises is recorded as what it is: trigger ``exception``, action ``abort``, on every path.

0.1 recorded it with trigger ``nonfinite_loss``, so the HF callback counted a crash as a non-finite loss.
"""

from __future__ import annotations

import textwrap

import jsonschema
import pytest
import torch
import torch.nn.functional as F

import nanguard
from nanguard.config import resolve_config
from nanguard.zero_code import run_script
from tests.conftest import load_schema, read_events
from tests.guard.helpers import batches, make_mlp


def _assert_one_exception_event(out_dir, step: int) -> None:
    events = read_events(out_dir)
    assert [(e["step"], e["trigger"], e["action"]) for e in events] == [(step, "exception", "abort")]
    jsonschema.validate(events[0], load_schema())
    assert events[0]["diagnosis"]["cause"] == "label_out_of_range"
    assert "Target 4 is out of bounds" in events[0]["details"]["exception"]


def test_step_that_raises_under_with_guard_has_trigger_exception(tmp_path):
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(IndexError, match="out of bounds"), \
            nanguard.Guard(model, opt, out_dir=tmp_path, console=False, report=False):
        for step, (x, y) in enumerate(batches(10)):
            if step == 6:
                y = y.clone()
                y[3] = 4
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    _assert_one_exception_event(tmp_path, 6)


def test_step_that_raises_in_a_closure_has_trigger_exception(tmp_path):
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = nanguard.Guard(model, opt, out_dir=tmp_path, console=False, report=False)
    with pytest.raises(IndexError):
        for step, (x, y) in enumerate(batches(10)):
            labels = y.clone()
            if step == 4:
                labels[0] = 4

            def closure(x=x, labels=labels):
                opt.zero_grad()
                loss = F.cross_entropy(model(x), labels)
                loss.backward()
                return loss

            guard.step(closure)
    guard.close(status="error")
    _assert_one_exception_event(tmp_path, 4)


def test_script_that_raises_under_nanguard_run_has_trigger_exception(tmp_path, capsys):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent("""
        import torch
        import torch.nn.functional as F
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(10):
            x, labels = torch.randn(8, 8), torch.randint(0, 4, (8,))
            if step == 3:
                labels[2] = 4
            F.cross_entropy(model(x), labels).backward()
            opt.step()
            opt.zero_grad()
    """))
    status = run_script(script, [], resolve_config("safe", out_dir=str(tmp_path / "out"), console=False, report=False))
    assert status == 1
    assert "Target 4 is out of bounds" in capsys.readouterr().err
    _assert_one_exception_event(tmp_path / "out", 3)
    assert read_events(tmp_path / "out")[0]["diagnosis"]["tensor"] == "labels"
