"""Realistic run directories for the report tests, written the way the guard writes them.

A fixture run has 400 steps: a NaN loss at step 120 (skipped, diagnosed as a float16 overflow with
per-module magnitudes in the forensics contract: forward/backward counts and each module's role),
a clipped gradient spike at 200 (history only), a loss spike of 8.7e15 at 300 (rolled back) and a
divergence at 340 (LR backed off to 0.5x).

A *repeated* run (:func:`write_repeated_run`) is what real runs look like: 30 events, most of them
the same ``aten::log`` problem again and again (their fixes differ only in a count), a few NaN
batches, a rollback, and LR cuts close together (→0.25, →0.13, →0.063).
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import pytest

from nanguard.events import Diagnosis, Event
from nanguard.records import EventLog, HistoryLog

EVIL_MODULE = "<script>alert(1)</script>"
NAN_STEP, CLIP_STEP, SPIKE_STEP, DIVERGENCE_STEP, STEPS = 120, 200, 300, 340, 400


def module_stat(module: str, dtype: str | None, act: float | None, grad: float | None, *, forward: int = 0,
                backward: int = 0, role: str = "clean") -> dict[str, Any]:
    """One ``details.module_stats`` entry in the forensics contract."""
    return {"module": module, "dtype": dtype, "dtype_max": 65504.0 if dtype and "16" in dtype else 3.4028234663852886e38,
            "act_absmax": act, "grad_absmax": grad, "forward_nonfinite": forward, "backward_nonfinite": backward,
            "role": role}


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
                module_stat("embed", "torch.float16", 3.2, 0.01, backward=2, role="upstream"),
                module_stat("blocks.3.mlp", "float16", 812.0, None, role="upstream"),
                module_stat(attn, "float16", None, None, forward=1, backward=3, role="birth"),
                module_stat("head", "float32", 44.0, 2.5, forward=2, backward=1, role="downstream"),
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


REPEAT_FIRST, REPEAT_EVERY, REPEAT_COUNT = 20, 3, 24
NAN_BATCH_STEPS = (31, 64, 97)
REPEAT_ROLLBACK_STEP = 110
CUT_STEPS = {110: 0.25, 113: 0.125, 116: 0.0625}


def _log_event(step: int, action: str, zeros: int, first: int | None) -> dict[str, Any]:
    """A handwritten-BCE ``log(0)``: the same problem each time, its numbers (zero counts) differing."""
    diagnosis: dict[str, Any] = {
        "cause": "invalid_math_domain", "phase": "loss", "module": "0", "op": "aten::log", "tensor": None,
        "reproducible": True, "confidence": 0.9,
        "evidence": [f"aten::log received {zeros} zeros in `0`", "the batch is finite"],
        "fixes": [f"clamp the probabilities before `torch.log` ({zeros} zeros at this step)",
                  "use `torch.nn.functional.binary_cross_entropy_with_logits`"],
    }
    if first is not None:
        diagnosis["same_as_step"] = first
    return {"step": step, "time": "2026-11-25T20:36:15+00:00", "rank": 0, "trigger": "nonfinite_loss",
            "action": action, "loss": None, "loss_repr": "nan", "grad_norm": None, "lr": 1e-3,
            "diagnosis": diagnosis,
            "details": {"module_stats": [module_stat("0", "float32", 3.0, None, role="upstream"),
                                         module_stat("1", "float32", 1.0, None, backward=2, role="clean")]}}


def repeated_events() -> list[dict[str, Any]]:
    events = []
    for k in range(REPEAT_COUNT):
        step = REPEAT_FIRST + REPEAT_EVERY * k
        if step in NAN_BATCH_STEPS:
            step += 1
        events.append(_log_event(step, "skip", zeros=3 + k, first=None if k == 0 else REPEAT_FIRST))
    for step in NAN_BATCH_STEPS:
        events.append({"step": step, "trigger": "nonfinite_loss", "action": "skip", "loss": None, "loss_repr": "nan",
                       "diagnosis": {"cause": "input_nonfinite", "phase": "data", "module": "", "tensor": "x",
                                     "evidence": ["batch field `x`: 1 NaN of 512 values (rows [4])"],
                                     "fixes": ["Drop or repair the sample(s) at the source: batch field `x` holds NaN."]}})
    for step in sorted(CUT_STEPS):
        events.append({"step": step, "trigger": "loss_spike", "action": "rollback", "loss": 40.0 + step,
                       "diagnosis": {"cause": "learning_rate_spike", "phase": "optimizer", "confidence": 0.7,
                                     "evidence": ["the update used lr 0.5, 100x the schedule's median"],
                                     "fixes": ["check the learning-rate schedule"],
                                     "contributing": [{"cause": "input_extreme_scale",
                                                       "evidence": ["batch field `x` max 1e6"]}]},
                       "details": {"lr_multiplier": CUT_STEPS[step]}})
    return sorted(events, key=lambda event: event["step"])


def write_repeated_run(run_dir: Path, steps: int = 130) -> Path:
    """30 events of 3 problems; 25 of them the same ``aten::log`` fault (see the module docstring)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    events = repeated_events()
    (run_dir / "events.jsonl").write_text("".join(json.dumps(event) + "\n" for event in events))
    by_step = {event["step"]: event for event in events}
    hist = HistoryLog(run_dir / "history.csv")
    skipped = rollbacks = 0
    multiplier = 1.0
    for step in range(steps):
        event = by_step.get(step)
        action = event["action"] if event else "none"
        skipped += action in ("skip", "rollback")
        rollbacks += action == "rollback"
        multiplier = CUT_STEPS.get(step, min(1.0, multiplier * 1.002))
        loss = math.nan if event and event["loss"] is None else 2.0 - step / 200
        hist.on_step({"step": step, "loss": loss, "grad_norm": 1.0, "lr": 1e-3 * multiplier,
                      "lr_multiplier": multiplier, "action": action, "trigger": event["trigger"] if event else "",
                      "skipped_total": skipped, "rollbacks_total": rollbacks, "clipped_total": 0})
    hist.close()
    (run_dir / "summary.json").write_text(json.dumps({"steps": steps, "skipped": skipped, "rollbacks": rollbacks,
                                                      "clipped": 0, "events": len(events), "status": "finished"}))
    return run_dir


def write_many_events_run(run_dir: Path, count: int, problems: int, *, stats: bool = True) -> Path:
    """``count`` events cycling over ``problems`` signatures (one module each), with history (and module stats)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    module_stats = [module_stat(f"layers.{i}", "float32", float(i + 1), 0.5, backward=1, role="downstream")
                    for i in range(12)] if stats else []
    lines = []
    for k in range(count):
        module = f"layers.{k % problems}"
        lines.append(json.dumps({"step": k, "trigger": "nonfinite_loss", "action": "skip", "loss": None,
                                 "loss_repr": "nan", "diagnosis": {
                                     "cause": "invalid_math_domain", "phase": "forward", "module": module,
                                     "op": "aten::log", "evidence": [f"aten::log got {k} zeros"],
                                     "fixes": [f"clamp before log in `{module}`"]},
                                 "details": {"module_stats": module_stats}}))
    (run_dir / "events.jsonl").write_text("\n".join(lines) + "\n")
    rows = ["step,loss,grad_norm,lr_multiplier,action,skipped_total"]
    rows += [f"{k},nan,nan,1.0,skip,{k + 1}" for k in range(count)]
    (run_dir / "history.csv").write_text("\n".join(rows) + "\n")
    return run_dir


@pytest.fixture
def repeated_run_dir(tmp_path: Path) -> Path:
    return write_repeated_run(tmp_path / "repeated")


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
