"""Time inside ``optimizer.step()``, this tree against another nanguard tree, side by side in one run.

``overhead.py --baseline PATH`` (PATH: the ``src`` folder of another checkout, e.g. main's) runs, for each
round, each optimizer kind and each tree (in alternating order), one worker process: it builds the model
twice (one copy guarded with the ``safe`` preset, one not), warms both up past the spike warm-up, then
times ``optimizer.step()`` alone, unguarded and guarded in turn, one call at a time. Each tree runs in its
own process (so each imports its own ``nanguard``), one guard per process, as a user runs it. The figure
is the median over rounds of each worker's median added time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def worker(kind: str, samples: int, warmup: int, shape_name: str) -> dict[str, Any]:
    """Run in the worker process: medians of the unguarded and the guarded ``optimizer.step()`` call."""
    import torch
    from overhead import SHAPES, Settings, build_model, make_batches, median

    import nanguard

    torch.set_num_threads(1)
    settings = Settings(shape_name, SHAPES[shape_name], "cpu", False, 1e-3, 1, 1, 1, warmup, 1, 1, samples, 1, 1, False)
    batches = make_batches(settings)
    runs = []
    with tempfile.TemporaryDirectory(prefix="nanguard-stepcall-") as out:
        for guarded in (False, True):
            model = build_model(settings)
            optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.1, fused=kind == "fused")
            guard = nanguard.Guard(model, optimizer, config="safe", console=False, report=False, out_dir=out) if guarded else None
            runs.append((model, optimizer, guard, []))

        def one(model: Any, optimizer: Any, index: int) -> float:
            optimizer.zero_grad(set_to_none=True)
            model(*batches[index % len(batches)]).backward()
            started = time.perf_counter()
            optimizer.step()
            return time.perf_counter() - started

        for index in range(warmup):
            for model, optimizer, _, _ in runs:
                one(model, optimizer, index)
        for index in range(samples):
            for model, optimizer, _, seconds in runs[index % 2:] + runs[:index % 2]:
                seconds.append(one(model, optimizer, index))
        for _, _, guard, _ in runs:
            if guard is not None:
                guard.close()
    plain, guarded_s = median(runs[0][3]), median(runs[1][3])
    return {"unguarded_ms": 1e3 * plain, "guarded_ms": 1e3 * guarded_s, "added_ms": 1e3 * (guarded_s - plain),
            "nanguard": str(Path(nanguard.__file__).resolve().parent)}


def _run_worker(tree: Path | None, kind: str, samples: int, warmup: int, shape_name: str) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(tree), str(HERE), env.get("PYTHONPATH", "")])
    else:
        env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent / "src"), str(HERE), env.get("PYTHONPATH", "")])
    code = (f"import json, _step_call; print(json.dumps(_step_call.worker({kind!r}, {samples}, {warmup}, "
            f"{shape_name!r})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=HERE, timeout=900)
    if proc.returncode:
        raise RuntimeError(f"step-call worker for {tree or 'this tree'} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(baseline: Path, kinds: tuple[str, ...], *, rounds: int, samples: int, warmup: int,
            shape_name: str, progress: Any = None) -> list[dict[str, Any]]:
    """Interleaved rounds of workers for the baseline tree and this tree; one row per (kind, tree)."""
    from overhead import median

    trees: list[tuple[str, Path | None]] = [("baseline", baseline), ("this tree", None)]
    added: dict[tuple[str, str], list[float]] = {}
    seen: dict[tuple[str, str], dict[str, Any]] = {}
    for round_index in range(rounds):
        order = trees if round_index % 2 == 0 else trees[::-1]
        for kind in kinds:
            for label, tree in order:
                if progress is not None:
                    progress(f"step-call round {round_index + 1}/{rounds}: {kind}, {label}")
                result = _run_worker(tree, kind, samples, warmup, shape_name)
                added.setdefault((kind, label), []).append(result["added_ms"])
                seen[(kind, label)] = result
    rows = []
    for kind in kinds:
        for label, _ in trees:
            values = added[(kind, label)]
            rows.append({"optimizer": kind, "tree": label, "path": seen[(kind, label)]["nanguard"],
                         "added_ms": median(values), "rounds": values,
                         "unguarded_ms": seen[(kind, label)]["unguarded_ms"]})
    return rows
