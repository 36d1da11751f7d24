"""The Guard as the integrations use it: replays that also silence framework wrappers, and undo hooks.

The lockstep behaviour under torch.distributed (one diagnosis for all ranks, collective-free replays, no
replay under FSDP) lives in :class:`~nanguard.guard.Guard` itself; :class:`IntegrationGuard` only adds
the wrappers a framework puts around the model (Lightning's DDP wrapper around the LightningModule) to
what a replay switches to no-sync, and a place to register the undo of framework patches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from nanguard.guard import Guard


class IntegrationGuard(Guard):
    """A :class:`Guard` that stays in lockstep across ranks on the event path too."""

    def __init__(self, *args: Any, replay_wrappers: Sequence[torch.nn.Module] = (), **kwargs: Any) -> None:
        self.replay_wrappers = list(replay_wrappers)
        self._on_close: list[Callable[[], None]] = []
        super().__init__(*args, **kwargs)

    def on_close(self, undo: Callable[[], None]) -> None:
        """Run ``undo`` (take out a framework patch) when the guard closes."""
        self._on_close.append(undo)

    def close(self, status: str = "finished") -> None:
        try:
            super().close(status)
        finally:
            while self._on_close:
                self._on_close.pop()()

    def _replay_models(self) -> list[torch.nn.Module]:
        return [*self.models, *self.replay_wrappers]


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
        from nanguard.errors import UsageError

        raise UsageError(f"nanguard needs a torch.optim.Optimizer to guard, got {type(optimizer).__name__}")
    return optimizer


def run_closure_outside(guard: Guard) -> Callable[[], None]:
    """Make ``optimizer.step(closure)`` run the closure before the guard sees the step.

    The guard keeps a closure it is given to re-run the step if it goes wrong. Under torch.distributed a
    framework's closure can hold collectives (DDP's gradient all-reduce, ``sync_dist`` logging) that must
    not run on one rank alone, so there the replay uses the recorded model calls instead. The closure
    still runs exactly once per step. Returns the function that undoes this.
    """
    optimizer = guard.optimizer
    guarded = optimizer.step

    def step(self: torch.optim.Optimizer, closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        guarded(**kwargs)
        return loss

    import types

    optimizer.step = types.MethodType(step, optimizer)  # type: ignore[method-assign]

    def undo() -> None:
        if getattr(optimizer.step, "__func__", None) is step:
            optimizer.step = guarded  # type: ignore[method-assign]

    return undo
