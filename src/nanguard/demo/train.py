"""The demo's training loop: an ordinary PyTorch loop, with nanguard added in one line.

Read :func:`train` to see how to use nanguard in your own code::

    guard = nanguard.Guard(model, optimizer, scheduler=scheduler, out_dir="runs/exp1")
    for batch in batches:                       # the loop itself does not change
        loss = model(**batch)
        loss.backward()
        optimizer.step()                        # <- every step is now checked here
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
    guard.close()                               # events.jsonl, history.csv, report.html

The guard wraps ``optimizer.step``: before each update it checks the loss, the gradient norm and
(periodically) the weights. A bad step is skipped; when skipping does not help, the guard rolls the
model and optimizer back to a recent snapshot and backs the learning rate off; every event gets a
diagnosis of where the bad value was born. Passing ``scheduler=`` keeps the LR schedule from
advancing over skipped steps.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch

import nanguard
from nanguard.demo.faults import LR_SPIKE, FaultPlan
from nanguard.demo.model import ModelConfig, TinyLM
from nanguard.demo.task import VOCAB, Batch, make_batches
from nanguard.errors import TrainingAborted
from nanguard.sinks.console import LiveConsole

EVAL_SEED_OFFSET = 10_000


@dataclass(frozen=True)
class Settings:
    steps: int
    seed: int = 0
    batch_size: int = 32
    seq_len: int = 32
    lr: float = 3e-3
    warmup_steps: int = 10
    eval_batches: int = 4
    snapshot_every: int = 20


@dataclass
class RunResult:
    """What one training run did, for the summary at the end."""

    guarded: bool
    losses: list[float]  # the training loss of every step, as the loop saw it
    eval_loss: float  # held-out loss after training: the "final loss"
    weights_finite: bool
    seconds: float
    injected: list[tuple[int, str]] = field(default_factory=list)  # (step, fault kind), in order
    events: list[dict[str, Any]] = field(default_factory=list)
    guard_summary: dict[str, Any] = field(default_factory=dict)
    aborted: str | None = None
    run_dir: Path | None = None  # where the guard wrote; a sub-directory when the asked-for one was busy

    @property
    def first_nonfinite_step(self) -> int | None:
        return next((step for step, loss in enumerate(self.losses) if not math.isfinite(loss)), None)

    @property
    def recovered(self) -> bool:
        """Was the loss finite again at the last step (True too when it never went non-finite)?"""
        return self.first_nonfinite_step is None or math.isfinite(self.losses[-1])


def schedule(settings: Settings) -> Any:
    """The intended LR factor per step: linear warm-up, then cosine decay to 10%."""

    def factor(step: int) -> float:
        if step < settings.warmup_steps:
            return (step + 1) / settings.warmup_steps
        progress = min(1.0, (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def train(settings: Settings, plan: FaultPlan, *, guard_dir: Path | None = None, console: TextIO | None = None,
          progress_every: int = 0) -> RunResult:
    """Train from scratch under ``plan``'s faults; with ``guard_dir``, under nanguard writing there."""
    torch.manual_seed(settings.seed)
    model = TinyLM(ModelConfig(vocab_size=len(VOCAB), seq_len=settings.seq_len))
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, plan.buggy(schedule(settings)))
    batches = make_batches(settings.seed, settings.steps, settings.batch_size, settings.seq_len)

    guard = None
    if guard_dir is not None:
        # The one line that adds nanguard. The overrides suit a 30-second run (defaults suit long ones):
        # snapshot more often than every 50 steps, and investigate every event, not just the first five.
        # console=False + our own LiveConsole: a progress line every N steps even when output is a log.
        guard = nanguard.Guard(model, optimizer, scheduler=scheduler, out_dir=guard_dir,
                               snapshot_every=settings.snapshot_every, forensics_max_events=20,
                               console=False, sinks=[LiveConsole(console, every=progress_every)])

    losses: list[float] = []
    injected: list[tuple[int, str]] = []
    aborted = None
    started = time.perf_counter()
    try:
        for step, clean_batch in enumerate(batches):
            batch, data_fault = plan.batch_for(step, clean_batch)
            weight_fault = plan.corrupt_weights(step, model)
            if plan.lr_is_spiked(scheduler.last_epoch):
                injected.append((step, LR_SPIKE))
            injected += [(step, kind) for kind in (data_fault, weight_fault) if kind]

            # ---- the training step, exactly as it is without nanguard ----
            loss = model(**batch.as_dict())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            losses.append(loss.item())
    except TrainingAborted as exc:  # the guard stops a run only when skipping and rolling back failed
        aborted = str(exc)
    finally:
        if guard is not None:
            guard.close()
    seconds = time.perf_counter() - started

    eval_loss = evaluate(model, make_batches(settings.seed + EVAL_SEED_OFFSET, settings.eval_batches,
                                             settings.batch_size, settings.seq_len))
    weights_finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    return RunResult(
        guarded=guard is not None, losses=losses, eval_loss=eval_loss, weights_finite=weights_finite,
        seconds=seconds, injected=injected, aborted=aborted,
        events=[event.to_dict() for event in guard.events] if guard is not None else [],
        guard_summary=guard.summary() if guard is not None else {},
        run_dir=Path(guard.out_dir) if guard is not None else None,
    )


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[Batch]) -> float:
    """Mean loss on held-out batches: a fair "final loss", unlike the noisy loss of the last step."""
    model.eval()
    try:
        return sum(float(model(**batch.as_dict())) for batch in batches) / len(batches)
    finally:
        model.train()
