"""What does guarding every step cost? nanguard next to the checks people write today, in one run.

Run::

    python benchmarks/overhead.py --shape small            # a tiny transformer on the CPU (< 1 min on 2 cores)
    python benchmarks/overhead.py --shape gpt2 --json out.json   # GPT-2-small shape, bf16 autocast, on a GPU
    python benchmarks/overhead.py --quick --shape small    # a few steps: checks the script works, numbers mean nothing

Every variant trains its own copy of the same model (same initial weights, same batches) with its own
AdamW, fused and not fused. The variants are timed side by side: after a warm-up, rounds of timed blocks
visit every variant in a rotating order, so slow drifts of the machine (clocks, other load) hit all of
them alike. A variant's ratio is the median over rounds of its block time over the unguarded block time
of the same round and optimizer. On a GPU every block is bracketed by ``torch.cuda.synchronize()``.

Variants:

* ``unguarded`` -- the plain loop.
* ``nanguard safe (default)``, ``nanguard fast``, ``nanguard forensic`` -- ``Guard(model, opt, config=PRESET)``
  with ``console=False, report=False`` and a temporary ``out_dir``; the loop is unchanged.
* ``seed checks`` -- what training scripts do today: ``if torch.isnan(loss) or torch.isinf(loss)`` (a host
  sync), a per-parameter ``torch.isnan(p.grad).any()`` loop (a sync per parameter), ``clip_grad_norm_(.., 1.0)``.
* ``detect_anomaly`` -- ``torch.autograd.detect_anomaly()`` around forward and backward.
* ``DebugUnderflowOverflow`` -- ``transformers.debug_utils.DebugUnderflowOverflow(model)`` (if installed).

With ``--baseline PATH`` (the ``src`` folder of another nanguard checkout, e.g. main's) the time inside
``optimizer.step()`` is also measured for both trees side by side, in interleaved worker processes
(``_step_call.py``), and the report gains a before/after table.

Also measured: peak memory per variant (CUDA ``max_memory_allocated`` on a GPU; on a CPU the peak RSS growth
of a forked child that builds and trains one variant alone), the time inside ``optimizer.step()`` alone
(where the guard does its work, resolved far below whole-step noise), the cost of one rollback snapshot
(``guard.rollback.take()``) amortised over each preset's ``snapshot_every``, and the time one forensic
replay adds to the step where a NaN appears. Prints Markdown; ``--json PATH`` also writes the numbers.
This script asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import gc
import json
import os
import shlex
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import describe_machine, load_average, machine_info, markdown_table, median
from _step_call import compare as compare_step_calls

UNGUARDED = "unguarded"
GUARD_PRESETS = {"nanguard safe (default)": "safe", "nanguard fast": "fast", "nanguard forensic": "forensic"}
SEED_CHECKS = "seed checks"
ANOMALY = "detect_anomaly"
DEBUG_UO = "DebugUnderflowOverflow"
VARIANTS = (UNGUARDED, *GUARD_PRESETS, SEED_CHECKS, ANOMALY, DEBUG_UO)
OPTIMIZERS = {"fused": "AdamW fused", "plain": "AdamW not fused"}

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
_STARTED = time.perf_counter()


def progress(message: str) -> None:
    """Progress goes to stderr, so stdout stays the Markdown report."""
    print(f"[{time.perf_counter() - _STARTED:6.1f}s] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- model
@dataclass(frozen=True)
class Shape:
    layers: int
    width: int
    heads: int
    vocab: int
    seq: int
    batch: int


SHAPES = {
    "small": Shape(layers=2, width=128, heads=4, vocab=1024, seq=64, batch=8),
    "gpt2": Shape(layers=12, width=768, heads=12, vocab=50257, seq=1024, batch=8),
}
# --quick: the smallest model every part of the script still runs on.
QUICK_SHAPE = Shape(layers=1, width=32, heads=2, vocab=128, seq=16, batch=4)
# Runs every code path once before the forked memory children, so they do not count one-time initialisation.
WARMUP_SHAPE = Shape(layers=1, width=16, heads=2, vocab=32, seq=8, batch=2)
# GPT-2 width and depth, but a sequence and batch a CPU can step through in seconds, in fp32 (--allow-cpu):
# bf16 autocast on a CPU without bf16 units is emulated, and would measure the emulation.
GPT2_ON_CPU = {"seq": 128, "batch": 1}


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(width, 3 * width)
        self.c_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(approximate="tanh"), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """A GPT-2-style decoder in plain PyTorch that returns its own loss, as Hugging Face models do.

    ``loss_weights`` (1 = count the token, 0 = padding) is a float input of the batch: it is where the
    forensic-replay measurement puts its NaN, as a corrupt mask would in real data.
    """

    def __init__(self, shape: Shape) -> None:
        super().__init__()
        self.wte = nn.Embedding(shape.vocab, shape.width)
        self.wpe = nn.Embedding(shape.seq, shape.width)
        self.h = nn.ModuleList(Block(shape.width, shape.heads) for _ in range(shape.layers))
        self.ln_f = nn.LayerNorm(shape.width)
        self.lm_head = nn.Linear(shape.width, shape.vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor, loss_weights: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.wte(input_ids) + self.wpe(positions)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        weights = loss_weights.reshape(-1)
        return (per_token * weights).sum() / weights.sum()


# ---------------------------------------------------------------------------------------------- settings
@dataclass
class Settings:
    shape_name: str
    shape: Shape
    device: str
    bf16: bool
    lr: float
    rounds: int
    block: int
    warmup: int
    guard_warmup: int
    memory_steps: int
    snapshot_repeats: int
    step_call_samples: int
    replay_faults: int
    replay_normal_steps: int
    quick: bool
    optimizers: tuple[str, ...] = tuple(OPTIMIZERS)
    seed: int = 0

    def autocast(self) -> Any:
        return torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.bf16)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def build_model(settings: Settings) -> GPT:
    torch.manual_seed(settings.seed)
    return GPT(settings.shape).to(settings.device)


def make_batches(settings: Settings, count: int = 8) -> list[Batch]:
    """Random tokens with a padded tail of random length per row (weight 0), already on the device."""
    shape = settings.shape
    gen = torch.Generator().manual_seed(settings.seed + 1)
    batches = []
    for _ in range(count):
        ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq + 1), generator=gen)
        weights = torch.ones(shape.batch, shape.seq)
        for row, pad in enumerate(torch.randint(0, shape.seq // 4 + 1, (shape.batch,), generator=gen).tolist()):
            if pad:
                weights[row, -pad:] = 0.0
        batches.append((ids[:, :-1].contiguous().to(settings.device), ids[:, 1:].contiguous().to(settings.device),
                        weights.to(settings.device)))
    return batches


# ---------------------------------------------------------------------------------------------- variants
@dataclass
class Run:
    """One variant with one optimizer kind: its own model copy, optimizer and instrument."""

    variant: str
    optimizer_kind: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    train_step: Callable[[Run, Batch], None]
    settings: Settings
    guard: Any = None
    keepalive: Any = None
    steps_done: int = 0
    block_seconds: list[float] = field(default_factory=list)

    def next_batch(self, batches: list[Batch]) -> Batch:
        batch = batches[self.steps_done % len(batches)]
        self.steps_done += 1
        return batch

    def close(self) -> None:
        if self.guard is not None:
            with listening(self.guard):
                self.guard.close()


def plain_step(run: Run, batch: Batch) -> None:
    run.optimizer.zero_grad(set_to_none=True)
    with run.settings.autocast():
        loss = run.model(*batch)
    loss.backward()
    run.optimizer.step()


def seed_checks_step(run: Run, batch: Batch) -> None:
    """The checks the seed documents show: each ``if`` on a tensor is a host synchronisation."""
    run.optimizer.zero_grad(set_to_none=True)
    with run.settings.autocast():
        loss = run.model(*batch)
    if torch.isnan(loss) or torch.isinf(loss):
        return
    loss.backward()
    for p in run.model.parameters():
        if p.grad is not None and torch.isnan(p.grad).any():
            run.optimizer.zero_grad(set_to_none=True)
            return
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), 1.0)
    run.optimizer.step()


def anomaly_step(run: Run, batch: Batch) -> None:
    run.optimizer.zero_grad(set_to_none=True)
    with torch.autograd.detect_anomaly():
        with run.settings.autocast():
            loss = run.model(*batch)
        loss.backward()
    run.optimizer.step()


def transformers_available() -> bool:
    try:
        import transformers.debug_utils  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def listening(guard: Any) -> Iterator[None]:
    """Let only ``guard`` hear ``backward()`` calls while its variant runs.

    Guards of the other variants live in this process too; each would have to walk every ``backward()``'s
    graph to tell its own losses from theirs, which no run with one guard pays. A user runs one guard per
    training loop; this puts each guard back in that situation for its own blocks only.
    """
    if guard is None:
        yield
        return
    from nanguard.step.losses import BOOK

    BOOK.register(guard.pipeline, guard.subjects.params())
    try:
        yield
    finally:
        BOOK.unregister(guard.pipeline)


def build_run(variant: str, optimizer_kind: str, settings: Settings, out_root: Path, model: nn.Module | None = None) -> Run:
    model = model if model is not None else build_model(settings)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.1, fused=optimizer_kind == "fused")
    run = Run(variant, optimizer_kind, model, optimizer, plain_step, settings)
    if variant in GUARD_PRESETS:
        import nanguard

        out_dir = out_root / f"{GUARD_PRESETS[variant]}-{optimizer_kind}"
        run.guard = nanguard.Guard(model, optimizer, config=GUARD_PRESETS[variant], console=False, report=False, out_dir=out_dir)
        from nanguard.step.losses import BOOK

        BOOK.unregister(run.guard.pipeline)  # silent until its own blocks (see listening())
    elif variant == SEED_CHECKS:
        run.train_step = seed_checks_step
    elif variant == ANOMALY:
        run.train_step = anomaly_step
    elif variant == DEBUG_UO:
        from transformers.debug_utils import DebugUnderflowOverflow

        run.keepalive = DebugUnderflowOverflow(model)
    elif variant != UNGUARDED:
        raise ValueError(f"unknown variant {variant!r}")
    return run


def run_steps(run: Run, batches: list[Batch], steps: int) -> None:
    with listening(run.guard):
        for _ in range(steps):
            run.train_step(run, run.next_batch(batches))


def train_for_memory(run: Run, settings: Settings, steps: int) -> None:
    """Two steps (the optimizer state exists after the first), a full snapshot ring, then ``steps`` more: the
    peak then holds the ring and a step's activations at once, as in a long run."""
    batches = make_batches(settings)
    run_steps(run, batches, 2)
    fill_snapshot_ring(run)
    run_steps(run, batches, steps)


def fill_snapshot_ring(run: Run) -> None:
    """Take snapshots until the ring holds ``snapshot_keep`` of them: the guard's steady-state memory."""
    guard = run.guard
    if guard is None or not guard.config.snapshot_every:
        return
    while len(guard.rollback) < guard.config.snapshot_keep:
        guard.rollback.take(guard.step_count)


def variants_to_run() -> list[str]:
    return [v for v in VARIANTS if v != DEBUG_UO or transformers_available()]


# ---------------------------------------------------------------------------------------------- timing
def time_block(run: Run, batches: list[Batch], steps: int) -> float:
    """Seconds per step over one block of ``steps`` consecutive steps of one variant."""
    gc.collect()
    with listening(run.guard):
        sync(run.settings.device)
        started = time.perf_counter()
        for _ in range(steps):
            run.train_step(run, run.next_batch(batches))
        sync(run.settings.device)
        return (time.perf_counter() - started) / steps


def timing_pass(settings: Settings, variants: list[str], out_root: Path) -> list[Run]:
    base = build_model(settings)
    batches = make_batches(settings)
    runs = [build_run(v, kind, settings, out_root, copy.deepcopy(base)) for kind in settings.optimizers for v in variants]
    del base
    for run in runs:
        run_steps(run, batches, settings.guard_warmup if run.guard is not None else settings.warmup)
    sync(settings.device)
    for round_index in range(settings.rounds):
        shift = round_index % len(runs)
        for run in runs[shift:] + runs[:shift]:
            run.block_seconds.append(time_block(run, batches, settings.block))
    return runs


def step_call_rows(runs: list[Run], settings: Settings) -> list[dict[str, Any]]:
    """Time the ``optimizer.step()`` call alone, guarded and unguarded, one call at a time in rotation.

    The guard does nearly all its work inside that call, so the difference resolves its cost far below the
    noise of whole-step ratios. Its forward pre-hook (one abs-max per float batch input) and ``backward``
    hook are not inside the call and not counted here; the whole-step tables count them.
    """
    batches = make_batches(settings)
    chosen = [r for r in runs if r.variant == UNGUARDED or r.guard is not None]
    seconds: dict[int, list[float]] = {id(r): [] for r in chosen}
    for sample in range(settings.step_call_samples):
        shift = sample % len(chosen)
        for run in chosen[shift:] + chosen[:shift]:
            with listening(run.guard):
                run.optimizer.zero_grad(set_to_none=True)
                with settings.autocast():
                    loss = run.model(*run.next_batch(batches))
                loss.backward()
                sync(settings.device)
                started = time.perf_counter()
                run.optimizer.step()
                sync(settings.device)
                seconds[id(run)].append(time.perf_counter() - started)
    rows = []
    for kind in settings.optimizers:
        reference = next(r for r in chosen if r.optimizer_kind == kind and r.variant == UNGUARDED)
        base_ms = 1e3 * median(seconds[id(reference)])
        for run in (r for r in chosen if r.optimizer_kind == kind):
            call_ms = 1e3 * median(seconds[id(run)])
            rows.append({"variant": run.variant, "optimizer": kind, "step_call_ms": call_ms, "added_ms": call_ms - base_ms,
                         "samples": len(seconds[id(run)])})
    return rows


def timing_rows(runs: list[Run]) -> list[dict[str, Any]]:
    rows = []
    for kind in runs[0].settings.optimizers:
        reference = next(r for r in runs if r.optimizer_kind == kind and r.variant == UNGUARDED)
        for run in (r for r in runs if r.optimizer_kind == kind):
            ratios = [a / b for a, b in zip(run.block_seconds, reference.block_seconds, strict=True)]
            row: dict[str, Any] = {
                "variant": run.variant, "optimizer": kind, "median_ms": 1e3 * median(run.block_seconds),
                "ratio_median": median(ratios), "ratio_mean": sum(run.block_seconds) / sum(reference.block_seconds),
                "blocks": len(run.block_seconds),
            }
            if run.guard is not None:
                summary = run.guard.summary()
                activity = {k: summary[k] for k in ("steps", "skipped", "clipped", "rollbacks", "events")}
                activity["mode"] = "device (no sync)" if run.guard.device_mode else "host (one read per step)"
                row["guard"] = activity
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------- memory
def _rss_kib(field_name: str) -> int:
    with open("/proc/self/status", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise OSError(f"{field_name} not in /proc/self/status")


def cpu_memory_supported() -> str | None:
    """None when peak RSS can be measured per child; else why not."""
    if not hasattr(os, "fork"):
        return "needs os.fork"
    try:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as handle:
            handle.write("5")  # resets VmHWM, the peak RSS, to the current RSS
        _rss_kib("VmHWM")
    except OSError as exc:
        return f"cannot reset the peak RSS ({exc})"
    return None


def _cpu_child_peak(variant: str, kind: str, settings: Settings, out_root: Path) -> dict[str, Any]:
    with open("/proc/self/clear_refs", "w", encoding="utf-8") as handle:
        handle.write("5")
    start = _rss_kib("VmRSS")
    run = build_run(variant, kind, settings, out_root)
    train_for_memory(run, settings, settings.memory_steps)
    peak = _rss_kib("VmHWM")
    return {"peak_mb": (peak - start) * 1024 / 1e6}


def _in_fork(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: measure, report through the pipe, leave without running any cleanup
        os.close(read_fd)
        try:
            payload = json.dumps(fn())
        except BaseException as exc:  # anything the child hits goes back as text
            payload = json.dumps({"error": repr(exc)})
        with os.fdopen(write_fd, "w") as pipe:
            pipe.write(payload)
        os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    return json.loads(data) if data else {"error": "the child process died"}


def memory_pass(settings: Settings, variants: list[str], out_root: Path) -> tuple[dict[tuple[str, str], dict[str, Any]], str]:
    """Peak memory per variant, each measured alone. Must run before this process computes anything on a
    CPU: children are forked, and forking after torch's thread pool has started is not safe."""
    results: dict[tuple[str, str], dict[str, Any]] = {}
    if settings.device == "cuda":
        method = ("CUDA max_memory_allocated while one variant alone builds its model and optimizer and trains "
                  f"2 + {settings.memory_steps} steps (snapshots live in host memory and are not counted here)")
        for kind in settings.optimizers:
            for variant in variants:
                gc.collect()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                run = build_run(variant, kind, settings, out_root)
                train_for_memory(run, settings, settings.memory_steps)
                sync(settings.device)
                results[(variant, kind)] = {"peak_mb": (torch.cuda.max_memory_allocated() - before) / 1e6}
                run.close()
                del run
        gc.collect()
        torch.cuda.empty_cache()
        return results, method
    reason = cpu_memory_supported()
    if reason is not None:
        return results, f"not measured: {reason}"
    method = ("peak RSS growth (VmHWM at the end minus VmRSS at the start) of a forked child that builds the model "
              f"and optimizer, attaches the variant and trains 2 + {settings.memory_steps} steps alone, single-threaded, "
              "guards with a full snapshot ring (snapshot_keep snapshots) from step 2 on. The parent first ran every variant on a tiny model, "
              "so torch's one-time kernel initialisation and lazy imports are not counted")
    threads = torch.get_num_threads()
    # A child forked after OpenMP has started its thread pool hangs in its first parallel region, so the
    # parent warms up and the children run with one thread; the timing pass gets its threads back after.
    torch.set_num_threads(1)
    try:
        warm = replace(settings, shape=WARMUP_SHAPE)
        for kind in settings.optimizers:
            for variant in variants:
                run = build_run(variant, kind, warm, out_root / "warmup")
                train_for_memory(run, warm, 1)
                run.close()
        del run
        gc.collect()
        for kind in settings.optimizers:
            for variant in variants:
                results[(variant, kind)] = _in_fork(functools.partial(_cpu_child_peak, variant, kind, settings, out_root))
    finally:
        torch.set_num_threads(threads)
    return results, method


# ---------------------------------------------------------------------------------------------- snapshots
def snapshot_bytes(snapshot: Any) -> int:
    """Bytes of the tensor copies a snapshot (a ``nanguard.state.SavedState``) holds."""
    copies = list(snapshot.tensors) + [v for values in (snapshot.optimizer_state or {}).values() for v in values.values()]
    return sum(c.saved.numel() * c.saved.element_size() for c in copies if hasattr(c, "saved"))


def snapshot_rows(runs: list[Run], timing: list[dict[str, Any]], settings: Settings) -> list[dict[str, Any]]:
    """Time ``guard.rollback.take()`` (synchronised on both sides) on the safe guard of each optimizer kind."""
    from nanguard.config import PRESETS, GuardConfig

    rows = []
    for kind in settings.optimizers:
        run = next(r for r in runs if r.optimizer_kind == kind and r.variant == "nanguard safe (default)")
        step_ms = next(t["median_ms"] for t in timing if t["optimizer"] == kind and t["variant"] == UNGUARDED)
        seconds = []
        for _ in range(settings.snapshot_repeats):
            sync(settings.device)
            started = time.perf_counter()
            run.guard.rollback.take(run.guard.step_count)
            sync(settings.device)
            seconds.append(time.perf_counter() - started)
        snapshot_ms = 1e3 * median(seconds)
        newest = run.guard.rollback.newest_finite()
        intervals = {name: GuardConfig.preset(name).snapshot_every for name in PRESETS}
        rows.append({
            "optimizer": kind, "snapshot_ms": snapshot_ms, "snapshot_mb": snapshot_bytes(newest) / 1e6 if newest else None,
            "step_ms": step_ms, "steps_per_snapshot": snapshot_ms / step_ms,
            "amortised": {name: (snapshot_ms / step_ms / every if every else 0.0) for name, every in intervals.items()},
            "intervals": intervals,
        })
    return rows


# ---------------------------------------------------------------------------------------------- forensic replay
def replay_row(kind: str, settings: Settings, out_root: Path) -> dict[str, Any]:
    """Inject a NaN into ``loss_weights`` at known steps; time the faulty ``optimizer.step()`` against normal ones.

    Each timed region is ``optimizer.step(); guard.flush()`` (plus a device sync): on a GPU with a fused
    optimizer the verdict reaches the host asynchronously, and ``flush()`` is what makes the investigation
    happen inside the region. Normal steps pay the same ``flush()``, so the difference is the replay.
    """
    import nanguard

    model = build_model(settings)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.1, fused=kind == "fused")
    guard = nanguard.Guard(model, optimizer, config="safe", console=False, report=False, out_dir=out_root / f"replay-{kind}")
    batches = make_batches(settings)
    step_index = 0

    def forward_backward(batch: Batch) -> None:
        optimizer.zero_grad(set_to_none=True)
        with settings.autocast():
            loss = model(*batch)
        loss.backward()

    def timed_optimizer_step() -> float:
        sync(settings.device)
        started = time.perf_counter()
        optimizer.step()
        guard.flush()
        sync(settings.device)
        return time.perf_counter() - started

    normal_full, normal_opt, faulty_opt, details = [], [], [], []
    try:
        with listening(guard):
            for _ in range(settings.guard_warmup):
                forward_backward(batches[step_index % len(batches)])
                optimizer.step()
                step_index += 1
            for _ in range(settings.replay_faults):
                for _ in range(settings.replay_normal_steps):
                    sync(settings.device)
                    started = time.perf_counter()
                    forward_backward(batches[step_index % len(batches)])
                    normal_opt.append(timed_optimizer_step())
                    normal_full.append(time.perf_counter() - started)
                    step_index += 1
                ids, targets, loss_weights = batches[step_index % len(batches)]
                loss_weights = loss_weights.clone()
                loss_weights[0, 1] = float("nan")
                events_before = len(guard.events)
                forward_backward((ids, targets, loss_weights))
                faulty_opt.append(timed_optimizer_step())
                step_index += 1
                new = guard.events[events_before:]
                details.append({"step": new[0].step, "cause": new[0].diagnosis.cause, "tensor": new[0].diagnosis.tensor,
                                "action": new[0].action, "guard_seconds": new[0].details.get("seconds")}
                               if new else {"step": step_index - 1, "cause": None})
    finally:
        with listening(guard):
            guard.close()
    step_s, opt_s = median(normal_full), median(normal_opt)
    replay_s = median(faulty_opt) - opt_s
    return {"optimizer": kind, "step_ms": 1e3 * step_s, "normal_opt_step_ms": 1e3 * opt_s, "faulty_opt_step_ms": 1e3 * median(faulty_opt),
            "replay_ms": 1e3 * replay_s, "replay_step_times": replay_s / step_s, "faults": details}


# ---------------------------------------------------------------------------------------------- report
def format_report(result: dict[str, Any]) -> str:
    settings = result["settings"]
    shape = settings["shape"]
    memory = {(m["variant"], m["optimizer"]): m for m in result["memory"]["rows"]}
    out = [
        f"# nanguard step overhead: shape `{settings['shape_name']}` on {'GPU' if settings['device'] == 'cuda' else 'CPU'}",
        "",
        f"Command: `{result['command']}`",
        "",
        describe_machine(result["machine"]),
        "",
        f"Model: GPT-style decoder, {shape['layers']} layers, width {shape['width']}, {shape['heads']} heads, vocab "
        f"{shape['vocab']}, sequence {shape['seq']}, batch {shape['batch']}, "
        f"{'bf16 autocast' if settings['bf16'] else 'fp32'}, {result['parameters'] / 1e6:.2f} M parameters, AdamW lr {settings['lr']}. "
        f"Warm-up {settings['warmup']} steps ({settings['guard_warmup']} for guarded variants"
        f"{', past the spike warm-up' if not settings['quick'] else ''}), "
        f"then {settings['rounds']} rounds x {settings['block']} steps per variant, interleaved.",
    ]
    if settings["quick"]:
        out += ["", "**--quick: a smoke run with a few steps; these numbers are not measurements.**"]
    for kind in settings["optimizers"]:
        label = OPTIMIZERS[kind]
        rows = []
        for row in (r for r in result["timing"] if r["optimizer"] == kind):
            mem = memory.get((row["variant"], kind), {})
            ref = memory.get((UNGUARDED, kind), {})
            peak = mem.get("peak_mb")
            delta = peak - ref["peak_mb"] if peak is not None and ref.get("peak_mb") is not None else None
            guard = row.get("guard")
            note = (f"{guard['mode']}; {guard['skipped']} skipped, {guard['clipped']} clipped, {guard['events']} events "
                    f"in {guard['steps']} steps") if guard else ""
            rows.append([row["variant"], f"{row['median_ms']:.2f}", f"{row['ratio_median']:.3f}x", f"{row['ratio_mean']:.3f}x",
                         "n/a" if peak is None else f"{peak:.1f}", "n/a" if delta is None else f"{delta:+.1f}", note])
        out += ["", f"## {label}", "",
                markdown_table(["variant", "ms/step (median)", "x unguarded (median of rounds)", "x unguarded (total time)",
                                "peak MB", "peak MB vs unguarded", "guard activity"], rows)]
    out += ["", f"Peak memory: {result['memory']['method']}."]
    errors = [m for m in result["memory"]["rows"] if "error" in m]
    for m in errors:
        out.append(f"Memory of {m['variant']} / {m['optimizer']} failed: {m['error']}")

    unguarded_ms = {(r["optimizer"]): r["median_ms"] for r in result["timing"] if r["variant"] == UNGUARDED}
    call_rows = [[OPTIMIZERS[r["optimizer"]], r["variant"], f"{r['step_call_ms']:.3f}",
                  "" if r["variant"] == UNGUARDED else f"{r['added_ms']:+.3f}",
                  "" if r["variant"] == UNGUARDED else f"{100 * r['added_ms'] / unguarded_ms[r['optimizer']]:+.2f}%"]
                 for r in result["step_calls"]]
    out += ["", "## Time inside optimizer.step()", "",
            markdown_table(["optimizer", "variant", "optimizer.step() ms (median)", "added ms", "added / unguarded step"], call_rows),
            "", "Each sample: an untimed forward and backward, then `optimizer.step()` alone with a device sync on both sides; "
            "variants in rotation, one call at a time. The guard's forward pre-hook and `backward` hook run outside the "
            "call and are not counted here; on a GPU the call's host time can overlap the device's work."]

    if result.get("baseline"):
        out += _baseline_section(result["baseline"])

    snap_rows = []
    for row in result["snapshots"]:
        amortised = ", ".join(f"{name} (every {row['intervals'][name]}): {100 * value:.3f}%" for name, value in row["amortised"].items())
        size = "n/a" if row["snapshot_mb"] is None else f"{row['snapshot_mb']:.2f}"
        snap_rows.append([OPTIMIZERS[row["optimizer"]], f"{row['snapshot_ms']:.2f}", size, f"{row['step_ms']:.2f}",
                          f"{row['steps_per_snapshot']:.3f}", amortised])
    out += ["", "## Rollback snapshot refresh", "",
            markdown_table(["optimizer", "snapshot ms (median)", "snapshot MB", "unguarded step ms", "x step", "amortised per step"], snap_rows),
            "", "`guard.rollback.take()` timed with a device sync on both sides, on the safe guard after the timed rounds; "
            "amortised = snapshot time / unguarded step time / the preset's `snapshot_every`."]

    replay_rows = []
    for row in result["replay"]:
        faults = row["faults"]
        causes = sorted({f"{f['cause']}" + (f" ({f['tensor']})" if f.get("tensor") else "") for f in faults})
        guard_s = [f["guard_seconds"] for f in faults if f.get("guard_seconds") is not None]
        replay_rows.append([OPTIMIZERS[row["optimizer"]], f"{row['step_ms']:.2f}", f"{row['normal_opt_step_ms']:.2f}",
                            f"{row['faulty_opt_step_ms']:.2f}", f"{row['replay_ms']:.1f}", f"{row['replay_step_times']:.1f}",
                            f"{1e3 * median(guard_s):.1f}" if guard_s else "n/a", f"{len(faults)}: " + ", ".join(causes)])
    out += ["", "## One forensic replay", "",
            markdown_table(["optimizer", "guarded step ms", "optimizer.step()+flush ms", "faulty optimizer.step()+flush ms",
                            "replay ms", "replay in step-times", "investigation ms (guard's own clock)", "faults: diagnosed cause"], replay_rows),
            "", "A NaN is put into the batch's `loss_weights` after the guard's warm-up (safe preset, forensics on); replay = "
            "median faulty `optimizer.step()` + `guard.flush()` minus the median of the same call on normal steps; step-time = "
            "a normal guarded forward + backward + step."]
    return "\n".join(out)


def _baseline_section(rows: list[dict[str, Any]]) -> list[str]:
    table = []
    for kind in dict.fromkeys(r["optimizer"] for r in rows):
        pair = {r["tree"]: r for r in rows if r["optimizer"] == kind}
        before, after = pair["baseline"], pair["this tree"]
        table.append([OPTIMIZERS[kind], f"{before['added_ms']:+.3f}", f"{after['added_ms']:+.3f}",
                      f"{after['added_ms'] / before['added_ms']:.2f}x" if before["added_ms"] > 0 else "n/a",
                      f"{before['unguarded_ms']:.3f} / {after['unguarded_ms']:.3f}", ", ".join(f"{v:+.3f}" for v in after["rounds"])])
    paths = sorted({r["path"] for r in rows})
    return ["", "## Time inside optimizer.step(): before and after", "",
            markdown_table(["optimizer", "baseline: added ms", "this tree: added ms", "after / before",
                            "unguarded ms (baseline / this tree workers)", "this tree, per round"], table),
            "", "Each cell: the median over interleaved rounds of one worker process's median added time (guarded minus "
            "unguarded `optimizer.step()`, one call at a time, `safe` preset, past the spike warm-up). nanguard trees: "
            + ", ".join(f"`{p}`" for p in paths) + "."]


# ---------------------------------------------------------------------------------------------- preflight
def count_parameters(shape: Shape) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in GPT(shape).parameters())


def estimate_gb(settings: Settings, variants: list[str]) -> tuple[float, float]:
    """Rough resident need of the timing pass, (device GB, host GB): every run keeps fp32 weights, gradients
    and two AdamW moments (16 bytes a parameter); every guard a ring of snapshots of weights and moments (12
    bytes a parameter each) in host memory. Activations of one step come on top."""
    from nanguard.config import GuardConfig

    params = count_parameters(settings.shape)
    kinds = len(settings.optimizers)
    runs = len(variants) * kinds
    slots = kinds * sum(GuardConfig.preset(GUARD_PRESETS[v]).snapshot_keep for v in variants if v in GUARD_PRESETS)
    return runs * 16 * params / 1e9, slots * 12 * params / 1e9


def available_host_gb() -> float | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return None


def memory_problem(settings: Settings, variants: list[str]) -> str | None:
    """Why this configuration would not fit in memory, or None. Better a clear refusal than the OOM killer."""
    device_gb, host_gb = estimate_gb(settings, variants)
    needs = [("host", host_gb + (device_gb if settings.device == "cpu" else 0.0), available_host_gb())]
    if settings.device == "cuda":
        needs.append(("GPU", device_gb, torch.cuda.mem_get_info()[0] / 1e9))
    for where, need, have in needs:
        if have is not None and need > 0.8 * have:
            return (f"this run needs about {need:.1f} GB of {where} memory ({len(variants)} variants x "
                    f"{len(settings.optimizers)} optimizers, each with its own model and AdamW state, plus guard "
                    f"snapshots) and {have:.1f} GB is available: use --optimizer fused, fewer --layers, or a bigger machine")
    return None


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small", help="model shape (default small)")
    parser.add_argument("--allow-cpu", action="store_true", help=f"run --shape gpt2 on a CPU, with sequence/batch {GPT2_ON_CPU}")
    parser.add_argument("--quick", action="store_true", help="a few steps only: a smoke run, not a measurement")
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this path")
    parser.add_argument("--rounds", type=int, help="timed rounds over all variants")
    parser.add_argument("--block", type=int, help="steps per timed block")
    parser.add_argument("--batch", type=int, help="override the shape's batch size")
    parser.add_argument("--seq", type=int, help="override the shape's sequence length")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: 1 for --shape small on a CPU, where "
                        "more threads only add OpenMP contention; torch's choice otherwise)")
    parser.add_argument("--optimizer", choices=["both", *OPTIMIZERS], default="both",
                        help="AdamW kinds to measure (default both; one halves the memory the script needs)")
    parser.add_argument("--layers", type=int, help="override the shape's number of layers")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    parser.add_argument("--baseline", type=Path, help="src folder of another nanguard tree: also time optimizer.step() "
                        "for it and this tree side by side (CPU, --shape small)")
    parser.add_argument("--baseline-rounds", type=int, default=5, help="interleaved rounds of the --baseline comparison")
    args = parser.parse_args(argv)
    for name in ("rounds", "block", "batch", "seq", "threads", "layers"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be >= 1, got {value}")
    if args.shape == "gpt2" and not args.allow_cpu and not torch.cuda.is_available():
        parser.error("--shape gpt2 is a GPU benchmark (bf16 autocast, fused AdamW) and no CUDA device is visible: run it on a "
                     "GPU machine, or add --allow-cpu for GPT-2 width and depth at a reduced sequence/batch on this CPU (slow)")
    return args


def make_settings(args: argparse.Namespace) -> Settings:
    cuda = torch.cuda.is_available()
    shape = SHAPES[args.shape]
    overrides: dict[str, int] = dict(GPT2_ON_CPU) if args.shape == "gpt2" and not cuda else {}
    if args.quick:  # a smoke run checks that every part of the script works: a tiny model does that
        overrides.update(asdict(QUICK_SHAPE))
    overrides.update({k: v for k, v in (("seq", args.seq), ("batch", args.batch), ("layers", args.layers)) if v is not None})
    shape = Shape(**{**asdict(shape), **overrides})
    from nanguard.config import GuardConfig

    guard_warmup = GuardConfig().spikes.warmup_steps + 5
    big = args.shape == "gpt2"
    quick = args.quick
    return Settings(
        shape_name=args.shape, shape=shape, device="cuda" if cuda else "cpu", bf16=big and cuda, lr=3e-4 if big else 1e-3,
        rounds=args.rounds or (2 if quick else 7), block=args.block or (2 if quick else 5 if big else 4),
        warmup=2 if quick else 3, guard_warmup=2 if quick else guard_warmup, memory_steps=2 if quick else 5,
        snapshot_repeats=2 if quick else 7, step_call_samples=2 if quick else 20, replay_faults=1 if quick else 3, replay_normal_steps=2 if quick else 5,
        quick=quick, optimizers=tuple(OPTIMIZERS) if args.optimizer == "both" else (args.optimizer,),
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = args.threads or (1 if args.shape == "small" and not torch.cuda.is_available() else None)
    if threads:
        torch.set_num_threads(threads)
    settings = make_settings(args)
    load_at_start = load_average()
    warnings.filterwarnings("ignore", message=".*[Aa]nomaly [Dd]etection.*")
    variants = variants_to_run()
    problem = memory_problem(settings, variants)
    if problem is not None:
        print(f"overhead.py: error: {problem}", file=sys.stderr)
        return 2
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__), *(sys.argv[1:] if argv is None else argv)])
    with tempfile.TemporaryDirectory(prefix="nanguard-bench-") as tmp:
        out_root = Path(tmp)
        if args.no_memory:
            memory: dict[tuple[str, str], dict[str, Any]] = {}
            memory_method = "not measured (--no-memory)"
        else:
            progress("peak memory, one variant at a time")
            memory, memory_method = memory_pass(settings, variants, out_root)  # first: it forks on a CPU
        progress(f"timing {len(variants)} variants x {len(settings.optimizers)} optimizers, interleaved")
        runs = timing_pass(settings, variants, out_root)
        timing = timing_rows(runs)
        progress("optimizer.step() alone")
        step_calls = step_call_rows(runs, settings)
        progress("snapshot refresh")
        snapshots = snapshot_rows(runs, timing, settings)
        parameters = sum(p.numel() for p in runs[0].model.parameters())
        for run in runs:
            run.close()
        del runs
        gc.collect()
        progress("forensic replay")
        replay = [replay_row(kind, settings, out_root) for kind in settings.optimizers]
        baseline = None
        if args.baseline is not None:
            baseline = compare_step_calls(args.baseline.resolve(), settings.optimizers, rounds=2 if settings.quick else args.baseline_rounds,
                                          samples=settings.step_call_samples * (1 if settings.quick else 3),
                                          warmup=settings.guard_warmup, shape_name=settings.shape_name, progress=progress)
        progress("done")
    result = {
        "command": command, "machine": {**machine_info(), "load_average_start": load_at_start}, "parameters": parameters,
        "settings": {**asdict(settings), "variants": variants,
                     "skipped_variants": [v for v in VARIANTS if v not in variants]},
        "timing": timing, "step_calls": step_calls,
        "memory": {"method": memory_method, "rows": [{"variant": v, "optimizer": k, **m} for (v, k), m in memory.items()]},
        "snapshots": snapshots, "replay": replay, "baseline": baseline,
    }
    print(format_report(result))
    if DEBUG_UO not in variants:
        print(f"\n{DEBUG_UO}: skipped, transformers is not installed.")
    if args.json:
        tmp_path = args.json.with_name(f".{args.json.name}.tmp{os.getpid()}")
        tmp_path.write_text(json.dumps(result, indent=2, default=str))
        os.replace(tmp_path, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
