"""The step lifecycle: check every optimizer step on the device, act before a bad update lands.

Two ways to use it, one per style of loop::

    guard = nanguard.Guard(model, optimizer)      # then train exactly as before:
    loss.backward(); optimizer.step()             #   every step is now checked

    loss = guard.step(closure)                    # closure = zero_grad + forward + loss + backward

Per step the guard computes, on the device and without synchronising: whether the loss is finite,
the total gradient norm (the quantity clipping computes; it is non-finite exactly when a gradient
is), a weight check at a configurable cadence, and z-scores of loss and grad norm against robust
running statistics. With a fused optimizer the verdict goes to the optimizer as ``found_inf`` (as
``torch.amp.GradScaler`` does) and clipping as ``grad_scale``, so a bad update is skipped and a big
one clipped inside the optimizer's own kernel; the host reads the verdict back later, asynchronously.
Other optimizers need one small synchronisation per step to decide whether to call ``step``.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
import types
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from nanguard import distributed as dist_utils
from nanguard.capture import StepRecorder, is_library_module, named_call_arguments, tensors_from_traceback
from nanguard.config import GuardConfig, resolve_config
from nanguard.errors import TrainingAborted, UsageError
from nanguard.events import Diagnosis, Event
from nanguard.forensics.request import InvestigationRequest, RngState, StepCapture
from nanguard.policy import DATA_CAUSES, STATE_CAUSES, EscalationPolicy
from nanguard.record import EventLog, HistoryLog, NullSink, Sink, write_json_atomic
from nanguard.signals import DeviceReadback, all_finite, grads_of, scale_grads_, total_norm
from nanguard.snapshot import SnapshotRing, restore, save_checkpoint
from nanguard.spikes import RunningStats
from nanguard.triage import quick_diagnosis

# Layout of the per-step flag vector read back to the host.
F_LOSS, F_NORM, F_LOSS_BAD, F_GRAD_BAD, F_WEIGHTS_BAD, F_LOSS_SPIKE, F_GRAD_SPIKE = range(7)
F_CLIPPED, F_SCALER_OVERFLOW, F_BAD, F_POST_WEIGHTS_BAD, F_LOSS_SCALE, F_HAS_LOSS = range(7, 13)
N_FLAGS = 13

_ACTIVE_GUARDS: weakref.WeakSet[Guard] = weakref.WeakSet()
_SCHEDULER_GUARDS: weakref.WeakKeyDictionary[Any, Guard] = weakref.WeakKeyDictionary()
_BACKWARD_PATCHED = False


def _install_backward_patch() -> None:
    """Route every ``backward()`` through the active guards, so they see the loss without code changes.

    Only ``torch.autograd.backward`` is patched: ``Tensor.backward`` looks it up at call time, so both
    spellings pass through exactly once.
    """
    global _BACKWARD_PATCHED
    if _BACKWARD_PATCHED:
        return
    _BACKWARD_PATCHED = True
    original_autograd_backward = torch.autograd.backward

    def autograd_backward(tensors: Any, grad_tensors: Any = None, *args: Any, **kwargs: Any) -> Any:
        if isinstance(tensors, torch.Tensor) and _ACTIVE_GUARDS:
            gradient = grad_tensors if isinstance(grad_tensors, torch.Tensor) else None
            for guard in _guards_owning(tensors):
                guard._on_backward(tensors, gradient)
        return original_autograd_backward(tensors, grad_tensors, *args, **kwargs)

    autograd_backward.__wrapped__ = original_autograd_backward  # type: ignore[attr-defined]
    torch.autograd.backward = autograd_backward  # type: ignore[assignment]


def _guards_owning(tensor: torch.Tensor) -> list[Guard]:
    """Which guards a ``backward()`` belongs to. With two guarded models in one process (a GAN, a teacher and a
    student) each guard must count only its own loss: the one whose model returned the tensor or whose
    outputs it was computed from. Guards that cannot tell (no model, or hooks that never fired, as under some
    compilers) get every loss nobody else claimed."""
    guards = list(_ACTIVE_GUARDS)
    watching = [g for g in guards if g.models and g._forward_seen]
    owners = [g for g in watching if g.recorder.produced_by_watched_call(tensor)]
    return owners or [g for g in guards if g not in watching]


def _is_fused(optimizer: torch.optim.Optimizer) -> bool:
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and bool(optimizer.defaults.get("fused"))


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
        own_records: bool = True,
        **overrides: Any,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise UsageError(f"Guard(optimizer=...) needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.config = resolve_config(config, **overrides)
        self.models: list[torch.nn.Module] = [] if model is None else [model] if isinstance(model, torch.nn.Module) else list(model)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scaler = scaler
        self.rank = dist_utils.rank()
        self.is_writer = self.rank == 0
        self.out_dir = Path(out_dir if out_dir is not None else self.config.out_dir)
        self._device_mode: bool | None = None
        # Tests set this to make a CPU run read verdicts back late, exactly as a CUDA run does.
        self._defer_host_verdict = False
        # True while forensics re-runs a step: its forward and backward are not this step's.
        self._replaying = False
        self._lockstep_step = -1
        self._forward_seen = False
        # Set by zero-code mode: how to find the trained model(s) later if none was visible at construction.
        self.find_models: Callable[[], list[torch.nn.Module]] | None = None

        self.step_count = 0
        self.skipped_total = 0
        self.rollbacks_total = 0
        self.clipped_total = 0
        self.events: list[Event] = []
        self.policy = EscalationPolicy(self.config)
        self.snapshots = SnapshotRing(self.config.snapshot_keep)
        self.readback = DeviceReadback()
        self.recorder = StepRecorder()
        spikes = self.config.spikes
        stats_args = {"alpha": spikes.ema_alpha, "warmup": spikes.warmup_steps, "clip_z": spikes.clip_z,
                      "peak_ratio": spikes.peak_ratio, "peak_decay": spikes.peak_decay}
        # Loss and grad norm side by side in one 2-vector: index 0 is the loss, 1 the gradient norm.
        self.stats = RunningStats(size=2, **stats_args)  # type: ignore[arg-type]
        self._spike_ratios = torch.tensor([spikes.loss_ratio, spikes.grad_ratio])
        self.loss_history: deque[float] = deque(maxlen=max(256, self.config.divergence_window))
        self.grad_history: deque[float] = deque(maxlen=256)
        # Per batch field: (step, abs-max) of recent batches; the event's own batch is left out when judging it.
        self.batch_scale_history: dict[str, deque[tuple[int, float]]] = {}
        self.scale_readback = DeviceReadback()
        self._batch_scale_names: dict[int, list[str]] = {}
        self._pending_loss: torch.Tensor | None = None
        self._scaled: dict[int, tuple[weakref.ref[torch.Tensor], torch.Tensor]] = {}
        self._user_norm: tuple[int, torch.Tensor] | None = None
        self._skip_remaining = 0
        self._scheduler_hold = False
        self._scaler_overflow_streak = 0
        self._investigations = 0
        self._closure_capture: StepCapture | None = None
        self._pending_captures: dict[int, tuple[StepCapture | None, dict[str, Any]]] = {}
        self._closed = False
        self._aborted = False
        self._started = time.time()
        self._param_cache: tuple[int, list[torch.Tensor]] | None = None
        self._hook_handles: list[Any] = []
        self._divergence_cooldown = 0
        self._best_loss_mean = float("inf")
        self._streak_start: int | None = None
        self._failed_snapshots: set[int] = set()
        self._last_restored: tuple[int, int] | None = None
        self._last_good_refs: tuple[StepCapture | None, list[Any], float] | None = None
        self._applied_lrs: deque[tuple[int, float]] = deque(maxlen=64)

        self.sinks: list[Sink] = list(sinks)
        if self.is_writer and own_records:
            _set_aside_previous_run(self.out_dir)
            self.sinks[:0] = [EventLog(self.out_dir / "events.jsonl"), HistoryLog(self.out_dir / "history.csv")]
            self.sinks += self._optional_sinks()
        self._own_records = own_records
        self._install()

    # ------------------------------------------------------------------ setup
    def _optional_sinks(self) -> list[Sink]:
        sinks: list[Sink] = []
        if self.config.console:
            try:
                from nanguard.console import LiveConsole

                sinks.append(LiveConsole())
            except ImportError:
                pass
        if self.config.tensorboard:
            from nanguard.tensorboard import TensorBoardSink

            sinks.append(TensorBoardSink(self.out_dir / "tensorboard"))
        return sinks or [NullSink()]

    def _install(self) -> None:
        original_step = self.optimizer.step
        guard = self

        def guarded_step(optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
            return guard._guarded_step(original_step, args, kwargs)

        guarded_step.__wrapped__ = original_step  # type: ignore[attr-defined]
        guarded_step._nanguard = self  # type: ignore[attr-defined]
        if getattr(original_step, "_wrapped_by_lr_sched", False):
            guarded_step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
        self._original_step = original_step
        # A bound method, as LR schedulers expect to find (they wrap ``step.__func__``).
        self.optimizer.step = types.MethodType(guarded_step, self.optimizer)  # type: ignore[method-assign]
        for model in self.models:
            self._hook_model(model)
        if self.scaler is not None:
            self.attach_scaler(self.scaler)
        if self.scheduler is not None:
            self.attach_scheduler(self.scheduler)
        _install_backward_patch()
        _ACTIVE_GUARDS.add(self)

    def _hook_model(self, model: torch.nn.Module) -> None:
        recorder = self.recorder
        guard = self

        def pre_hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if guard._replaying:
                return
            recorder.on_forward_start(module, args, kwargs)
            if torch.is_grad_enabled():
                guard._watch_batch_scale(module, args, kwargs)

        def post_hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            if guard._replaying:
                return
            guard._forward_seen = True
            recorder.on_forward_end(module, output)

        self._hook_handles.append(model.register_forward_pre_hook(pre_hook, with_kwargs=True))
        self._hook_handles.append(model.register_forward_hook(post_hook, with_kwargs=True))

    def attach_model(self, model: torch.nn.Module) -> None:
        if any(model is m for m in self.models):
            return
        self.models.append(model)
        self._hook_model(model)
        self.snapshots = SnapshotRing(self.config.snapshot_keep)

    def attach_scaler(self, scaler: Any) -> None:
        """Watch a ``torch.amp.GradScaler``: read unscaled losses and count the steps it skips."""
        self.scaler = scaler
        if getattr(scaler, "_nanguard_guard", None) is self:
            return
        scaler._nanguard_guard = self
        original_scale, original_step = scaler.scale, scaler.step
        guard = self

        def scale(outputs: Any) -> Any:
            scaled = original_scale(outputs)
            if isinstance(outputs, torch.Tensor) and isinstance(scaled, torch.Tensor):
                guard._note_scaled(scaled, outputs)
            return scaled

        def step(optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
            if optimizer is not guard.optimizer:
                return original_step(optimizer, *args, **kwargs)
            before = guard.step_count
            result = original_step(optimizer, *args, **kwargs)
            if guard.step_count == before:  # GradScaler found inf and did not call optimizer.step()
                guard._on_scaler_skip()
            return result

        scaler.scale, scaler.step = scale, step

    def attach_scheduler(self, scheduler: Any) -> None:
        """Keep an LR scheduler from advancing past a step the guard skipped.

        The hold is installed on the scheduler's class, not the instance: a scheduler's ``state_dict()``
        is its ``__dict__``, and the user's checkpoints must not pick up nanguard objects.
        """
        self.scheduler = scheduler
        _SCHEDULER_GUARDS[scheduler] = self
        cls = type(scheduler)
        if getattr(cls.step, "_nanguard_hold", False):
            return
        original = cls.step

        def step(sched: Any, *args: Any, **kwargs: Any) -> Any:
            guard = _SCHEDULER_GUARDS.get(sched)
            if guard is not None and guard._scheduler_hold and not guard.config.advance_scheduler_on_skip:
                guard._scheduler_hold = False
                return None
            return original(sched, *args, **kwargs)

        step._nanguard_hold = True  # type: ignore[attr-defined]
        cls.step = step

    @property
    def device_mode(self) -> bool:
        """Decided at the first step: a subclass sets ``fused`` support after ``Optimizer.__init__`` returns."""
        if self._device_mode is None:
            fused = _is_fused(self.optimizer)
            mode = self.config.sync_mode
            if mode == "device" and not fused:
                warnings.warn("nanguard: sync_mode='device' needs a fused optimizer (fused=True); using one sync per step", stacklevel=3)
            self._device_mode = fused and mode in ("auto", "device")
        return self._device_mode

    def _note_scaled(self, scaled: torch.Tensor, loss: torch.Tensor) -> None:
        self._scaled[id(scaled)] = (weakref.ref(scaled), loss)
        if len(self._scaled) > 64:
            self._scaled = {k: v for k, v in self._scaled.items() if v[0]() is not None}

    @property
    def scaler_enabled(self) -> bool:
        return self.scaler is not None and bool(getattr(self.scaler, "is_enabled", lambda: False)())

    # ------------------------------------------------------------------ observation hooks
    def _on_backward(self, tensor: torch.Tensor, gradient: Any) -> None:
        if self._replaying:
            return
        loss: torch.Tensor | None = None
        hit = self._scaled.pop(id(tensor), None)
        if hit is not None and hit[0]() is tensor:
            loss = hit[1]
        elif tensor.numel() == 1:
            loss = tensor
        self.recorder.on_backward(tensor, gradient if isinstance(gradient, torch.Tensor) else None, loss)
        if loss is not None and loss.numel() == 1:
            value = loss.detach().float().reshape(())
            self._pending_loss = value if self._pending_loss is None else self._pending_loss + value

    def observe_loss(self, loss: torch.Tensor) -> None:
        """Tell the guard the loss of this step when it cannot see ``backward`` (e.g. a custom engine)."""
        value = loss.detach().float().reshape(())
        self._pending_loss = value if self._pending_loss is None else self._pending_loss + value

    def note_clip_norm(self, norm: torch.Tensor, num_tensors: int) -> None:
        """Reuse the total norm a ``clip_grad_norm_`` call already computed this step (no second pass)."""
        self._user_norm = (num_tensors, norm.detach())

    def _watch_batch_scale(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        named = named_call_arguments(module, args, kwargs)
        names = [n for n, t in named.items() if t.is_floating_point() and t.numel()]
        if not names:
            return
        if self.step_count in self._batch_scale_names:
            return  # one sample of scale per step is enough (later micro-batches are alike)
        tensors = [named[n].detach() for n in names]
        self._batch_scale_names[self.step_count] = names
        self.scale_readback.push(self.step_count, [t.abs().amax() for t in tensors])
        if len(self._batch_scale_names) > 16:
            self._fold_batch_scales()
            for stale in sorted(self._batch_scale_names)[:-16]:
                del self._batch_scale_names[stale]

    # ------------------------------------------------------------------ the step
    def step(self, closure: Callable[[], Any]) -> torch.Tensor | None:
        """Run ``closure`` (zero_grad, forward, loss, backward; returns the loss) and a guarded optimizer step.

        The closure is also how forensics re-runs this exact step if it goes wrong.
        """
        rng = RngState.capture()
        self.recorder.reset()
        self._pending_loss = None
        try:
            loss = closure()
        except Exception as exc:
            self.record_crash(exc)
            raise
        if isinstance(loss, torch.Tensor) and self._pending_loss is None:
            self.observe_loss(loss)
        self._closure_capture = StepCapture(rerun=closure, rng_state=rng)
        if self.scaler_enabled:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        return loss

    def _params(self) -> list[torch.Tensor]:
        key = sum(len(g["params"]) for g in self.optimizer.param_groups)
        if self._param_cache is None or self._param_cache[0] != key:
            self._param_cache = (key, [p for g in self.optimizer.param_groups for p in g["params"]])
        return self._param_cache[1]

    def _guarded_step(self, original_step: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self._closed or self._aborted or isinstance(self.optimizer, torch.optim.LBFGS):
            # LBFGS re-evaluates its closure inside step(); it cannot take a verdict from outside.
            return original_step(*args, **kwargs)
        closure = kwargs.get("closure") if "closure" in kwargs else (args[0] if args and callable(args[0]) else None)
        if closure is not None and self._closure_capture is None:
            # optimizer.step(closure): run it ourselves so the step stays replayable.
            rng = RngState.capture()
            with torch.enable_grad():
                loss = closure()
            if isinstance(loss, torch.Tensor) and self._pending_loss is None:
                self.observe_loss(loss)
            self._closure_capture = StepCapture(rerun=closure, rng_state=rng)
            args, kwargs = (), {k: v for k, v in kwargs.items() if k != "closure"}
        step = self.step_count
        self.step_count += 1
        self.optimizer._opt_called = True  # type: ignore[attr-defined]  # what an LR scheduler checks for
        self.recorder.stop_recording()
        if not self.models and self.find_models is not None:
            # Zero-code mode found no model when the optimizer was built: look again from the training loop.
            for model in self.find_models():
                self.attach_model(model)
            self.find_models = None
        if self.config.snapshot_every and not len(self.snapshots):
            # The first snapshot is taken at the first step, not at construction: a script that loads a
            # checkpoint after creating its optimizer must roll back to the loaded state, not the initial one.
            self._take_snapshot()
        try:
            self._process_readbacks(wait_until=step - 1 if self.device_mode and dist_utils.is_distributed() else None)
            if self._skip_remaining > 0:
                self._skip_remaining -= 1
                self.skipped_total += 1
                self._scheduler_hold = True
                self._write_row(step, None, None, "skip", "")
                return None
            return self._check_and_step(step, original_step, args, kwargs)
        finally:
            self._pending_loss = None
            self._user_norm = None
            self._closure_capture = None
            if not self.device_mode:
                self.recorder.reset()

    def _check_and_step(self, step: int, original_step: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        cfg = self.config
        params = self._params()
        grads = grads_of(params)
        device = grads[0].device if grads else (params[0].device if params else torch.device("cpu"))
        self.stats.to(device)
        if self._spike_ratios.device != device:
            self._spike_ratios = self._spike_ratios.to(device)
        grad_scale = getattr(self.optimizer, "grad_scale", None)
        scaler_found_inf = getattr(self.optimizer, "found_inf", None)

        user_clipped = self._user_norm is not None and self._user_norm[0] >= len(grads) and grad_scale is None
        norm = self._user_norm[1].float().to(device) if user_clipped else total_norm(grads, device)  # type: ignore[index]
        if grad_scale is not None:
            norm = norm / grad_scale.float().to(device)
        has_loss = self._pending_loss is not None
        loss = self._pending_loss.to(device) if self._pending_loss is not None else torch.zeros((), device=device)
        signal = torch.stack([loss.float().reshape(()), norm.reshape(())])  # [loss, grad norm]
        nonfinite = ~torch.isfinite(signal)
        loss_bad, grad_bad = nonfinite[0], nonfinite[1]
        false = torch.zeros((), dtype=torch.bool, device=device)
        check_weights = cfg.check_weights_every and step % cfg.check_weights_every == 0
        weights_bad = ~all_finite(params, device) if check_weights and params else false
        spikes_on = cfg.spikes.enabled
        if spikes_on:
            spike = self.stats.is_spike(signal, cfg.spikes.skip_z, self._spike_ratios)
            loss_spike = spike[0] if has_loss else false
            grad_spike = spike[1]
        else:
            loss_spike = grad_spike = false
        if self.scaler_enabled:
            scaler_overflow = grad_bad & ~loss_bad
            if scaler_found_inf is not None:
                scaler_overflow = scaler_overflow | (scaler_found_inf.to(device) > 0)
        else:
            scaler_overflow = false
        bad = loss_bad | (grad_bad & ~scaler_overflow) | weights_bad | loss_spike | grad_spike

        one = torch.ones((), device=device)
        coef = one
        # When the script clipped already, its gradients are no longer what ``norm`` measured: clip nothing more.
        if cfg.clip_grad_norm is not None and not user_clipped:
            coef = torch.clamp(cfg.clip_grad_norm / (norm + 1e-6), max=1.0)
        if spikes_on and cfg.spikes.adaptive_clip and not user_clipped:
            limit = torch.where(self.stats.warm()[1], self.stats.clip_value()[1], torch.full((), float("inf"), device=device))
            coef = torch.minimum(coef, torch.clamp(limit / (norm + 1e-12), max=1.0))
        if coef is not one:
            coef = torch.where(grad_bad, one, coef)
        clipped = coef < 1.0

        if self.scaler_enabled and getattr(self.scaler, "_scale", None) is not None:
            loss_scale = self.scaler._scale.float().reshape(()).to(device)
        else:
            loss_scale = torch.zeros((), device=device)
        flags = torch.cat([
            signal,
            torch.stack([loss_bad, grad_bad, weights_bad, loss_spike, grad_spike, clipped, scaler_overflow, bad, false]).float(),
            torch.stack([loss_scale, torch.full((), float(has_loss), device=device)]),
        ])
        per_rank = dist_utils.gather_flags(flags)
        self._lockstep_step = step
        if per_rank.shape[0] > 1:
            # Every rank takes the same decision: the element-wise max over ranks of every flag, and the mean
            # loss (what history, divergence and spike statistics see, identically on every rank).
            merged = per_rank.amax(dim=0)
            mean_loss = per_rank[:, F_LOSS].nanmean().reshape(1)
            flags = torch.cat([mean_loss, flags[1:2], merged[2:F_POST_WEIGHTS_BAD], flags[F_POST_WEIGHTS_BAD:]])
            bad = merged[F_BAD] > 0
            scaler_overflow = merged[F_SCALER_OVERFLOW] > 0
        self._current_per_rank = per_rank

        if self.device_mode:
            return self._device_step(step, original_step, args, kwargs, flags, bad, scaler_overflow, coef, grad_scale, scaler_found_inf, params, device)
        return self._sync_step(step, original_step, args, kwargs, flags, coef, grads, params, device)

    def _apply_lr_multiplier(self) -> list[Any]:
        saved = [group["lr"] for group in self.optimizer.param_groups]
        if saved and not isinstance(saved[0], torch.Tensor):
            self._applied_lrs.append((self.step_count - 1, float(saved[0]) * self.policy.lr_multiplier))
        if self.policy.lr_multiplier != 1.0:
            for group in self.optimizer.param_groups:
                group["lr"] = group["lr"] * self.policy.lr_multiplier
        return saved

    def _restore_lr(self, saved: list[Any]) -> None:
        for group, lr in zip(self.optimizer.param_groups, saved, strict=False):
            group["lr"] = lr

    def _current_lr(self) -> float | None:
        lr = self.optimizer.param_groups[0].get("lr") if self.optimizer.param_groups else None
        if isinstance(lr, torch.Tensor):
            return None
        return float(lr) * self.policy.lr_multiplier if lr is not None else None

    def _update_stats(self, flags: torch.Tensor, accept: torch.Tensor) -> None:
        # Loss statistics learn only from steps that had a loss; gradient statistics not from scaler overflows.
        gates = torch.stack([flags[F_HAS_LOSS] > 0, ~(flags[F_SCALER_OVERFLOW] > 0)])
        self.stats.update(flags[F_LOSS:F_NORM + 1], accept & gates)

    def _sync_step(self, step: int, original_step: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                   flags: torch.Tensor, coef: torch.Tensor, grads: list[torch.Tensor], params: list[torch.Tensor], device: torch.device) -> Any:
        values = flags.tolist()  # the one synchronisation of this step
        capture, batch = self._capture_for_event(step) if values[F_BAD] else (None, {})
        if values[F_BAD]:
            self._update_stats(flags, torch.zeros((), dtype=torch.bool, device=device))
            self._handle_bad_step(step, values, capture=capture, batch=batch, update_applied=False)
            return None
        if values[F_SCALER_OVERFLOW]:
            self._scaler_skipped_step(values)
            return None
        if values[F_CLIPPED]:
            scale_grads_(grads, coef)
            self.clipped_total += 1
        saved = self._apply_lr_multiplier()
        try:
            result = original_step(*args, **kwargs)
        finally:
            self._restore_lr(saved)
        self._update_stats(flags, torch.ones((), dtype=torch.bool, device=device))
        post_bad = False
        cfg = self.config
        if cfg.check_weights_every and step % cfg.check_weights_every == 0 and params:
            post_bad = not bool(all_finite(params, device))
        if post_bad:
            values[F_POST_WEIGHTS_BAD] = 1.0
            self._handle_bad_step(step, values, capture=None, batch={}, update_applied=True)
            return result
        self._good_step(step, values, (self._closure_capture, list(self.recorder.calls)))
        return result

    def _device_step(self, step: int, original_step: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                     flags: torch.Tensor, bad: torch.Tensor, scaler_overflow: torch.Tensor, coef: torch.Tensor,
                     grad_scale: torch.Tensor | None, scaler_found_inf: torch.Tensor | None,
                     params: list[torch.Tensor], device: torch.device) -> Any:
        opt = self.optimizer
        had_scale, had_found = hasattr(opt, "grad_scale"), hasattr(opt, "found_inf")
        found = torch.maximum(bad.float(), scaler_overflow.float())
        opt.found_inf = found  # type: ignore[attr-defined]
        # Clipping folded into the fused kernel's unscale: grads / (grad_scale / coef) == grads * coef / grad_scale.
        base_scale = grad_scale.float().to(device) if grad_scale is not None else torch.ones((), device=device)
        opt.grad_scale = base_scale / coef  # type: ignore[attr-defined]
        saved = self._apply_lr_multiplier()
        try:
            result = original_step(*args, **kwargs)
        finally:
            self._restore_lr(saved)
            for attr, had, value in (("grad_scale", had_scale, grad_scale), ("found_inf", had_found, scaler_found_inf)):
                if had:
                    setattr(opt, attr, value)
                elif hasattr(opt, attr):
                    delattr(opt, attr)
        self._update_stats(flags, ~(found > 0))
        cfg = self.config
        if cfg.check_weights_every and step % cfg.check_weights_every == 0 and params:
            flags = flags.clone()
            flags[F_POST_WEIGHTS_BAD] = (~all_finite(params, device) & ~(found > 0)).float()
        self._pending_captures[step] = self._capture_refs(step)
        self.readback.push(step, list(flags.unbind()))
        if device.type != "cuda" and not self._defer_host_verdict:
            self._process_readbacks()  # reading a CPU tensor costs nothing: act at once
        return result

    # ------------------------------------------------------------------ host side of the verdict
    def _capture_refs(self, step: int) -> tuple[StepCapture | None, dict[str, Any]]:
        """Keep what a replay of ``step`` needs until its verdict is read back (references only)."""
        calls = list(self.recorder.calls)
        closure_capture = self._closure_capture
        self.recorder.calls = []
        # Keep only the last few steps' references.
        for old in [s for s in self._pending_captures if s < step - 4]:
            del self._pending_captures[old]
        return closure_capture, {"calls": calls}

    def _capture_for_event(self, step: int) -> tuple[StepCapture | None, dict[str, Any]]:
        """The replay recipe and named batch for the step being decided now (sync mode)."""
        return self._build_capture(self._closure_capture, list(self.recorder.calls))

    def _build_capture(self, closure_capture: StepCapture | None, calls: list[Any], rename: bool = True) -> tuple[StepCapture | None, dict[str, Any]]:
        recorder = StepRecorder()
        recorder.calls = calls
        if rename:
            batch, self._renamed = _rename_from_frames(recorder.batch())
        else:
            batch = recorder.batch()
        if closure_capture is not None:
            closure_capture.batch = batch
            return closure_capture, batch
        if not calls or not recorder.replayable():
            return None, batch
        first = calls[0]
        capture = StepCapture(
            rerun=recorder.build_rerun(),
            batch=batch,
            rng_state=first.rng,
            autocast_dtype=first.autocast[1] if first.autocast else None,
            device_type=first.autocast[0] if first.autocast else "cpu",
        )
        return capture, batch

    def _process_readbacks(self, wait: bool = False, wait_until: int | None = None) -> None:
        """Act on verdicts that reached the host. ``wait_until``: wait for those up to that step (under
        torch.distributed every rank must act on a verdict at the same step, not whenever its device is done)."""
        self._fold_batch_scales(wait)
        if wait_until is not None:
            items = self.readback.poll(wait=True, until=wait_until)
        else:
            items = self.readback.poll(wait=wait)
        for item in items:
            values = item.values()
            refs = self._pending_captures.pop(item.step, (None, {"calls": []}))
            if values[F_BAD]:
                capture, batch = self._build_capture(refs[0], refs[1].get("calls", []))
                self._handle_bad_step(item.step, values, capture=capture, batch=batch, update_applied=False, state_is_pre_step=item.step == self.step_count - 1)
            elif values[F_POST_WEIGHTS_BAD]:
                self._handle_bad_step(item.step, values, capture=None, batch={}, update_applied=True)
            elif values[F_SCALER_OVERFLOW]:
                self._scaler_skipped_step(values, step=item.step)
            else:
                if values[F_CLIPPED]:
                    self.clipped_total += 1
                self._good_step(item.step, values, (refs[0], refs[1].get("calls", [])))

    def _good_step(self, step: int, values: list[float], refs: tuple[StepCapture | None, list[Any]] | None = None) -> None:
        self.policy.on_good_step()
        self._streak_start = None
        if refs is not None and values[F_HAS_LOSS]:
            self._last_good_refs = (refs[0], refs[1], values[F_LOSS])
        self._scaler_overflow_streak = 0
        loss = values[F_LOSS] if values[F_HAS_LOSS] else None
        norm = values[F_NORM]
        if loss is not None:
            self.loss_history.append(loss)
        self.grad_history.append(norm)
        self._write_row(step, loss, norm, "clip" if values[F_CLIPPED] else "none", "", loss_scale=values[F_LOSS_SCALE])
        if self.config.snapshot_every and step > 0 and step % self.config.snapshot_every == 0:
            self._take_snapshot()
        self._check_divergence(step, values)

    def _fold_batch_scales(self, wait: bool = False) -> None:
        """Move batch abs-maxima that have reached the host into the per-field history (median-robust)."""
        for item in self.scale_readback.poll(wait=wait):
            names = self._batch_scale_names.pop(item.step, [])
            for name, value in zip(names, item.values(), strict=False):
                self.batch_scale_history.setdefault(name, deque(maxlen=64)).append((item.step, value))

    def _on_scaler_skip(self) -> None:
        """GradScaler skipped without calling ``optimizer.step()``: a normal overflow, unless the loss itself is bad."""
        loss = self._pending_loss
        self.recorder.stop_recording()
        try:
            loss_bad = torch.zeros(1) if loss is None else (~torch.isfinite(loss.detach().float().reshape(1))).float()
            per_rank = dist_utils.gather_flags(loss_bad)
            rows = torch.zeros(per_rank.shape[0], N_FLAGS)
            rows[:, F_LOSS_BAD] = per_rank[:, 0].cpu()
            self._current_per_rank = rows
            if bool(per_rank.amax() > 0):  # the scaler synchronised already; every rank decides alike
                if loss is None or bool(torch.isfinite(loss)):
                    loss = torch.tensor(float("nan"))
                self._lockstep_step = self.step_count
                step = self.step_count
                self.step_count += 1
                values = [float("nan")] * N_FLAGS
                values[F_LOSS], values[F_NORM] = float(loss), float("nan")
                for flag in (F_LOSS_BAD, F_GRAD_BAD, F_BAD, F_HAS_LOSS):
                    values[flag] = 1.0
                for flag in (F_WEIGHTS_BAD, F_LOSS_SPIKE, F_GRAD_SPIKE, F_CLIPPED, F_SCALER_OVERFLOW, F_POST_WEIGHTS_BAD):
                    values[flag] = 0.0
                values[F_LOSS_SCALE] = float(self.scaler.get_scale()) if self.scaler_enabled else 0.0
                capture, batch = self._capture_for_event(step)
                self._handle_bad_step(step, values, capture=capture, batch=batch, update_applied=False)
            else:
                values = [0.0] * N_FLAGS
                values[F_LOSS] = float(loss) if loss is not None else float("nan")
                values[F_HAS_LOSS] = float(loss is not None)
                values[F_NORM] = float("inf")
                values[F_LOSS_SCALE] = float(self.scaler.get_scale()) if self.scaler_enabled else 0.0
                step = self.step_count
                self.step_count += 1
                self._scaler_skipped_step(values, step=step)
        finally:
            self._pending_loss = None
            self._closure_capture = None
            self.recorder.reset()

    def _scaler_skipped_step(self, values: list[float] | None = None, step: int | None = None) -> None:
        """GradScaler's own overflow skip: normal early in fp16 training, an event only if it persists."""
        if step is None and values is None:
            step = self.step_count
            self.step_count += 1
        step = step if step is not None else self.step_count - 1
        self._scaler_overflow_streak += 1
        self.skipped_total += 1
        loss = values[F_LOSS] if values and values[F_HAS_LOSS] else None
        self._write_row(step, loss, values[F_NORM] if values else None, "skip", "",
                        loss_scale=values[F_LOSS_SCALE] if values else None)
        if self._scaler_overflow_streak >= self.config.scaler_overflow_patience:
            self._scaler_overflow_streak = 0
            scale = float(self.scaler.get_scale()) if self.scaler_enabled else float("nan")
            diagnosis = Diagnosis(
                cause="backward_overflow", phase="backward", confidence=0.6,
                evidence=[f"GradScaler skipped {self.config.scaler_overflow_patience} steps in a row; loss scale is now {scale:.3g}"],
                fixes=["find the layer whose gradients overflow float16 (run with the 'forensic' preset)",
                       "train in bf16 instead of fp16", "lower the learning rate"],
            )
            self._emit(Event(step=step, trigger="nonfinite_grad", action="skip", diagnosis=diagnosis,
                             loss=values[F_LOSS] if values else None, grad_norm=values[F_NORM] if values else None,
                             lr=self._current_lr(), rank=self.rank))

    def _check_divergence(self, step: int, values: list[float]) -> None:
        """A slow climb: the recent loss is ``divergence_ratio`` x the best smoothed loss of the run, rising."""
        window = self.config.divergence_window
        if self._divergence_cooldown > 0:
            self._divergence_cooldown -= 1
            return
        if len(self.loss_history) < window:
            return
        recent = list(self.loss_history)[-window:]
        quarter = window // 4
        means = [sum(recent[i * quarter:(i + 1) * quarter]) / quarter for i in range(4)]
        if not all(map(math.isfinite, means)):
            return
        self._best_loss_mean = min(self._best_loss_mean, *means)
        best = self._best_loss_mean
        rising = means[0] < means[1] < means[2] < means[3]
        if best > 0 and rising and means[3] > self.config.divergence_ratio * best:
            self._divergence_cooldown = window
            self._best_loss_mean = float("inf")
            self._handle_bad_step(step, values, capture=None, batch={}, update_applied=False, trigger_override="divergence",
                                  extra_evidence=[f"mean loss of the last {quarter} steps is {means[3]:.4g}, {means[3] / best:.2f}x the best "
                                                  f"smoothed loss {best:.4g} of the run, and it rose in each of the last 4 quarters of {window} steps"])

    def _trigger_of(self, values: list[float]) -> str:
        if values[F_POST_WEIGHTS_BAD] or values[F_WEIGHTS_BAD]:
            return "nonfinite_weights"
        if values[F_LOSS_BAD]:
            return "nonfinite_loss"
        if values[F_GRAD_BAD]:
            return "nonfinite_grad"
        if values[F_LOSS_SPIKE]:
            return "loss_spike"
        if values[F_GRAD_SPIKE]:
            return "grad_spike"
        return "nonfinite_grad"

    def _spike_summary(self) -> dict[str, float]:
        loss, grad = self.stats.host_summary(0), self.stats.host_summary(1)
        return {"loss_mean": loss["mean"], "loss_std": loss["std"], "loss_peak": loss["peak"], "grad_mean": grad["mean"],
                "grad_std": grad["std"], "grad_peak": grad["peak"], "warm_steps": loss["count"]}

    def _handle_bad_step(self, step: int, values: list[float], *, capture: StepCapture | None, batch: dict[str, Any],
                         update_applied: bool, state_is_pre_step: bool = True, trigger_override: str | None = None,
                         extra_evidence: Sequence[str] = ()) -> None:
        trigger = trigger_override or self._trigger_of(values)
        loss, norm = values[F_LOSS], values[F_NORM]
        if self._streak_start is None:
            self._streak_start = step
        bad_rank = self._bad_rank()
        diagnosis, details = self._diagnose(step, trigger, capture, batch, loss, norm, update_applied, state_is_pre_step)
        if extra_evidence:
            diagnosis.evidence = [*extra_evidence, *diagnosis.evidence]
        state_suspect = False
        if (trigger != "divergence" and not update_applied and diagnosis.cause not in DATA_CAUSES | STATE_CAUSES
                and not dist_utils.uses_sharded_parameters(self.models)):
            state_suspect, evidence = self._agreed(step, lambda: self._previous_batch_verdict(loss))
            if evidence:
                diagnosis.evidence.append(evidence)
            if state_suspect:
                self._blame_learning_rate(step, diagnosis)
        can_rollback = self.snapshots.newest_finite(weights_only=True) is not None
        decision = self.policy.decide(trigger, diagnosis.cause, can_rollback=can_rollback,
                                      update_applied=update_applied or state_suspect)
        if decision.action in ("skip", "rollback", "abort") and not update_applied:
            self.skipped_total += 1
            self._scheduler_hold = True
        if bad_rank is not None:
            details["rank_flags"] = self._current_per_rank.tolist() if hasattr(self, "_current_per_rank") else None
        event = Event(step=step, trigger=trigger, action=decision.action, diagnosis=diagnosis, loss=loss, grad_norm=norm,
                      lr=self._current_lr(), rank=bad_rank if bad_rank is not None else self.rank,
                      details={**details, "reason": decision.reason, "lr_multiplier": self.policy.lr_multiplier})
        if decision.rollback:
            event.details["rolled_back_to_step"] = self._rollback()
        elif decision.action == "skip":
            repaired = self._repair_buffers()
            if repaired:
                event.details["repaired_buffers"] = repaired
                diagnosis.evidence.append(f"the bad forward had written NaN/Inf into {', '.join(repaired[:4])}; restored from the newest snapshot")
        self._emit(event)
        self._write_row(step, loss, norm, decision.action, trigger, loss_scale=values[F_LOSS_SCALE])
        if decision.abort:
            self._abort(event, decision.reason)

    def _bad_rank(self) -> int | None:
        per_rank = getattr(self, "_current_per_rank", None)
        if per_rank is None or per_rank.shape[0] <= 1:
            return None
        rows = per_rank.tolist()
        for columns in ((F_LOSS_BAD,), (F_GRAD_BAD, F_WEIGHTS_BAD), (F_LOSS_SPIKE, F_GRAD_SPIKE)):
            for r, row in enumerate(rows):
                if any(row[c] > 0 for c in columns):
                    return r
        return None

    def _diagnose(self, step: int, trigger: str, capture: StepCapture | None, batch: dict[str, Any], loss: float, norm: float,
                  update_applied: bool, state_is_pre_step: bool) -> tuple[Diagnosis, dict[str, Any]]:
        """One diagnosis for every rank: under torch.distributed the rank that saw the fault diagnoses and the
        others receive its answer, so the policy (which depends on the cause) acts the same everywhere."""
        args = (step, trigger, capture, batch, loss, norm, update_applied, state_is_pre_step)
        in_lockstep = dist_utils.is_distributed() and step == self._lockstep_step and trigger != "divergence"
        if not in_lockstep:
            return self._diagnose_here(*args)
        sharded = dist_utils.uses_sharded_parameters(self.models)

        def diagnose() -> tuple[Diagnosis, dict[str, Any]]:
            # Under FSDP every forward all-gathers parameters: no rank may replay alone, so no replay at all.
            diagnosis, details = self._diagnose_here(*args, replay=not sharded)
            return diagnosis, {**details, "diagnosed_on_rank": self.rank}

        def fallback() -> tuple[Diagnosis, dict[str, Any]]:
            return Diagnosis(cause="unknown", evidence=["the diagnosis failed on the rank that saw the fault"]), {}

        result = dist_utils.diagnose_on_bad_rank(self._bad_rank(), diagnose, fallback, all_ranks=sharded)
        return result[0], dict(result[1])

    def _diagnose_here(self, step: int, trigger: str, capture: StepCapture | None, batch: dict[str, Any], loss: float,
                       norm: float, update_applied: bool, state_is_pre_step: bool, replay: bool = True,
                       ) -> tuple[Diagnosis, dict[str, Any]]:
        renamed = getattr(self, "_renamed", {})
        history = {renamed.get(k, k): [v for s, v in pairs if s < step] for k, pairs in self.batch_scale_history.items()}
        spike_stats = self._spike_summary()
        models = self.models or []
        if replay and self.config.forensics and self._investigations < self.config.forensics_max_events and trigger != "divergence":
            self._investigations += 1
            try:
                from nanguard import forensics

                investigate = getattr(forensics, "investigate", None)
                if investigate is not None:
                    request = InvestigationRequest(
                        step=step, trigger=trigger, models=models, optimizer=self.optimizer, capture=capture,
                        loss=loss, grad_norm=norm, lr=self._current_lr(), state_is_pre_step=state_is_pre_step,
                        update_made_weights_nonfinite=update_applied, scaler=self.scaler,
                        loss_history=list(self.loss_history), grad_norm_history=list(self.grad_history),
                        batch_scale_history=history, spike_stats=spike_stats,
                    )
                    started = time.perf_counter()
                    with self._replay_context():
                        result = investigate(request)
                    details = dict(getattr(result, "details", {}) or {})
                    details.setdefault("seconds", time.perf_counter() - started)
                    return result.diagnosis, details
            except Exception as exc:  # forensics must never take the run down
                warnings.warn(f"nanguard: forensics failed at step {step}: {exc!r}", stacklevel=2)
        diagnosis = quick_diagnosis(
            trigger=trigger, models=models, optimizer=self.optimizer, batch=batch, batch_scale_history=history,
            loss=loss, grad_norm=norm, spike_stats=spike_stats, update_made_weights_nonfinite=update_applied,
        )
        return diagnosis, {}

    def _agreed(self, step: int, decide: Callable[[], tuple[bool, str | None]]) -> tuple[bool, str | None]:
        """Run a host-side judgement on the bad rank and share it, so every rank acts on the same answer."""
        if not dist_utils.is_distributed():
            return decide()
        if step != self._lockstep_step:
            return False, None  # only this rank is here: no collective may be issued
        answer = dist_utils.diagnose_on_bad_rank(self._bad_rank(), decide, lambda: (False, None))
        return bool(answer[0]), answer[1]

    def _blame_learning_rate(self, step: int, diagnosis: Diagnosis) -> None:
        """The last update damaged the weights: if its learning rate jumped, that is the story to tell."""
        earlier = [(s, lr) for s, lr in self._applied_lrs if s < step]
        if len(earlier) < 4:
            return
        last_step, last_lr = earlier[-1]
        typical = sorted(lr for _, lr in earlier[:-1])[len(earlier[:-1]) // 2]
        if typical <= 0 or last_lr < 3.0 * typical:
            return
        diagnosis.phase = "optimizer"
        diagnosis.evidence.insert(0, f"the update at step {last_step} used lr={last_lr:.4g}, {last_lr / typical:.3g}x the "
                                     f"median lr {typical:.4g} of the steps before it: a learning-rate spike")
        diagnosis.fixes.insert(0, f"check the learning-rate schedule around step {last_step} (a warm-up or restart "
                                  "multiplier applied twice, a per-epoch scheduler stepped per batch, a wrong lambda)")
        diagnosis.confidence = max(diagnosis.confidence, 0.8)

    def _previous_batch_verdict(self, loss: float) -> tuple[bool, str | None]:
        """Is the state to blame rather than this batch? Re-run the last good batch on the current weights.

        If that batch, fine one step ago, now gives a non-finite or far larger loss, the last update damaged
        the weights (a learning-rate spike does this): skipping cannot help, rolling back can.
        """
        refs = self._last_good_refs
        if refs is None:
            return False, None
        capture, _ = self._build_capture(refs[0], refs[1], rename=False)
        if capture is None or capture.rerun is None:
            return False, None
        try:
            with self._replay_context(), _preserved(self.models, self._params()):
                if capture.rng_state is not None:
                    capture.rng_state.restore()
                now = capture.rerun()
            now_value = float(now.detach().float().sum()) if isinstance(now, torch.Tensor) else float("nan")
        except Exception:  # a replay that cannot run proves nothing either way
            return False, None
        then = refs[2]
        std = self.stats.host_summary(0)["std"]
        damaged = not math.isfinite(now_value) or (
            then > 0 and now_value > self.config.spikes.loss_ratio * then and now_value - then > 3 * std
        )
        verdict = "so the weights were damaged by the last update" if damaged else "so this batch, not the weights, is the problem"
        return damaged, f"the previous batch's loss was {then:.4g} one step ago and is {now_value:.4g} on the current weights, {verdict}"

    @contextlib.contextmanager
    def _replay_context(self) -> Iterator[None]:
        """While forensics re-runs a step: no recording, no loss accounting, and no talking to other ranks
        (DDP's gradient all-reduce is switched off)."""
        with dist_utils.isolated_replay(self._replay_models()):
            self._replaying = True
            try:
                yield
            finally:
                self._replaying = False

    def _replay_models(self) -> list[torch.nn.Module]:
        """Modules whose collectives a replay must switch off (integrations add framework wrappers)."""
        return list(self.models)

    # ------------------------------------------------------------------ actions
    def _take_snapshot(self) -> None:
        self.snapshots.take(self.step_count, self.models, self.optimizer, self.scaler if self.scaler_enabled else None,
                            None, extra={"stats": self.stats.state_dict()})

    def _repair_buffers(self) -> list[str]:
        """A skipped step's forward has already run: BatchNorm running statistics may hold its NaN.

        Skipping the update does not undo that, and eval would then return NaN. Non-finite buffers are put back
        from the newest snapshot (running statistics a few steps old are harmless; NaN ones are not).
        """
        bad = [(i, name, buf) for i, model in enumerate(self.models) for name, buf in model.named_buffers()
               if buf.is_floating_point() and not bool(torch.isfinite(buf).all())]
        if not bad:
            return []
        snap = self.snapshots.newest_finite()
        repaired = []
        with torch.no_grad():
            for i, name, buf in bad:
                saved = snap.models[i].get(name) if snap is not None and i < len(snap.models) else None
                if isinstance(saved, torch.Tensor) and saved.shape == buf.shape:
                    buf.copy_(saved)
                    repaired.append(name)
        return repaired

    def _rollback(self) -> int | None:
        """Restore the newest trustworthy snapshot.

        A snapshot taken right after the update that preceded the trouble may already hold that update's
        damage (a learning-rate bug leaves finite but ruined weights), so prefer one taken before it; and a
        snapshot that failed again soon after being restored is not used twice.
        """
        streak_start = self._streak_start if self._streak_start is not None else self.step_count
        recent = self._last_restored
        if recent is not None and self.step_count - recent[1] <= max(self.config.snapshot_every, 10):
            self._failed_snapshots.add(recent[0])
        snap = (self.snapshots.newest_finite(at_most=streak_start - 1, exclude=self._failed_snapshots)
                or self.snapshots.newest_finite(exclude=self._failed_snapshots)
                or self.snapshots.newest_finite())
        if snap is None:
            # No snapshot is finite throughout, e.g. a resumed checkpoint whose Adam moments hold NaN: restore the
            # weights from one whose weights are finite and start the broken optimizer buffers afresh.
            snap = self.snapshots.newest_finite(weights_only=True)
            if snap is None:
                return None
            restore(snap, self.models, self.optimizer, self.scaler if self.scaler_enabled else None, None)
            self._reset_nonfinite_optimizer_state()
            self._finish_rollback(snap.step)
            return snap.step
        self._last_restored = (snap.step, self.step_count)
        restore(snap, self.models, self.optimizer, self.scaler if self.scaler_enabled else None, None)
        self._finish_rollback(snap.step)
        return snap.step

    def _finish_rollback(self, snap_step: int) -> None:
        for param in self._params():
            param.grad = None
        self.rollbacks_total += 1
        self.policy.after_rollback()
        self._skip_remaining = self.config.skip_after_rollback

    def _reset_nonfinite_optimizer_state(self) -> None:
        """Zero optimizer buffers holding NaN/Inf (moments, momentum): as if those parameters started afresh."""
        with torch.no_grad():
            for state in self.optimizer.state.values():
                for value in state.values():
                    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() > 0 \
                            and not bool(torch.isfinite(value).all()):
                        value.zero_()

    def _abort(self, event: Event, reason: str) -> None:
        self._aborted = True
        snap = self.snapshots.newest_finite()
        checkpoint = None
        if snap is not None and self.is_writer:
            checkpoint = str(save_checkpoint(self.out_dir / "emergency_checkpoint.pt", snap, reason))
        message = (
            f"nanguard stopped the run at step {event.step}: {reason}. Last cause: {event.diagnosis.cause}"
            + (f" ({event.diagnosis.module or event.diagnosis.tensor})" if event.diagnosis.module or event.diagnosis.tensor else "")
            + (f". Emergency checkpoint of step {snap.step}: {checkpoint}" if checkpoint and snap else "")
            + f". Events: {self.out_dir / 'events.jsonl'}"
        )
        self.close(status="aborted")
        raise TrainingAborted(message, checkpoint=checkpoint)

    # ------------------------------------------------------------------ records
    def _emit(self, event: Event) -> None:
        rows = event.details.get("rank_flags")
        if isinstance(rows, list) and 0 <= event.rank < len(rows) and event.rank != self.rank:
            event.loss = rows[event.rank][F_LOSS]  # the loss of the rank that saw the fault, not this rank's
        self.events.append(event)
        if not self.is_writer:
            return
        payload = event.to_dict()
        for sink in self.sinks:
            sink.on_event(payload)

    def _write_row(self, step: int, loss: float | None, norm: float | None, action: str, trigger: str, loss_scale: float | None = None) -> None:
        if not self.is_writer:
            return
        if action == "none" and step % self.config.history_every:
            return
        row = {
            "step": step, "time": round(time.time() - self._started, 4), "loss": loss, "grad_norm": norm, "lr": self._current_lr(),
            "lr_multiplier": self.policy.lr_multiplier, "loss_scale": loss_scale if loss_scale else None, "action": action,
            "trigger": trigger, "skipped_total": self.skipped_total, "rollbacks_total": self.rollbacks_total, "clipped_total": self.clipped_total,
        }
        for sink in self.sinks:
            sink.on_step(row)

    def summary(self) -> dict[str, Any]:
        return {
            "steps": self.step_count, "skipped": self.skipped_total, "rollbacks": self.rollbacks_total,
            "clipped": self.clipped_total, "events": len(self.events), "lr_multiplier": self.policy.lr_multiplier,
            "aborted": self._aborted, "seconds": round(time.time() - self._started, 3),
            "causes": sorted({e.diagnosis.cause for e in self.events}),
        }

    def flush(self) -> None:
        """Read back every outstanding verdict (waits for the device) and act on it."""
        self._process_readbacks(wait=True)

    def close(self, status: str = "finished") -> None:
        """Finish: act on outstanding verdicts, write the summary and the report, detach from the optimizer."""
        if self._closed:
            return
        if not self._aborted:
            try:
                self.flush()
            except TrainingAborted:
                pass
        self._closed = True
        self.recorder.reset()
        _ACTIVE_GUARDS.discard(self)
        for handle in self._hook_handles:
            handle.remove()
        if getattr(getattr(self.optimizer.step, "__func__", None), "_nanguard", None) is self:
            self.optimizer.step = self._original_step  # type: ignore[method-assign]
        summary = {**self.summary(), "status": status}
        if self.is_writer and self._own_records:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.out_dir / "summary.json", summary)
            for sink in self.sinks:
                sink.close(summary)
            if self.config.report:
                self._write_report()

    def _write_report(self) -> None:
        try:
            from nanguard.report import render_report
        except ImportError:
            return
        try:
            render_report(self.out_dir)
        except Exception as exc:  # a report must never turn a finished run into a failed one
            warnings.warn(f"nanguard: could not write the report in {self.out_dir}: {exc}", stacklevel=2)

    def record_crash(self, exc: BaseException) -> Event | None:
        """The step itself raised (``Target 101 is out of bounds``, a BatchNorm batch of one): diagnose it from
        the batch and the error, and write an ``abort`` event. The caller re-raises; the user's error stays."""
        if isinstance(exc, (KeyboardInterrupt, TrainingAborted)) or self._closed:
            return None
        self.recorder.stop_recording()
        batch = tensors_from_traceback(exc)
        for name, value in self.recorder.batch().items():
            batch.setdefault(name, value)
        step = self.step_count
        diagnosis = Diagnosis(cause="unknown", phase="unknown", evidence=[f"the step raised {type(exc).__name__}: {exc}"])
        details: dict[str, Any] = {"exception": f"{type(exc).__name__}: {exc}"}
        try:
            from nanguard import forensics

            request = InvestigationRequest(
                step=step, trigger="nonfinite_loss", models=self.models, optimizer=self.optimizer,
                capture=StepCapture(rerun=None, batch=batch), exception=exc,
                loss_history=list(self.loss_history), grad_norm_history=list(self.grad_history),
                batch_scale_history={k: [v for _, v in pairs] for k, pairs in self.batch_scale_history.items()},
            )
            result = forensics.investigate(request)
            diagnosis = result.diagnosis
            details.update(getattr(result, "details", {}) or {})
        except Exception as inner:  # keep the user's own error in front
            details["forensics_error"] = repr(inner)
        event = Event(step=step, trigger="nonfinite_loss", action="abort", diagnosis=diagnosis, rank=self.rank, details=details)
        self._emit(event)
        return event

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is not None and not isinstance(exc, TrainingAborted):
            self.record_crash(exc)
        self.close(status="error" if exc is not None and not isinstance(exc, TrainingAborted) else "finished")


@contextlib.contextmanager
def _preserved(models: Sequence[torch.nn.Module], params: Sequence[torch.Tensor]) -> Iterator[None]:
    """Put back gradients, buffers (BatchNorm statistics) and RNG states after a diagnostic re-run."""
    grads = [None if p.grad is None else p.grad.detach().clone() for p in params]
    buffers = [(b, b.detach().clone()) for m in models for b in m.buffers()]
    rng = RngState.capture()
    try:
        yield
    finally:
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p.grad = g
            for live, saved in buffers:
                live.copy_(saved)
        rng.restore()


RUN_FILES = ("events.jsonl", "history.csv", "summary.json", "report.html", "report.md", "emergency_checkpoint.pt")


def _set_aside_previous_run(out_dir: Path) -> None:
    """Move an earlier run's files into ``previous/<time>/`` so this run starts clean and nothing is lost."""
    existing = [out_dir / name for name in RUN_FILES if (out_dir / name).exists()]
    if not existing:
        return
    target = out_dir / "previous" / time.strftime("%Y%m%d-%H%M%S")
    suffix = 0
    while target.exists():
        suffix += 1
        target = target.with_name(f"{target.name.split('.')[0]}.{suffix}")
    target.mkdir(parents=True)
    for path in existing:
        path.rename(target / path.name)
    for folder in ("report_files", "tensorboard"):
        if (out_dir / folder).is_dir():
            (out_dir / folder).rename(target / folder)


def _storage_key(tensor: torch.Tensor) -> tuple[int, int, int]:
    try:
        return (tensor.untyped_storage().data_ptr(), int(tensor.storage_offset()), tensor.numel())
    except (RuntimeError, NotImplementedError):  # tensor subclasses without storage
        return (id(tensor), 0, -1)


def _rename_from_frames(named: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Prefer the user's own names for batch tensors: a key of a dict in their loop, or a local variable.

    Returns the renamed batch and the mapping from the original names.
    """
    if not named:
        return named, {}
    by_id = {id(v): k for k, v in named.items()}
    # A reshape or view of the user's tensor (``labels.reshape(-1)``) shares its storage and size.
    by_storage = {_storage_key(v): id(v) for v in named.values() if isinstance(v, torch.Tensor)}
    renamed: dict[int, str] = {}
    frame = sys._getframe(1)
    depth = 0
    while frame is not None and depth < 40:
        module = frame.f_globals.get("__name__", "")
        if not is_library_module(module):
            for var, value in list(frame.f_locals.items()):
                if var.startswith("_"):
                    continue
                if isinstance(value, torch.Tensor) and id(value) in by_id:
                    renamed.setdefault(id(value), var)
                elif isinstance(value, torch.Tensor) and _storage_key(value) in by_storage:
                    renamed.setdefault(by_storage[_storage_key(value)], var)
                elif isinstance(value, dict):
                    for key, inner in value.items():
                        if isinstance(inner, torch.Tensor) and id(inner) in by_id and isinstance(key, str):
                            renamed[id(inner)] = key
            if renamed:
                break
        frame = frame.f_back  # type: ignore[assignment]
        depth += 1
    out: dict[str, Any] = {}
    mapping: dict[str, str] = {}
    for key, value in named.items():
        name = renamed.get(id(value), key)
        if name in out and out[name] is not value:
            name = key
        out[name] = value
        mapping[key] = name
    return out, mapping
