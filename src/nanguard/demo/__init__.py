"""``nanguard demo``: train a small transformer with injected faults, with and without the guard.

On a CPU, with nothing to download, in about a minute: a 2-layer transformer learns sums such as
``37+85=122`` character by character while four faults strike at known steps: an all-padding row
(an all-masked softmax row gives NaN), a NaN in the data, a learning-rate spike from a buggy
scheduler, and an inf written into a weight. The same seeded run goes to NaN without nanguard; with
it, each fault is caught, diagnosed (cause, module, operator, tensor, fix) and survived.

How to use nanguard in your own loop: read ``nanguard/demo/train.py``. The model is in ``model.py``,
the data in ``task.py``, the faults in ``faults.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from collections.abc import Iterator
from typing import TextIO

from nanguard.errors import UsageError

DEFAULT_OUT = "nanguard_demo"
DEFAULT_STEPS = 400
QUICK_STEPS = 100
MIN_STEPS = 80  # the LR spike must come after the guard's spike statistics warmed up (25 good steps)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                        help=f"run directory for events.jsonl, history.csv and report.html (default: {DEFAULT_OUT})")
    parser.add_argument("--steps", type=int, default=None, metavar="N",
                        help=f"training steps per run (default: {DEFAULT_STEPS}; {QUICK_STEPS} with --quick)")
    parser.add_argument("--quick", action="store_true", help=f"a shorter run ({QUICK_STEPS} steps), for tests")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model and the data (default: 0)")
    parser.add_argument("--no-contrast", action="store_true",
                        help="skip the run with the same faults and no guard (the one that goes to NaN)")
    parser.add_argument("--json", action="store_true",
                        help="print a machine-readable summary on stdout (the narrative goes to stderr)")


def main(args: argparse.Namespace) -> int:
    steps = args.steps if args.steps is not None else (QUICK_STEPS if args.quick else DEFAULT_STEPS)
    if steps < MIN_STEPS:
        raise UsageError(f"--steps {steps} is too few: the faults need a warmed-up run; use --steps {MIN_STEPS} or more")
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {out_dir} is a file; give a directory (it is created if missing)")
    console = sys.stderr if args.json else sys.stdout
    return run_demo(steps=steps, seed=args.seed, out_dir=out_dir, contrast=not args.no_contrast,
                    as_json=args.json, console=console)


def run_demo(*, steps: int, seed: int, out_dir: Path, contrast: bool, as_json: bool, console: TextIO) -> int:
    """Run the reference, the unguarded and the guarded run; print what happened. 0 if the guarded run ended finite."""
    started = time.perf_counter()
    with _one_thread():
        return _run(steps=steps, seed=seed, out_dir=out_dir, contrast=contrast, as_json=as_json, console=console,
                    started=started)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch on one thread, then restore the setting.

    The model is tiny: a second thread gains little, and on a busy machine (CI, a shared box) two
    spinning OpenMP threads can make each step ten times slower.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _run(*, steps: int, seed: int, out_dir: Path, contrast: bool, as_json: bool, console: TextIO, started: float) -> int:
    import math

    from nanguard.demo import summary
    from nanguard.demo.faults import FaultPlan
    from nanguard.demo.train import Settings, train

    def say(text: str = "") -> None:
        print(text, file=console, flush=True)

    settings = Settings(steps=steps, seed=seed)
    plan = FaultPlan.spread_over(steps)
    faults = plan.faults()
    say(f"nanguard demo: a 2-layer transformer learns sums like 37+85=122, one character at a time; "
        f"{steps} steps on the CPU, seed {seed}.")
    say(summary.faults_block(faults))
    say()

    total = 3 if contrast else 2
    say(f"[1/{total}] without nanguard, no faults (the reference) ...")
    reference = train(settings, FaultPlan.none())
    say(f"      {reference.seconds:.1f} s, final loss {summary.format_number(reference.eval_loss)}")
    unguarded = None
    if contrast:
        say(f"[2/{total}] without nanguard, with the faults ...")
        unguarded = train(settings, plan)
        say(f"      {unguarded.seconds:.1f} s; " + summary.unguarded_line(unguarded).removeprefix("without nanguard: "))
    say(f"[{total}/{total}] with nanguard, with the faults (live; events as they happen):")
    is_tty = bool(getattr(console, "isatty", lambda: False)())
    guarded = train(settings, plan, guard_dir=out_dir, console=console, progress_every=0 if is_tty else max(1, steps // 10))
    say()
    say(summary.diagnoses_block(guarded, faults))
    say()
    say(summary.comparison_block(guarded, unguarded, reference))

    report = out_dir / "report.html"
    if report.is_file():
        say(f"\nReport: {report}   (events: {out_dir / 'events.jsonl'}, history: {out_dir / 'history.csv'})")
    else:
        say(f"\nnanguard demo: the guard did not write {report} (see the warnings above)")
    seconds = time.perf_counter() - started
    if as_json:
        payload = summary.summary_json(steps=steps, seed=seed, faults=faults, guarded=guarded, unguarded=unguarded,
                                       reference=reference, out_dir=out_dir,
                                       report=report if report.is_file() else None, seconds=seconds)
        json.dump(payload, sys.stdout, indent=2, allow_nan=False)
        sys.stdout.write("\n")
    ends_finite = guarded.aborted is None and guarded.weights_finite and math.isfinite(guarded.eval_loss)
    return 0 if ends_finite and report.is_file() else 1
