"""The Guard as the integrations use it: replays that also silence framework wrappers, and framework
patches that the guard undoes with its own.

The lockstep behaviour under torch.distributed (one diagnosis for all ranks, collective-free replays, no
replay under FSDP) lives in the guard's parts; :class:`IntegrationGuard` only adds the wrappers a
framework puts around the model (Lightning's DDP wrapper around the LightningModule) to what a replay
switches to no-sync, and routes framework patches through the guard's :class:`~nanguard.patches.Patches`.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence
from typing import Any

import torch

from nanguard.errors import UsageError
from nanguard.guard import Guard


class IntegrationGuard(Guard):
    """A :class:`Guard` that stays in lockstep across ranks on the event path too."""

    def __init__(self, *args: Any, replay_wrappers: Sequence[torch.nn.Module] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.desk.wrappers = list(replay_wrappers)

    def patch(self, owner: Any, name: str, value: Any) -> Any:
        """Replace ``owner.name`` until the guard closes (undone with the guard's own patches, newest first)."""
        return self._patches.replace(owner, name, value)


def inner_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The ``torch.optim.Optimizer`` inside wrappers (Accelerate's ``AcceleratedOptimizer``, Lightning's
    ``LightningOptimizer``): the guard must wrap the ``step`` that really updates the weights."""
    seen = 0
    while seen < 8:
        inner = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer) or inner is optimizer:
            break
        optimizer, seen = inner, seen + 1
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise UsageError(f"nanguard needs a torch.optim.Optimizer to guard, got {type(optimizer).__name__}")
    return optimizer


def run_closure_outside(guard: IntegrationGuard) -> None:
    """Make ``optimizer.step(closure)`` run the closure before the guard sees the step (until close).

    The guard keeps a closure it is given to re-run the step if it goes wrong. Under torch.distributed a
    framework's closure can hold collectives (DDP's gradient all-reduce, ``sync_dist`` logging) that must
    not run on one rank alone, so there the replay uses the recorded model calls instead. The closure
    still runs exactly once per step.
    """
    optimizer = guard.optimizer
    guarded: Callable[..., Any] = optimizer.step

    def step(self: torch.optim.Optimizer, closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        guarded(**kwargs)
        return loss

    guard.patch(optimizer, "step", types.MethodType(step, optimizer))
