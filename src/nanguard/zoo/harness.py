"""Running zoo scenarios the ways users run training: plain, under ``nanguard.Guard``, under ``nanguard run``.

Shared by the zoo tests and the accuracy and recovery benchmarks, so all three judge the same runs
the same way.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nanguard.zoo import EXPECTED_FIELDS, Scenario

Attach = Callable[..., Any]


@dataclass
class RunResult:
    """What one run of a scenario produced."""

    mode: str
    final_loss: float | None
    events: list[dict[str, Any]]
    seconds: float
    weights_finite: bool | None = None
    error: str | None = None
    returncode: int | None = None
    out_dir: Path | None = None
    history: list[dict[str, str]] = field(default_factory=list)

    @property
    def first_event(self) -> dict[str, Any] | None:
        return self.events[0] if self.events else None


def read_events(out_dir: Path) -> list[dict[str, Any]]:
    path = Path(out_dir) / "events.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_history(out_dir: Path) -> list[dict[str, str]]:
    import csv

    path = Path(out_dir) / "history.csv"
    if not path.exists():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def guard_attach(out_dir: Path, **config: Any) -> tuple[Attach, list[Any]]:
    """An ``attach`` that puts a ``nanguard.Guard`` on the scenario's model and optimizer.

    Returns the attach and a list that receives the guard(s), so callers can inspect the weights.
    """
    from nanguard.guard import Guard

    guards: list[Any] = []

    def attach(model: torch.nn.Module, optimizer: torch.optim.Optimizer, **kwargs: Any) -> Any:
        guard = Guard(model, optimizer, out_dir=out_dir, console=False, report=False, **config, **kwargs)
        guards.append(guard)
        return guard

    return attach, guards


def weights_finite(guards: list[Any]) -> bool | None:
    if not guards:
        return None
    """Parameters *and* floating buffers (BatchNorm running statistics are model state too)."""
    tensors = [p for g in guards for group in g.optimizer.param_groups for p in group["params"]]
    tensors += [b for g in guards for m in g.models for b in m.buffers() if b.is_floating_point()]
    return all(bool(torch.isfinite(t.detach()).all()) for t in tensors)


def run_api(scenario: Scenario, out_dir: Path, *, fault: bool = True, steps: int | None = None, **config: Any) -> RunResult:
    """Run the scenario in-process under ``nanguard.Guard``; an exception from the script is recorded, not raised."""
    attach, guards = guard_attach(out_dir, **config)
    started = time.perf_counter()
    final: float | None = None
    error = None
    try:
        final = scenario.main(attach=attach, steps=steps, fault=fault)
    except Exception as exc:  # a crashing scenario (label out of range on CPU) is a result too
        error = f"{type(exc).__name__}: {exc}"
        for guard in guards[:1]:
            guard.record_crash(exc)  # what `with nanguard.Guard(...)` does for a step that raises
        for guard in guards:
            guard.close(status="error")
    seconds = time.perf_counter() - started
    return RunResult("api", final, read_events(out_dir), seconds, weights_finite(guards), error,
                     out_dir=out_dir, history=read_history(out_dir))


def run_zero_code(scenario: Scenario, out_dir: Path, *, policy: str = "safe", report: bool = False) -> RunResult:
    """Run the scenario's file unmodified through the ``nanguard run`` runner, in this process.

    The same code path as the command line, without a new interpreter: the runner installs its patches,
    runs the script as ``__main__`` and takes every patch out again (the zoo tests check that it did).
    The HTML report is left out unless asked for (``report=True``): it is not what a zoo run judges.
    """
    from nanguard.config import resolve_config
    from nanguard.zero_code import run_script

    config = resolve_config(policy, out_dir=str(out_dir), console=False, report=report)
    started = time.perf_counter()
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        returncode = run_script(scenario.path, [], config)
    seconds = time.perf_counter() - started
    error = stderr.getvalue()[-2000:] if returncode else None
    return RunResult("zero-code", None, read_events(out_dir), seconds, None, error, returncode=returncode,
                     out_dir=out_dir, history=read_history(out_dir))


def run_cli(scenario: Scenario, out_dir: Path, *, timeout: float = 300) -> RunResult:
    """Run the scenario's file unmodified through ``python -m nanguard run`` in a subprocess."""
    command = [sys.executable, "-m", "nanguard", "run", "--out", str(out_dir), "--quiet", str(scenario.path)]
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=out_dir.parent)
    seconds = time.perf_counter() - started
    error = proc.stderr[-2000:] if proc.returncode else None
    return RunResult("cli", None, read_events(out_dir), seconds, None, error, returncode=proc.returncode,
                     out_dir=out_dir, history=read_history(out_dir))


def compare(expected: dict[str, Any], event: dict[str, Any] | None) -> dict[str, tuple[Any, Any, bool | None]]:
    """Per expected field: (expected, got, match); match is None where the scenario does not check it."""
    diagnosis = (event or {}).get("diagnosis", {})
    out: dict[str, tuple[Any, Any, bool | None]] = {}
    for name in EXPECTED_FIELDS:
        want = expected.get(name)
        got = None if event is None else (event.get(name) if name in ("step", "trigger") else diagnosis.get(name))
        out[name] = (want, got, None if want is None else want == got)
    return out


def mismatches(expected: dict[str, Any], event: dict[str, Any] | None) -> list[str]:
    """Readable differences between the expected first event and the one written (empty: all match)."""
    if event is None:
        return ["no event was written"]
    return [f"{name}: expected {want!r}, got {got!r}" for name, (want, got, ok) in compare(expected, event).items() if ok is False]


def is_finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)
