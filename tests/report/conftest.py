"""Realistic run directories for the report tests, written the way the guard writes them.

A fixture run has 400 steps: a NaN loss at step 120 (skipped, diagnosed as a float16 overflow with
per-module magnitudes), a clipped gradient spike at 200 (history only), a loss spike of 8.7e15 at
300 (rolled back) and a divergence at 340 (LR backed off to 0.5x).
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import pytest

from nanguard.events import Diagnosis, Event
from nanguard.record import EventLog, HistoryLog

EVIL_MODULE = "<script>alert(1)</script>"
NAN_STEP, CLIP_STEP, SPIKE_STEP, DIVERGENCE_STEP, STEPS = 120, 200, 300, 340, 400


def _events(evil: bool) -> list[Event]:
    attn = EVIL_MODULE if evil else "blocks.3.attn"
    return [
        Event(
            step=NAN_STEP, trigger="nonfinite_loss", action="skip", loss=float("nan"), grad_norm=float("nan"), lr=3e-4,
            diagnosis=Diagnosis(
                cause="forward_overflow", phase="forward", module=attn, op="aten::_softmax", reproducible=True,
                confidence=0.9,
                evidence=[f"first inf born in {attn} (aten::matmul, float16): |x| max 7.1e+04 > 65504",
                          "the same step in float32 is finite (loss 2.91)", "batch inputs finite"],
                fixes=["compute attention scores in float32 (upcast q·k before softmax)",
                       "use bfloat16 instead of float16 autocast"],
            ),
            details={"module_stats": [
                {"module": "embed", "dtype": "torch.float16", "act_absmax": 3.2, "grad_absmax": 0.01, "nonfinite": False},
                {"module": "blocks.3.mlp", "dtype": "float16", "act_absmax": 812.0, "grad_absmax": None, "nonfinite": False},
                {"module": attn, "dtype": "float16", "act_absmax": None, "grad_absmax": None, "nonfinite": True},
                {"module": "head", "dtype": "float32", "act_absmax": 44.0, "grad_absmax": 2.5, "nonfinite": False},
            ], "replay_seconds": 0.4},
        ),
        Event(
            step=SPIKE_STEP, trigger="loss_spike", action="rollback", loss=8.7e15, grad_norm=3.1e9, lr=3e-4,
            diagnosis=Diagnosis(
                cause="input_extreme_scale", phase="data", tensor="x[3]" if not evil else "<b>x</b>",
                reproducible=True, confidence=0.8,
                evidence=["batch field 'x' max |value| 4.2e+12, 1e9x the running scale", "all values finite"],
                fixes=["run `nanguard scan` on the data and fix or drop the badly scaled file",
                       "normalise inputs per file"],
            ),
        ),
        Event(
            step=DIVERGENCE_STEP, trigger="divergence", action="lr_backoff", loss=3.9, grad_norm=1.7, lr=1.5e-4,
            diagnosis=Diagnosis(cause="divergence", phase="optimizer", confidence=0.6,
                                evidence=["loss rose 3.1x over 200 steps"],
                                fixes=["lower the learning rate", "add warmup"]),
        ),
    ]


def _history_rows() -> list[dict[str, Any]]:
    rng = random.Random(0)
    rows, skipped, rollbacks, clipped, multiplier = [], 0, 0, 0, 1.0
    for step in range(STEPS):
        loss = 4.0 * math.exp(-step / 150) + 1.5 + 0.05 * rng.random()
        grad = 1.0 + 0.2 * rng.random()
        action, trigger = "none", ""
        if step == NAN_STEP:
            loss, grad, action, trigger = float("nan"), float("nan"), "skip", "nonfinite_loss"
            skipped += 1
        elif step == CLIP_STEP:
            grad, action, trigger = 9.0, "clip", "grad_spike"
            clipped += 1
        elif step == SPIKE_STEP:
            loss, grad, action, trigger = 8.7e15, 3.1e9, "rollback", "loss_spike"
            rollbacks += 1
        elif step == DIVERGENCE_STEP:
            action, trigger, multiplier = "lr_backoff", "divergence", 0.5
        rows.append({"step": step, "time": 0.1 * step, "loss": loss, "grad_norm": grad, "lr": 3e-4 * multiplier,
                     "lr_multiplier": multiplier, "loss_scale": 65536.0, "action": action, "trigger": trigger,
                     "skipped_total": skipped, "rollbacks_total": rollbacks, "clipped_total": clipped})
    return rows


def write_run(run_dir: Path, *, evil: bool = False, summary: bool = True, history: bool = True,
              events: bool = True) -> Path:
    """A 400-step run: NaN loss (skip), a clip, a loss spike (rollback), divergence (LR backoff)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    event_list = _events(evil)
    if events:
        log = EventLog(run_dir / "events.jsonl")
        for event in event_list:
            log.on_event(event.to_dict())
        log.close()
    if history:
        hist = HistoryLog(run_dir / "history.csv")
        for row in _history_rows():
            hist.on_step(row)
        hist.close()
    if summary:
        (run_dir / "summary.json").write_text(json.dumps({
            "steps": STEPS, "events": len(event_list), "skipped_total": 1, "rollbacks_total": 1,
            "wall_time_s": 812.5, "command": "nanguard run train.py --lr 3e-4",
            "config": {"policy": "default", "clip_grad_norm": 1.0},
        }))
    return run_dir


def write_rollback_run(run_dir: Path, *, history: bool = True) -> Path:
    """50 steps; rollbacks at 20 and 35 each halve the LR multiplier, which recovers slowly in between.

    The event at step 10 is a skip whose culprit is the root module (name ``''``).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    multipliers, value = [], 1.0
    for step in range(50):
        value = value * 0.5 if step in (20, 35) else min(1.0, value * 1.01)
        multipliers.append(value)
    actions = {10: ("skip", "nonfinite_loss"), 20: ("rollback", "loss_spike"), 35: ("rollback", "nonfinite_loss")}
    log = EventLog(run_dir / "events.jsonl")
    for step, (action, trigger) in actions.items():
        diagnosis = Diagnosis(cause="input_nonfinite", phase="data", module="", tensor="loss_mask",
                              fixes=["Drop the rows: batch field `loss_mask` holds NaN (rows [1])."]) \
            if step == 10 else Diagnosis(cause="unknown", phase="unknown")
        log.on_event(Event(step=step, trigger=trigger, action=action, loss=float("nan"), diagnosis=diagnosis,
                           details={"lr_multiplier": multipliers[step]}).to_dict())
    log.close()
    if history:
        hist = HistoryLog(run_dir / "history.csv")
        for step, multiplier in enumerate(multipliers):
            action, trigger = actions.get(step, ("none", ""))
            hist.on_step({"step": step, "loss": 2.0 - step / 100, "grad_norm": 1.0, "lr": 1e-3 * multiplier,
                          "lr_multiplier": multiplier, "action": action, "trigger": trigger})
        hist.close()
    return run_dir


def read_event_dicts(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return write_run(tmp_path / "run")


@pytest.fixture
def evil_run_dir(tmp_path: Path) -> Path:
    """Module and tensor names that are HTML: the report must show them, not run them."""
    return write_run(tmp_path / "evil", evil=True)


@pytest.fixture
def make_run():
    return write_run


@pytest.fixture
def rollback_run_dir(tmp_path: Path) -> Path:
    return write_rollback_run(tmp_path / "rollbacks")


@pytest.fixture
def facts() -> dict[str, Any]:
    """The fixture run's known facts, for assertions."""
    return {"nan_step": NAN_STEP, "clip_step": CLIP_STEP, "spike_step": SPIKE_STEP,
            "divergence_step": DIVERGENCE_STEP, "steps": STEPS, "evil_module": EVIL_MODULE}
