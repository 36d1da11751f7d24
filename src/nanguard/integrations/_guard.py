"""The Guard as the integrations use it: lockstep diagnosis under torch.distributed, isolated replays.

:class:`IntegrationGuard` adds to :class:`~nanguard.guard.Guard` only what frameworks that launch many
ranks need on the event path (see :mod:`nanguard.distributed`):

* one diagnosis for all ranks: the rank that saw the fault diagnoses, the others receive the answer,
  so the escalation policy (which depends on the cause) takes the same action everywhere;
* replays that issue no collective, including through wrappers the guard does not train directly
  (Lightning's DDP wrapper around the LightningModule);
* under FSDP no replay at all (a forward all-gathers parameters): every rank runs the signal-level
  triage in lockstep, and the bad rank's answer is kept.

Without torch.distributed it behaves exactly like the Guard.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from nanguard import distributed as dist_utils
from nanguard.events import Diagnosis, Event
from nanguard.guard import F_LOSS, Guard


class IntegrationGuard(Guard):
    """A :class:`Guard` that stays in lockstep across ranks on the event path too."""

    def __init__(self, *args: Any, replay_wrappers: Sequence[torch.nn.Module] = (), **kwargs: Any) -> None:
        self.replay_wrappers = list(replay_wrappers)
        self._lockstep_step = -1
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

    def _check_and_step(self, step: int, *args: Any, **kwargs: Any) -> Any:
        # Steps decided here had their flags all-gathered: every rank handles them at the same time.
        self._lockstep_step = step
        return super()._check_and_step(step, *args, **kwargs)

    def _emit(self, event: Event) -> None:
        rows = event.details.get("rank_flags")
        if isinstance(rows, list) and 0 <= event.rank < len(rows) and event.rank != self.rank:
            event.loss = rows[event.rank][F_LOSS]  # the loss of the rank that saw the fault, not this rank's
        # Per-rank flag rows carry the NaN loss of the bad rank; strict JSON refuses it.
        event.details = _json_safe(event.details)
        super()._emit(event)

    def _replay_context(self) -> Any:
        return dist_utils.isolated_replay([*self.models, *self.replay_wrappers])

    def _diagnose(self, step: int, trigger: str, *args: Any) -> tuple[Diagnosis, dict[str, Any]]:
        in_lockstep = (
            dist_utils.is_distributed() and step == self._lockstep_step and trigger != "divergence" and not self.device_mode
        )
        if not in_lockstep:
            # Only this rank is here (a verdict read back late, a local divergence check): no collective.
            return super()._diagnose(step, trigger, *args)
        sharded = dist_utils.uses_sharded_parameters(self.models)

        def diagnose() -> tuple[Diagnosis, dict[str, Any]]:
            with _forensics_off(self) if sharded else contextlib.nullcontext():
                diagnosis, details = super(IntegrationGuard, self)._diagnose(step, trigger, *args)
            return diagnosis, {**details, "diagnosed_on_rank": dist_utils.rank()}

        return dist_utils.diagnose_on_bad_rank(self._bad_rank(), diagnose, _no_diagnosis, all_ranks=sharded)


def _json_safe(value: Any) -> Any:
    """Non-finite floats as strings ("nan", "inf"): event files are strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _no_diagnosis() -> tuple[Diagnosis, dict[str, Any]]:
    return Diagnosis(cause="unknown", evidence=["the diagnosis failed on the rank that saw the fault"]), {}


@contextlib.contextmanager
def _forensics_off(guard: Guard) -> Any:
    config = guard.config
    guard.config = config.replace(forensics=False)
    try:
        yield
    finally:
        guard.config = config


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
