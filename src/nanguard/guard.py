"""The guard a user sees: wiring of the parts, ``attach_*``, ``close``, and ``state_dict``.

Two ways to use it, one per style of loop::

    guard = nanguard.Guard(model, optimizer)      # then train exactly as before:
    loss.backward(); optimizer.step()             #   every step is now checked

    loss = guard.step(closure)                    # closure = zero_grad + forward + loss + backward

Each concern has one owner, and this class only wires them together:

* :mod:`nanguard.step` checks each step on the device and turns it into a verdict
  (``apply`` runs the guarded ``optimizer.step()``, ``detector`` owns the statistics, ``losses`` decides
  whose loss a ``backward()`` was);
* :mod:`nanguard.actions` acts on verdicts (``respond``), through the escalation ``policy``, ``rollback``
  snapshots, the ``lr`` multiplier and scheduler hold, and the ``divergence`` watch;
* :mod:`nanguard.forensics` diagnoses bad steps within a budget (``desk``);
* :mod:`nanguard.records` writes the run down; :mod:`nanguard.patches` holds every patch, and
  ``close()`` undoes them all.

The guard's own state (statistics, counters, LR multiplier, step count) travels with
:meth:`Guard.state_dict`, to be saved next to the user's checkpoint.
"""

from __future__ import annotations

import sys
import types
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from nanguard import distributed as dist_utils
from nanguard.actions.divergence import DivergenceWatch
from nanguard.actions.lr import LearningRate
from nanguard.actions.policy import EscalationPolicy
from nanguard.actions.respond import Parts, Responder
from nanguard.actions.rollback import Rollback
from nanguard.config import GuardConfig, resolve_config
from nanguard.errors import ConfigError, TrainingAborted, UsageError
from nanguard.events import Event
from nanguard.forensics import watch as recording
from nanguard.forensics.desk import Desk
from nanguard.forensics.request import StepCapture
from nanguard.patches import Lease, Patches
from nanguard.records import RunRecords, Sink, Tally
from nanguard.state import RngState, Subjects
from nanguard.step import misuse as misuse_watch
from nanguard.step import scaler as scaler_watch
from nanguard.step.apply import StepPipeline
from nanguard.step.detector import Detector
from nanguard.step.losses import BOOK

STATE_VERSION = 1


class Guard:
    """Guards one optimizer (and the model(s) it trains). See the module docstring."""

    def __init__(
        self,
        model: torch.nn.Module | Sequence[torch.nn.Module] | None,
        optimizer: torch.optim.Optimizer,
        *,
        config: GuardConfig | str | dict[str, Any] | None = None,
        scheduler: Any = None,
        scaler: Any = None,
        out_dir: str | Path | None = None,
        sinks: Iterable[Sink] = (),
        records: RunRecords | None = None,
        **overrides: Any,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise UsageError(f"Guard(optimizer=...) needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.config = resolve_config(config, **overrides)
        models = [] if model is None else [model] if isinstance(model, torch.nn.Module) else list(model)
        self.subjects = Subjects(optimizer, models)
        self.rank = dist_utils.rank()
        self.out_dir = Path(out_dir if out_dir is not None else self.config.out_dir)
        self._own_records = records is None
        self.records = records or RunRecords(self.out_dir, self.config, writer=self.rank == 0, sinks=sinks)
        self.out_dir = self.records.out_dir  # a sub-directory when another writer holds the one asked for
        self.tally = Tally()
        self.events: list[Event] = []
        self.detector = Detector(self.config)
        self.policy = EscalationPolicy(self.config)
        self.lr = LearningRate(self.config, optimizer)
        self.rollback = Rollback(self.config, self.subjects, extra=lambda: {"detector": self.detector.state_dict()})
        self.divergence = DivergenceWatch(self.config)
        self.desk = Desk(self.config, self.subjects, self.detector)
        parts = Parts(self.config, self.subjects, self.detector, self.policy, self.lr, self.rollback, self.divergence,
                      self.desk, self.records, self.tally, self.events, self.rank)
        self.responder = Responder(parts, close=self.close)
        self.pipeline = StepPipeline(parts, self.responder, on_step_start=self._on_step_start)
        # Set by zero-code mode: how to find the trained model(s) later if none was visible at construction.
        self.find_models: Callable[[], list[torch.nn.Module]] | None = None
        self._patches = Patches()
        self._watching: list[tuple[torch.nn.Module, Lease]] = []
        self._scaler_leases: list[Lease] = []
        self._closed = False
        self._install(scaler, scheduler)

    # ------------------------------------------------------------------ wiring
    def _install(self, scaler: Any, scheduler: Any) -> None:
        optimizer = self.optimizer
        original = optimizer.step
        pipeline = self.pipeline

        def guarded_step(opt: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
            return pipeline.run(original, args, kwargs)

        guarded_step.__wrapped__ = original  # type: ignore[attr-defined]
        # The step sets ``_opt_called`` itself: an LR scheduler created later need not wrap it (and a wrap
        # around ours could not be undone on close).
        guarded_step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
        guarded_step._nanguard_pipeline = pipeline  # type: ignore[attr-defined]
        # A bound method, as LR schedulers expect to find (they wrap ``step.__func__``).
        self._patches.replace(optimizer, "step", types.MethodType(guarded_step, optimizer))
        for model in self.models:
            self._watch(model)
        BOOK.register(pipeline, self.subjects.params())
        self._scaler_leases = scaler_watch.watch(pipeline, optimizer)
        self._misuse_leases = misuse_watch.watch(pipeline.stall.misuse)
        if scaler is not None:
            self.attach_scaler(scaler)
        if scheduler is not None:
            self.attach_scheduler(scheduler)

    def _watch(self, model: torch.nn.Module) -> None:
        self._watching.append((model, recording.watch(model, self.pipeline)))

    def _on_step_start(self, step: int) -> bool:
        """Work for the first step(s); returns whether the next step needs it too."""
        if not self.models and self.find_models is not None:
            # Zero-code mode found no model when the optimizer was built: look again from the training loop.
            for model in self.find_models():
                self.attach_model(model)
            self.find_models = None
        self.rollback.on_step_start(step)
        return not len(self.rollback) and bool(self.config.snapshot_every)

    def attach_model(self, model: torch.nn.Module) -> None:
        if any(model is m for m in self.models) or self._closed:
            return
        self.models.append(model)
        self._watch(model)
        self.rollback.reset()  # earlier snapshots do not cover this model
        self.pipeline._starting = True  # the next step takes the first snapshot again

    def attach_scaler(self, scaler: Any) -> None:
        """Watch a ``torch.amp.GradScaler``: read unscaled losses and count the steps it skips."""
        self.subjects.scaler = scaler
        if self._closed:
            return
        if not isinstance(scaler, torch.amp.GradScaler) or any(
                n in type(scaler).__dict__ for n in ("scale", "step")):
            self._scaler_leases += scaler_watch.watch(self.pipeline, self.optimizer, type(scaler))

    def attach_scheduler(self, scheduler: Any) -> None:
        """Keep an LR scheduler from advancing past a step the guard skipped (its state_dict stays untouched)."""
        self.subjects.scheduler = scheduler
        if not self._closed:
            self.lr.hold(scheduler)

    # ------------------------------------------------------------------ the user's calls
    def step(self, closure: Callable[[], Any]) -> torch.Tensor | None:
        """Run ``closure`` (zero_grad, forward, loss, backward; returns the loss) and a guarded optimizer step.

        The closure is also how forensics re-runs this exact step if it goes wrong.
        """
        rng = RngState.capture(full=False)
        BOOK.take(self.pipeline)  # a backward() before this step's closure is not this step's
        try:
            loss = closure()
        except Exception as exc:
            self.record_crash(exc)
            raise
        if isinstance(loss, torch.Tensor) and not BOOK.has(self.pipeline):
            self.observe_loss(loss)
        self.pipeline.inputs.closure = StepCapture(rerun=closure, rng_state=rng)
        if self.subjects.scaler_enabled:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        return loss

    def observe_loss(self, loss: torch.Tensor) -> None:
        """Tell the guard the loss of this step when it cannot see ``backward`` (e.g. a custom engine)."""
        self.pipeline.observe_loss(loss)

    def note_clip_norm(self, norm: torch.Tensor, num_tensors: int) -> None:
        """Reuse the total norm a ``clip_grad_norm_`` call already computed this step (no second pass)."""
        self.pipeline.note_clip_norm(norm, num_tensors)

    def flush(self) -> None:
        """Read back every outstanding verdict (waits for the device) and act on it."""
        self.pipeline.flush()

    def record_crash(self, exc: BaseException) -> Event | None:
        """The step itself raised (``Target 101 is out of bounds``, a BatchNorm batch of one): diagnose it from
        the batch and the error, and write an ``exception`` event (action ``abort``). The caller re-raises."""
        if isinstance(exc, (KeyboardInterrupt, TrainingAborted)) or self._closed:
            return None
        if dist_utils.is_peer_failure(exc):  # another rank died first: that rank writes the diagnosis
            warnings.warn(f"nanguard: rank {self.rank} stopped because another rank failed ({type(exc).__name__}); "
                          f"the failing rank's diagnosis is under {self.out_dir}", stacklevel=2)
            return None
        event = self.responder.on_exception(self.tally.steps, exc, self.pipeline.recorder.take())
        if not self.records.writer:  # only rank 0 writes the run's records: this rank writes its own crash
            dist_utils.write_rank_crash(self.out_dir, self.config, event, self.summary())
        return event

    def close(self, status: str = "finished") -> None:
        """Finish: act on outstanding verdicts, undo every patch, write the summary and the report."""
        if self._closed:
            return
        propagating = sys.exc_info()[1]  # close() in a ``finally:`` while the training loop raises
        if status == "finished" and isinstance(propagating, Exception) and not isinstance(propagating, TrainingAborted):
            self.record_crash(propagating)
            status = "error"
        if not self.responder.aborted:
            try:
                self.flush()
            except TrainingAborted:
                pass
            self.responder.release_held()
        self._closed = True
        self.pipeline.closed = True
        self._release()
        if self._own_records:
            self.records.close({**self.summary(), "status": status})

    def _release(self) -> None:
        stuck = self._patches.undo()
        if stuck:
            warnings.warn(f"nanguard: {', '.join(stuck)} was wrapped again after the guard replaced it, so it could not "
                          "be put back; the guard's part of it now passes every call straight through", stacklevel=3)
        for model, lease in self._watching:
            recording.unwatch(model, self.pipeline, lease)
        self._watching.clear()
        BOOK.unregister(self.pipeline)
        scaler_watch.unwatch(self.pipeline, self.optimizer, self._scaler_leases)
        self._scaler_leases = []
        misuse_watch.unwatch(self.pipeline.stall.misuse, self._misuse_leases)
        self._misuse_leases = []
        self.pipeline.stall.close()
        self.lr.release()
        self.pipeline.recorder.take()

    def summary(self) -> dict[str, Any]:
        t = self.tally
        return {
            "steps": t.steps, "skipped": t.skipped, "rollbacks": t.rollbacks, "clipped": t.clipped,
            "events": len(self.events), "lr_multiplier": self.lr.multiplier, "aborted": self.responder.aborted,
            "seconds": self.records.elapsed(), "causes": sorted({e.diagnosis.cause for e in self.events}),
        }

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):  # Ctrl-C, or a signal handler's exit: not a crash
            clean_exit = isinstance(exc, SystemExit) and exc.code in (None, 0)
            self.close(status="finished" if clean_exit else "interrupted")
            return
        failed = exc is not None and not isinstance(exc, TrainingAborted)
        if failed and exc is not None:
            self.record_crash(exc)
        self.close(status="error" if failed else "finished")

    # ------------------------------------------------------------------ resume
    def _stateful(self) -> dict[str, Any]:
        """Every part whose state a resumed run needs back (each has ``state_dict``/``load_state_dict``)."""
        return {"tally": self.tally, "detector": self.detector, "policy": self.policy, "lr": self.lr,
                "divergence": self.divergence, "forensics": self.desk, "responder": self.responder,
                "stall": self.pipeline.stall}

    def state_dict(self) -> dict[str, Any]:
        """The guard's state, to save next to the model's: statistics, counters, LR multiplier, step count.

        ``torch.save({"model": ..., "optimizer": ..., "nanguard": guard.state_dict()}, path)``; on resume,
        ``guard.load_state_dict(checkpoint["nanguard"])`` continues the run as it was (plain Python values:
        it loads with ``torch.load(path, weights_only=True)``).
        """
        self.flush()
        return {"version": STATE_VERSION, **{name: part.state_dict() for name, part in self._stateful().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ConfigError(f"Guard.load_state_dict: expected a dict from Guard.state_dict() with version "
                              f"{STATE_VERSION}, got {type(state).__name__} version {getattr(state, 'get', lambda k: None)('version')!r}")
        for name, part in self._stateful().items():
            if name in state:
                part.load_state_dict(state[name])

    # ------------------------------------------------------------------ read-only views
    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.subjects.optimizer  # type: ignore[return-value]

    @property
    def models(self) -> list[torch.nn.Module]:
        return self.subjects.models

    @property
    def scaler(self) -> Any:
        return self.subjects.scaler

    @property
    def scheduler(self) -> Any:
        return self.subjects.scheduler

    @property
    def step_count(self) -> int:
        return self.tally.steps

    @property
    def skipped_total(self) -> int:
        return self.tally.skipped

    @property
    def rollbacks_total(self) -> int:
        return self.tally.rollbacks

    @property
    def clipped_total(self) -> int:
        return self.tally.clipped

    @property
    def lr_multiplier(self) -> float:
        return self.lr.multiplier

    @property
    def device_mode(self) -> bool:
        return self.pipeline.device_mode

    @property
    def loss_history(self) -> list[float]:
        return list(self.detector.loss_history)

    @property
    def closed(self) -> bool:
        return self._closed


__all__ = ["Guard"]
