"""The Guard as the integrations use it: replays that also silence framework wrappers, and framework
patches that the guard undoes with its own.

The lockstep behaviour under torch.distributed (one diagnosis for all ranks, collective-free replays, no
replay under FSDP) lives in the guard's parts; :class:`IntegrationGuard` only adds the wrappers a
framework puts around the model (Lightning's DDP wrapper around the LightningModule) to what a replay
switches to no-sync, and routes framework patches through the guard's :class:`~nanguard.patches.Patches`.
"""

from __future__ import annotations

import atexit
import sys
import threading
import types
from collections.abc import Callable, Sequence
from typing import Any

import torch

from nanguard import patches
from nanguard.errors import UsageError
from nanguard.guard import Guard

_LIVE: list[IntegrationGuard] = []  # open integration guards, oldest first
_LIVE_LOCK = threading.Lock()
_AT_EXIT: list[bool] = []


class IntegrationGuard(Guard):
    """A :class:`Guard` that stays in lockstep across ranks on the event path too, and records a crash in
    whatever style the user wrote (``with``, ``try/finally close()``, or no ``close()`` at all)."""

    def __init__(self, *args: Any, replay_wrappers: Sequence[torch.nn.Module] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.desk.wrappers = list(replay_wrappers)
        self._crash_lease = watch_crashes(self)

    def align_step(self, framework_step: int) -> None:
        """Number the next step as the framework does (``global_step`` of a resumed run).

        A guard whose state came back with the checkpoint already counts from there; one that did not
        (the checkpoint predates the guard, or the framework does not restore callback state) would
        otherwise restart at 0, and its events would not line up with the framework's logs.
        """
        if framework_step > self.tally.steps:
            self.tally.steps = int(framework_step)

    def close(self, status: str = "finished") -> None:
        with _LIVE_LOCK:
            if self in _LIVE:
                _LIVE.remove(self)
        super().close(status=status)
        self._crash_lease.release()

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


# ---------------------------------------------------------------------- crashes outside any guard call
def watch_crashes(guard: IntegrationGuard) -> patches.Lease:
    """Record an uncaught exception with ``guard`` (trigger ``exception``), and close it at interpreter exit.

    Integrations guard loops they do not own: ``guard = guard_accelerator(...)`` without ``with``, or a
    callback whose framework swallows nothing but tells it nothing either. The process-wide
    ``sys.excepthook`` (held by a lease while any integration guard is open) writes the crash event before
    the interpreter prints the traceback; ``atexit`` writes the summary and report of a guard nobody closed.
    """
    with _LIVE_LOCK:
        _LIVE.append(guard)
        if not _AT_EXIT:
            _AT_EXIT.append(True)
            atexit.register(_close_all, "finished")
    return patches.acquire(sys, "excepthook", _crash_hook)


def _crash_hook(previous: Callable[..., Any]) -> Callable[..., Any]:
    def excepthook(exc_type: type[BaseException], exc: BaseException, tb: Any) -> Any:
        with _LIVE_LOCK:
            live = list(_LIVE)
        if live and isinstance(exc, Exception):
            try:
                live[0].record_crash(exc)  # the first guard writes it, once (as ``nanguard run`` does)
            except Exception as failure:  # never hide the user's own traceback behind ours
                print(f"nanguard: could not record the crash: {failure!r}", file=sys.stderr)
        _close_all("error")
        return previous(exc_type, exc, tb)

    return excepthook


def _close_all(status: str) -> None:
    with _LIVE_LOCK:
        live = list(_LIVE)
    for guard in live:
        try:
            guard.close(status=status)
        except Exception as failure:  # at exit: report, and let the other guards close
            print(f"nanguard: could not close a guard: {failure!r}", file=sys.stderr)
