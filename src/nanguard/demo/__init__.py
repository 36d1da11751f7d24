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
import sys
from pathlib import Path

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
    from nanguard.demo.run import run_demo

    return run_demo(steps=steps, seed=args.seed, out_dir=out_dir, contrast=not args.no_contrast,
                    as_json=args.json, console=console)
