"""The demo's three runs and what it prints about them (``nanguard demo`` calls :func:`run_demo`)."""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import torch

from nanguard.demo import summary
from nanguard.demo.faults import FaultPlan
from nanguard.demo.train import RunResult, Settings, train


def run_demo(*, steps: int, seed: int, out_dir: Path, contrast: bool, as_json: bool, console: TextIO) -> int:
    """Run the reference, the unguarded and the guarded run and tell the story on ``console``.

    Returns 0 when the guarded run ended finite (not stopped, weights and held-out loss finite) and
    wrote its report; 1 otherwise. With ``as_json`` the summary also goes to stdout as JSON.
    """
    started = time.perf_counter()
    with one_thread():
        settings = Settings(steps=steps, seed=seed)
        plan = FaultPlan.spread_over(steps)
        runs = _train_all(settings, plan, out_dir, contrast, console)
    guarded, unguarded, reference = runs
    faults = plan.faults()

    _say(console, "")
    _say(console, summary.diagnoses_block(guarded, faults))
    _say(console, "")
    _say(console, summary.comparison_block(guarded, unguarded, reference))
    if guarded.aborted:
        _say(console, f"  {guarded.aborted}")
    run_dir = guarded.run_dir or out_dir
    report = run_dir / "report.html"
    if report.is_file():
        _say(console, f"\nReport: {report}   (events: {run_dir / 'events.jsonl'}, history: {run_dir / 'history.csv'})")
    else:
        _say(console, f"\nnanguard demo: the guard did not write {report} (see the warnings above)")

    if as_json:
        payload = summary.summary_json((guarded, unguarded, reference), faults,
                                       setup={"steps": steps, "seed": seed, "out_dir": run_dir},
                                       report=report if report.is_file() else None,
                                       seconds=time.perf_counter() - started)
        json.dump(payload, sys.stdout, indent=2, allow_nan=False)
        sys.stdout.write("\n")
    ends_finite = guarded.aborted is None and guarded.weights_finite and math.isfinite(guarded.eval_loss)
    return 0 if ends_finite and report.is_file() else 1


def _say(console: TextIO, text: str) -> None:
    print(text, file=console, flush=True)


def _train_all(settings: Settings, plan: FaultPlan, out_dir: Path, contrast: bool,
               console: TextIO) -> tuple[RunResult, RunResult | None, RunResult]:
    """The reference and the contrast run first and quietly, then the guarded one live."""
    _say(console, f"nanguard demo: a 2-layer transformer learns sums like 37+85=122, one character at a time; "
                  f"{settings.steps} steps on the CPU, seed {settings.seed}.")
    _say(console, summary.faults_block(plan.faults()) + "\n")
    total = 3 if contrast else 2
    _say(console, f"[1/{total}] without nanguard, no faults (the reference) ...")
    reference = train(settings, FaultPlan.none())
    _say(console, f"      {reference.seconds:.1f} s, final loss {summary.format_number(reference.eval_loss)}")
    unguarded = None
    if contrast:
        _say(console, f"[2/{total}] without nanguard, with the faults ...")
        unguarded = train(settings, plan)
        outcome = summary.unguarded_line(unguarded).removeprefix("without nanguard: ")
        _say(console, f"      {unguarded.seconds:.1f} s; {outcome}")
    _say(console, f"[{total}/{total}] with nanguard, with the faults (live; events as they happen):")
    # On a terminal the guard's console redraws one status line; in a log, a plain line every 10% of the run.
    on_terminal = bool(getattr(console, "isatty", lambda: False)())
    guarded = train(settings, plan, guard_dir=out_dir, console=console,
                    progress_every=0 if on_terminal else max(1, settings.steps // 10))
    return guarded, unguarded, reference


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread, then restore the setting.

    The model is tiny: a second thread gains little, and on a busy machine (CI, a shared box) two
    spinning OpenMP threads can make each step ten times slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
