"""Hugging Face Accelerate: guard the optimizer that ``accelerator.prepare`` wrapped.

::

    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    with guard_accelerator(accelerator, model, optimizer, scheduler=scheduler) as guard:
        accelerator.register_for_checkpointing(guard)   # its state in save_state / load_state
        for batch in loader:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)        # the guard sees the loss here
                optimizer.step()                   # checked, and skipped if bad
                scheduler.step()                   # held on skipped steps
                optimizer.zero_grad()

A crash in the loop is recorded (trigger ``exception``) in this style and in the others: ``try/finally
guard.close()``, or ``guard = guard_accelerator(...)`` with no ``close()`` (the integration guard holds
``sys.excepthook`` and closes at exit).

How it fits Accelerate:

* the guard wraps the ``step`` of the ``torch.optim.Optimizer`` inside the ``AcceleratedOptimizer``. That
  step only runs when gradients are synchronised, so with ``gradient_accumulation_steps=k`` the guard
  counts real optimizer steps, and the loss it records is the sum of the k scaled micro-batch losses
  ``accelerator.backward`` saw, i.e. the accumulated loss;
* a skipped step is reported as ``optimizer.step_was_skipped`` (what Accelerate uses for fp16 overflow
  skips), so ``accelerator.optimizer_step_was_skipped`` is true and a prepared scheduler does not advance,
  however many processes it steps for. A scheduler that was not prepared is held by the guard itself;
* with an fp16 ``GradScaler`` Accelerate re-installs the optimizer's ``step`` on every call; it is re-pointed
  at the guarded step, and the scaler's own overflow skips are counted, not reported;
* ``accelerator.clip_grad_norm_`` hands its (pre-clip) norm to the guard, so it is not computed twice.
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import torch

from nanguard import distributed as dist_utils
from nanguard._optional import require
from nanguard.integrations._guard import IntegrationGuard, inner_optimizer


def guard_accelerator(accelerator: Any, model: torch.nn.Module, optimizer: Any, *, scheduler: Any = None,
                      out_dir: str | Path | None = None, **guard_kwargs: Any) -> IntegrationGuard:
    """Guard an Accelerate training loop. ``model``/``optimizer``/``scheduler`` as ``accelerator.prepare`` returned them.

    ``guard_kwargs`` go to :class:`~nanguard.Guard` (``config=``, presets, overrides). Returns the guard;
    call ``guard.close()`` at the end (or use it as a context manager).
    """
    require("accelerate", extra="accelerate", feature="nanguard.integrations.accelerate")
    inner = inner_optimizer(optimizer)
    user_model = _unwrap(accelerator, model)
    guard = IntegrationGuard(
        user_model, inner, out_dir=out_dir, scaler=getattr(accelerator, "scaler", None),
        replay_wrappers=[model] if model is not user_model else [], **guard_kwargs,
    )
    report_skips_to(optimizer, guard)
    if scheduler is not None and not _honours_step_was_skipped(scheduler):  # AcceleratedScheduler reads step_was_skipped
        guard.attach_scheduler(scheduler)
    note_clip_norms(accelerator, guard)
    return guard


def _unwrap(accelerator: Any, model: torch.nn.Module) -> torch.nn.Module:
    unwrap = getattr(accelerator, "unwrap_model", None)
    if callable(unwrap):
        try:
            return unwrap(model)  # type: ignore[no-any-return]
        except Exception:  # an older accelerate or an unusual wrapper: fall back to the generic unwrap
            pass
    return dist_utils.unwrap_model(model)


def _honours_step_was_skipped(scheduler: Any) -> bool:
    return type(scheduler).__name__ == "AcceleratedScheduler"


def is_accelerated_optimizer(optimizer: Any) -> bool:
    return type(optimizer).__name__ == "AcceleratedOptimizer" and hasattr(optimizer, "gradient_state")


def report_skips_to(optimizer: Any, guard: IntegrationGuard) -> None:
    """Make an ``AcceleratedOptimizer`` report the guard's skips as ``step_was_skipped`` (until the guard closes).

    Also re-points Accelerate's fp16 step patching at the guarded step: without that, the
    ``AcceleratedOptimizer`` would call (and re-install) the optimizer's original, unguarded ``step``.
    """
    if not is_accelerated_optimizer(optimizer):
        return
    if getattr(optimizer, "scaler", None) is not None and hasattr(optimizer, "_optimizer_original_step_method"):
        from accelerate.optimizer import patch_optimizer_step

        guard.patch(optimizer, "_optimizer_original_step_method", guard.optimizer.step)
        guard.patch(optimizer, "_optimizer_patched_step_method", patch_optimizer_step(optimizer, guard.optimizer.step))
        guard.attach_scaler(optimizer.scaler)
    original = optimizer.step

    def step(self: Any, closure: Any = None) -> Any:
        synced = bool(self.gradient_state.sync_gradients)
        skipped_before = guard.skipped_total
        result = original(closure)
        if synced:
            skipped = guard.skipped_total > skipped_before
            overflow = bool(self._is_overflow) if self.scaler is not None else False
            self._is_overflow = overflow or skipped
        return result

    step.__wrapped__ = original  # type: ignore[attr-defined]
    if getattr(original, "_wrapped_by_lr_sched", False):
        step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]  # what an LR scheduler checks for
    guard.patch(optimizer, "step", types.MethodType(step, optimizer))


def note_clip_norms(accelerator: Any, guard: IntegrationGuard) -> None:
    """Hand the norm ``accelerator.clip_grad_norm_`` computes to the guard (it is the same quantity)."""
    original = accelerator.clip_grad_norm_
    owned = {id(p) for group in guard.optimizer.param_groups for p in group["params"]}

    def clip_grad_norm_(parameters: Any, max_norm: float, norm_type: float = 2) -> Any:
        params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
        norm = original(params, max_norm, norm_type=norm_type)
        if isinstance(norm, torch.Tensor) and norm_type == 2:
            counted = sum(1 for p in params if p.grad is not None and id(p) in owned)
            guard.note_clip_norm(dist_utils.materialize(norm), counted)
        return norm

    clip_grad_norm_.__wrapped__ = original  # type: ignore[attr-defined]
    guard.patch(accelerator, "clip_grad_norm_", clip_grad_norm_)
