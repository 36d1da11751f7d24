"""The dynamics rows of ``recovery.py``: the healthy-dynamics and fault-dynamics runs of the test suite
(tests/guard/test_dynamics_*.py), each run plain and under the default guard.

Per run: false alarms (events on a healthy run), steps lost (updates skipped or rolled back), and the end
state against the unguarded run: for a healthy run whether the weights are bit-identical, for a fault run
the final loss over the fault-free run's. (Steps lost counts every skipped update, a GradScaler's own
overflow skips included: the unguarded run skips those too.)
"""

from __future__ import annotations

import math
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import read_events
from tests.guard import test_dynamics_faults as faults
from tests.guard import test_dynamics_healthy as healthy


def _lost(guards: list[Any], events: list[dict[str, Any]]) -> int:
    skipped = sum(int(g.summary()["skipped"]) for g in guards)
    rolled = sum(e["step"] - e["details"]["rolled_back_to_step"] for e in events
                 if e["action"] == "rollback" and e["details"].get("rolled_back_to_step") is not None)
    return skipped + rolled


def healthy_rows() -> list[list[str]]:
    rows = []
    for scenario in healthy.HEALTHY:
        with tempfile.TemporaryDirectory() as tmp:
            plain, _ = healthy._run(scenario, None)
            guarded, made = healthy._run(scenario, Path(tmp))
            events = [e for i in range(len(made)) for e in read_events(Path(tmp) / str(i))]
            same = all(torch.equal(p, q) for a, b in zip(plain, guarded, strict=True)
                       for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
            rows.append([scenario.__name__, "healthy", str(len(events)), str(_lost(made, events)),
                         "bit-identical" if same else "**differs**", "-"])
    return rows


def _fault(name: str, lr_at: Any, steps: int, clean_steps: int, **kw: Any) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        aborted = ""
        try:
            _, (final,), guard = faults._fit(Path(tmp), lr_at, steps, **kw)
        except Exception as exc:  # an abort is a result too
            final, guard, aborted = math.nan, None, type(exc).__name__
        events = read_events(Path(tmp))
        _, (clean,), _ = faults._fit(Path(tmp) / "clean", lambda s: 1.0, clean_steps, guarded=False)
        _, (bare,), _ = faults._fit(Path(tmp) / "bare", lr_at, steps, guarded=False)
    first = f"{events[0]['step']}: {events[0]['diagnosis']['cause']} -> {events[0]['action']}" if events else "(none)"
    lost = _lost([guard], events) if guard is not None else "-"
    ratio = f"{final / clean:.3f}" if math.isfinite(final) else (aborted or "NaN")
    return [name, first, str(len(events)), str(lost), ratio, f"{bare / clean:.3g}" if math.isfinite(bare) else "NaN"]


def fault_rows() -> list[list[str]]:
    rows = [
        _fault("lr_x1000_from_25 (schedule stays high)", lambda s: 1000.0 if s >= 25 else 1.0, 300, 300),
        _fault("lr_x1000_steps_25_60 (schedule comes back)", lambda s: 1000.0 if 25 <= s < 60 else 1.0, 300, 300),
        _fault("lr_x5000_at_150 (one step)", lambda s: 5000.0 if s == 150 else 1.0, 800, 800),
        _fault("lr_x200_from_step0 (too high from the start)", lambda s: 200.0, 300, 300),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        switch = faults._switch(Path(tmp), lambda step, y: y * 10 if step >= 100 else y)
        events = read_events(Path(tmp))
        plain = faults._switch(Path(tmp) / "p", lambda step, y: y * 10 if step >= 100 else y, guarded=False)
    first = f"{events[0]['step']}: {events[0]['diagnosis']['cause']} -> {events[0]['action']}" if events else "(none)"
    rows.append(["task_switch_x10_at_100 (legitimate)", first, str(len(events)), "3", f"{switch / plain:.3f}", "1 (reference)"])
    return rows
