"""What does the stall watch (issue 15) cost at its default interval? Two guards side by side, in one run.

Run::

    python benchmarks/stall_cost.py                 # overhead.py's small transformer on the CPU (~2 min on 2 cores)
    python benchmarks/stall_cost.py --quick         # a few steps: checks the script works, numbers mean nothing

Two copies of the same model (same weights, same batches), each with its own AdamW and its own guard: one with
the stall watch at its default interval (``stall_every=50``), one with it off (``stall_every=0``). Blocks of
one interval of steps alternate between them (the order rotates each round); the whole-step ratio is the
median over rounds. That ratio is noisy on a shared machine, so the watch's own work is also timed where it
happens: the host time of its per-step check (``on_step``: learning rates, pending read-backs) and of one
sample (``before_update`` + ``after_update``: the strided copies, the comparison and the reduction, read at
once on a CPU), amortised over the interval and divided by the median step time. Prints Markdown; asserts
nothing about speed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common
import overhead


def _instrument(stall: Any, on_step: list[float], sample: list[float]) -> None:
    """Time the watch's per-step check, and its two halves of a sample on the steps that take one."""
    plain_on_step, before, after = stall.on_step, stall.before_update, stall.after_update
    pending = [0.0]

    def timed_on_step(*args: Any, **kwargs: Any) -> None:
        started = time.perf_counter()
        plain_on_step(*args, **kwargs)
        on_step.append(time.perf_counter() - started)

    def timed_before(step: int) -> Any:
        started = time.perf_counter()
        probe = before(step)
        pending[0] = time.perf_counter() - started
        return probe

    def timed_after(probe: Any, **kwargs: Any) -> None:
        started = time.perf_counter()
        after(probe, **kwargs)
        if probe is not None:
            sample.append(pending[0] + time.perf_counter() - started)

    stall.on_step, stall.before_update, stall.after_update = timed_on_step, timed_before, timed_after


def _guarded(settings: Any, base: torch.nn.Module, out: Path, every: int, kind: str) -> overhead.Run:
    import copy

    import nanguard
    from nanguard.step.losses import BOOK

    model = copy.deepcopy(base)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.1, fused=kind == "fused")
    run = overhead.Run(f"stall_every={every}", kind, model, optimizer, overhead.plain_step, settings)
    run.guard = nanguard.Guard(model, optimizer, console=False, report=False, out_dir=out / f"{every}-{kind}",
                               stall_every=every)
    BOOK.unregister(run.guard.pipeline)  # silent outside its own blocks (overhead.listening)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = overhead.make_settings(overhead.parse_args(["--shape", "small"] + (["--quick"] if args.quick else [])))
    every = 5 if args.quick else 50  # --quick: a sample in every block, so every part runs
    rounds = 2 if args.quick else args.rounds
    block = 5 if args.quick else every
    base = overhead.build_model(settings)
    batches = overhead.make_batches(settings)
    kinds = ("fused", "plain")
    with tempfile.TemporaryDirectory() as tmp:
        runs = {(e, k): _guarded(settings, base, Path(tmp), e, k) for e in (every, 0) for k in kinds}
        on_step: list[float] = []
        sample: list[float] = []
        for (e, _), run in runs.items():
            overhead.run_steps(run, batches, 3 if args.quick else 20)  # warm-up (optimizer state, first sample)
            if e:
                _instrument(run.guard.pipeline.stall, on_step, sample)
        order = list(runs)
        for r in range(rounds):
            for key in order[r % len(order):] + order[:r % len(order)]:
                runs[key].block_seconds.append(overhead.time_block(runs[key], batches, block))
        rows = []
        for kind in kinds:
            on, off = runs[(every, kind)], runs[(0, kind)]
            ratio = _common.median([a / b for a, b in zip(on.block_seconds, off.block_seconds, strict=True)])
            step = _common.median(off.block_seconds)
            rows.append([kind, f"{1000 * step:.2f} ms", f"{ratio:.4f}"])
        per_step = _common.median(on_step)
        per_sample = _common.median(sample)
        step = _common.median([b for (e, _), run in runs.items() if not e for b in run.block_seconds])
        for run in runs.values():
            run.close()
    print(_common.describe_machine(_common.machine_info()))
    print()
    print(_common.markdown_table(["AdamW", "step (stall watch off)", "step ratio on/off (median)"], rows))
    print()
    amortised = (per_step + per_sample / every) / step
    print(_common.markdown_table(
        ["per-step check (host)", "one sample (host, CPU: includes the read-back)", "median step",
         f"amortised at stall_every={every}"],
        [[f"{1e6 * per_step:.1f} us", f"{1e3 * per_sample:.3f} ms ({len(sample)} samples)", f"{1e3 * step:.2f} ms",
          f"{100 * amortised:.3f}% of a step"]]))


if __name__ == "__main__":
    main()
