"""The verdict: one encoding of the step's device vector, decoded on the host exactly as the device decided,
carrying everything about its own step (0.1 parked per-rank rows and renamed batch fields on the guard, so
rows from an earlier step could end up in a later event)."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nanguard
from nanguard.actions.respond import StepContext
from nanguard.step.verdict import (
    FLOAT32_MAX,
    LOSS,
    NORM,
    SCALER_FOUND,
    WEIGHTS,
    Limits,
    Reading,
    as_float32,
    decode,
    device_found,
    upper_bounds,
)
from tests.conftest import read_events
from tests.guard.helpers import make_mlp

finite_or_not = st.one_of(st.floats(-1e30, 1e30, allow_nan=False), st.sampled_from([math.nan, math.inf, -math.inf]))


@settings(max_examples=200, deadline=None)
@given(loss=finite_or_not, norm=finite_or_not, weights=finite_or_not,
       loss_limit=st.floats(0, 1e6), grad_limit=st.floats(0, 1e6), found=st.sampled_from([0.0, 1.0]))
def test_host_decodes_exactly_what_the_device_decided(loss, norm, weights, loss_limit, grad_limit, found):
    layout = (LOSS, NORM, WEIGHTS, SCALER_FOUND)
    limits = Limits.of(loss_limit, grad_limit, FLOAT32_MAX)
    vector = torch.tensor([loss, norm, weights, found], dtype=torch.float32)
    upper = torch.tensor(upper_bounds(layout, limits, has_loss=True))
    device = bool(device_found(vector, upper, torch.full((4,), -FLOAT32_MAX)))
    verdict = decode(0, vector.tolist(), Reading(layout), limits, has_loss=True, scaler_enabled=True)
    assert device == (verdict.bad or verdict.scaler_overflow)


@settings(max_examples=100, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=True, width=64))
def test_limits_are_exact_float32_values(value):
    rounded = as_float32(value)
    assert float(torch.tensor(rounded, dtype=torch.float32)) == rounded


def test_event_carries_the_rank_rows_of_its_own_step(tmp_path):
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = nanguard.Guard(model, opt, out_dir=tmp_path, console=False, report=False, forensics=False)
    layout, limits = (LOSS, NORM), Limits()
    # Two ranks; at step 5 rank 1 saw a NaN loss, at step 6 both were fine. Step 6's verdict is handled first
    # (a late read-back): the event of step 5 must still say rank 1 and quote step 5's rows.
    rows5 = [0.7, 1.0, math.nan, 1.0]
    rows6 = [0.6, 0.9, 0.65, 0.9]
    v5 = decode(5, rows5, Reading(layout, world=2), limits, has_loss=True, scaler_enabled=False)
    v6 = decode(6, rows6, Reading(layout, world=2), limits, has_loss=True, scaler_enabled=False)
    guard.responder.on_good(v6, StepContext(6, limits, True))
    guard.responder.on_bad(v5, StepContext(5, limits, True))
    guard.close()
    (event,) = read_events(tmp_path)
    assert (event["step"], event["rank"], event["trigger"]) == (5, 1, "nonfinite_loss")
    assert event["details"]["rank_flags"] == [[0.7, 1.0], ["nan", 1.0]]
    assert event.get("loss") is None and event["loss_repr"] == "nan"  # rank 1's loss, not the mean
