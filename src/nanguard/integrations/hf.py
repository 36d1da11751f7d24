"""Hugging Face ``transformers.Trainer``: every optimizer step guarded, by a callback.

::

    trainer = Trainer(model=model, args=args, train_dataset=ds)
    guard_trainer(trainer)                 # or Trainer(..., callbacks=[NanguardCallback()])
    trainer.train()

A ``TrainerCallback`` can observe but not skip a step, so the callback does its work through the guard:

* ``on_train_begin`` runs after ``train()`` created the optimizer and ``accelerator.prepare`` wrapped it:
  the guard wraps ``step`` of the ``torch.optim.Optimizer`` inside the ``AcceleratedOptimizer``, so a bad
  step is skipped for real; its gradient norm is the one ``accelerator.clip_grad_norm_`` computed *before*
  the Trainer clipped (reused, and nothing more is clipped), and its step numbers are ``global_step``'s;
* a step that raises is recorded as an ``exception`` event: by ``guard_trainer``'s wrapper of ``train()``, or,
  for a bare callback, by the ``sys.excepthook`` an integration guard holds while open;
* a skipped step sets Accelerate's ``step_was_skipped``, so the Trainer does not advance the LR
  scheduler for it (``accelerator.optimizer_step_was_skipped``);
* the loss reaches the guard through ``loss.backward()`` (summed over gradient-accumulation micro-batches);
* ``args.logging_nan_inf_filter`` (on by default) logs the running average in place of a NaN loss. It
  stays on (turned off, one NaN would poison every later logged loss, since the Trainer resets its loss
  accumulator by subtracting it from itself), but the non-finite step is not hidden: each log entry
  gains ``nanguard_skipped``, ``nanguard_events`` and ``nanguard_nonfinite_loss`` (steps with a
  non-finite loss since the last log), and a warning names the step and the files with the true loss;
* the guard's model is ``trainer.model`` (names as in the user's ``named_modules()``), its records go to
  ``<output_dir>/nanguard`` unless ``out_dir`` is given, and only the main process writes them.
"""

from __future__ import annotations

import functools
import sys
import types
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nanguard import distributed as dist_utils
from nanguard._optional import require
from nanguard.errors import UsageError
from nanguard.integrations._guard import IntegrationGuard, inner_optimizer

if TYPE_CHECKING:
    from transformers import TrainerCallback as _CallbackBase
    from transformers.trainer_callback import ExportableState as _Exportable
else:
    _transformers = require("transformers", extra="hf", feature="nanguard.integrations.hf")
    _CallbackBase = _transformers.TrainerCallback
    _Exportable = getattr(_transformers.trainer_callback, "ExportableState", object)


class NanguardCallback(_CallbackBase, _Exportable):
    """Guards every optimizer step of a ``Trainer``. ``guard_kwargs`` go to :class:`~nanguard.Guard`.

    The guard's state travels in the Trainer's checkpoints (``TrainerState.stateful_callbacks``); the Trainer
    puts it back on ``resume_from_checkpoint`` when ``restore_callback_states_from_checkpoint=True``.
    """

    def __init__(self, *, out_dir: str | Path | None = None, trainer: Any = None, **guard_kwargs: Any) -> None:
        self.out_dir = out_dir
        self.guard_kwargs = guard_kwargs
        self.trainer = trainer
        self.guard: IntegrationGuard | None = None
        self.guard_state: dict[str, Any] | None = None
        self._seen_events = 0
        self._nonfinite_since_log = 0
        self._warned = False

    # -- Trainer events ------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       lr_scheduler: Any = None, **kwargs: Any) -> None:
        if self.trainer is None:
            self.trainer = _calling_trainer(self)
        self._bind(args, model, optimizer, lr_scheduler)
        if self.guard is not None and state is not None:
            self.guard.align_step(int(getattr(state, "global_step", 0) or 0))

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                              lr_scheduler: Any = None, **kwargs: Any) -> None:
        # The optimizer may have been replaced since train() began (a second train(), a custom loop).
        if optimizer is not None and (self.guard is None or inner_optimizer(optimizer) is not self.guard.optimizer):
            self._bind(args, model, optimizer, lr_scheduler)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        guard = self.guard
        if guard is None:
            return
        for event in guard.events[self._seen_events:]:
            if event.trigger == "nonfinite_loss":
                self._nonfinite_since_log += 1
                if not self._warned and getattr(args, "logging_nan_inf_filter", False):
                    self._warned = True
                    warnings.warn(
                        f"nanguard: step {event.step} had a non-finite loss ({event.action}). The Trainer logs the running "
                        f"average in its place (logging_nan_inf_filter=True); the true per-step loss is in "
                        f"{guard.out_dir / 'history.csv'} and the diagnosis in {guard.out_dir / 'events.jsonl'}",
                        stacklevel=2,
                    )
        self._seen_events = len(guard.events)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        guard = self.guard
        if guard is None or logs is None:
            return
        extra = {"nanguard_skipped": guard.skipped_total, "nanguard_events": len(guard.events),
                 "nanguard_nonfinite_loss": self._nonfinite_since_log}
        self._nonfinite_since_log = 0
        logs.update(extra)
        history = getattr(state, "log_history", None)
        if history and history[-1].get("step") == state.global_step and "nanguard_events" not in history[-1]:
            history[-1].update(extra)  # the Trainer appended a copy of ``logs`` just before calling us

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.close()

    # -- guard lifecycle ------------------------------------------------------------------------
    def _bind(self, args: Any, model: Any, optimizer: Any, lr_scheduler: Any) -> None:
        if optimizer is None or model is None:
            raise UsageError("NanguardCallback: the Trainer passed no model/optimizer to on_train_begin; "
                             "add the callback to a transformers.Trainer (Trainer(..., callbacks=[NanguardCallback()]))")
        inner = inner_optimizer(optimizer)
        if self.guard is not None:
            if self.guard.optimizer is inner:
                return
            self.close()
        from nanguard.integrations.accelerate import (
            is_accelerated_optimizer,
            note_clip_norms,
            report_skips_to,
        )

        out_dir = self.out_dir if self.out_dir is not None else Path(args.output_dir) / "nanguard"
        user_model = dist_utils.unwrap_model(model)
        accelerator = getattr(self.trainer, "accelerator", None)
        guard = IntegrationGuard(user_model, inner, out_dir=out_dir, scaler=getattr(accelerator, "scaler", None),
                                 **self.guard_kwargs)
        if is_accelerated_optimizer(optimizer):
            report_skips_to(optimizer, guard)  # the Trainer then skips the scheduler step itself
        elif lr_scheduler is not None:
            guard.attach_scheduler(lr_scheduler)
        if accelerator is not None:
            note_clip_norms(accelerator, guard)
        if self.guard_state is not None:
            guard.load_state_dict(self.guard_state)
            self.guard_state = None
        self.guard = guard
        self._seen_events = 0

    def state(self) -> dict[str, Any]:
        """What the Trainer saves with a checkpoint (JSON): the callback's options and the guard's state."""
        args = {k: v for k, v in self.guard_kwargs.items() if isinstance(v, (str, int, float, bool, type(None)))}
        if self.out_dir is not None:
            args["out_dir"] = str(self.out_dir)
        state = self.guard.state_dict() if self.guard is not None else self.guard_state
        return {"args": args, "attributes": {"guard_state": state}}

    def close(self, status: str = "finished") -> None:
        guard, self.guard = self.guard, None
        if guard is not None:
            guard.close(status=status)


def _calling_trainer(callback: NanguardCallback, depth: int = 8) -> Any:
    """The ``Trainer`` whose ``train()`` is calling us: the callback needs its ``accelerator`` to read the
    gradient norm *before* the Trainer clips it (``accelerator.clip_grad_norm_`` computes it anyway)."""
    frame: types.FrameType | None = sys._getframe(1)
    for _ in range(depth):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        handler = getattr(owner, "callback_handler", None)
        if owner is not None and callback in getattr(handler, "callbacks", ()):
            return owner
        frame = frame.f_back
    return None


def guard_trainer(trainer: Any, *, out_dir: str | Path | None = None, **guard_kwargs: Any) -> NanguardCallback:
    """Guard every step of ``trainer`` (one line, before ``trainer.train()``). Returns the callback;
    its ``guard`` attribute is the live :class:`~nanguard.Guard` during training.

    Also closes the guard (status ``error``) if ``train()`` raises, so records are flushed either way.
    """
    if not hasattr(trainer, "add_callback") or not hasattr(trainer, "args"):
        raise UsageError(f"guard_trainer needs a transformers.Trainer, got {type(trainer).__name__}")
    for existing in getattr(trainer.callback_handler, "callbacks", []):
        if isinstance(existing, NanguardCallback):
            warnings.warn("guard_trainer: this Trainer already has a NanguardCallback; keeping the existing one", stacklevel=2)
            existing.trainer = existing.trainer or trainer
            return existing
    callback = NanguardCallback(out_dir=out_dir, trainer=trainer, **guard_kwargs)
    trainer.add_callback(callback)
    train = trainer.train

    @functools.wraps(train)
    def guarded_train(*args: Any, **kwargs: Any) -> Any:
        try:
            return train(*args, **kwargs)
        except BaseException as exc:
            if callback.guard is not None:
                callback.guard.record_crash(exc)  # trigger ``exception``, as ``nanguard run`` writes it
            callback.close(status="error")
            raise

    trainer.train = guarded_train
    return callback
