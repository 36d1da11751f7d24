"""One guarded ``optimizer.step()``: gather the step's signals, decide, apply or skip, hand the verdict on.

The optimizer's ``step`` is replaced on the instance (a bound method, undone on close) by
:meth:`StepPipeline.run`. Per step, on the device and without synchronising: the loss the loss book
assigned to this guard, the total gradient norm (the number clipping computes), a weight norm at the
configured cadence, all stacked into one small vector (:mod:`nanguard.step.verdict`) and compared with
the detector's limits. Then one of two strategies:

* **device** (a fused optimizer, ``fused=True``, on a GPU): the decision goes to the optimizer as
  ``found_inf`` and clipping as ``grad_scale``, exactly as ``torch.amp.GradScaler`` does, so the fused
  kernel skips or clips with no host sync; the vector is read back asynchronously and the host acts on
  it when it arrives;
* **host** (any other optimizer, and any optimizer on a CPU, where reading the vector costs nothing): one
  read of the vector, then the host calls the real ``step`` or not; clipping goes to a fused kernel as
  ``grad_scale`` and to any other optimizer as one in-place multiply of the gradients.

The pipeline also receives what happens between steps: each watched forward call (recorded for a
replay, and a sample of the batch's scale), each ``backward()`` that belongs to this guard, and the
GradScaler's own skips.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from nanguard import distributed as dist_utils
from nanguard.actions.respond import Parts, Responder, StepContext
from nanguard.forensics.capture import ForwardCall, StepRecorder
from nanguard.forensics.naming import named_call_arguments
from nanguard.forensics.request import StepCapture
from nanguard.state import RngState
from nanguard.step import lockstep
from nanguard.step.losses import BOOK
from nanguard.step.norms import all_finite, per_tensor_norms, scale_grads_, total_norm
from nanguard.step.readback import DeviceReadback, Uploads
from nanguard.step.stall import StallWatch
from nanguard.step.verdict import (
    FLOAT32_MAX,
    LOSS,
    LOSS_SCALE,
    NORM,
    SCALER_FOUND,
    WEIGHTS,
    Limits,
    Reading,
    Verdict,
    decode,
    device_clip_scale,
    device_found,
    encode,
    read_on_host,
    upper_bounds,
)


@dataclass
class StepInputs:
    """What arrives for the next step before it runs; taken (and reset) when the step begins."""

    observed: list[torch.Tensor] = field(default_factory=list)
    user_norm: tuple[int, torch.Tensor] | None = None
    closure: StepCapture | None = None


@dataclass
class _Pending:
    """A fused step on its way to the host: its context and how to read its vector."""

    context: StepContext
    reading: Reading


def is_fused(optimizer: torch.optim.Optimizer) -> bool:
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and bool(optimizer.defaults.get("fused"))


class StepPipeline:
    """The guarded step of one optimizer (see the module docstring)."""

    def __init__(self, parts: Parts, responder: Responder, on_step_start: Callable[[int], bool]) -> None:
        self.parts = parts
        self.responder = responder
        self.on_step_start = on_step_start  # called at each step until it returns False
        self._starting = True
        self.recorder = StepRecorder()
        self.inputs = StepInputs()
        self.readback: DeviceReadback[_Pending] = DeviceReadback()
        self.scales: DeviceReadback[list[str]] = DeviceReadback()
        self.uploads = Uploads()
        self._scale_sampled = -1
        self._dispatched = -1  # the last step whose fused update went to the device
        self._device_mode: bool | None = None
        self._fused_optimizer = False  # decided with the mode
        self.defer_host_verdict = False  # tests: read verdicts back late on a CPU, as a CUDA run does
        self.closed = False
        self.stall = StallWatch(parts)  # training that runs on and no longer learns (issue 15)

    # ------------------------------------------------------------------ mode
    @property
    def device_mode(self) -> bool:
        """Whether the device decides (see the module docstring). Decided at the first step: a subclass sets
        ``fused`` support after ``Optimizer.__init__`` returns. ``sync_mode="device"`` forces it on a CPU too."""
        if self._device_mode is None:
            optimizer = self.parts.subjects.optimizer
            fused = self._fused_optimizer = is_fused(optimizer)  # type: ignore[arg-type]
            mode = self.parts.config.sync_mode
            if mode == "device" and not fused:
                warnings.warn("nanguard: sync_mode='device' needs a fused optimizer (fused=True); using one sync per step",
                              stacklevel=3)
            params = self.parts.subjects.params()
            on_gpu = bool(params) and params[0].device.type == "cuda"
            self._device_mode = fused and (mode == "device" or (mode == "auto" and (on_gpu or self.defer_host_verdict)))
        return self._device_mode

    # ------------------------------------------------------------------ between steps
    def on_forward_start(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.recorder.on_forward_start(module, args, kwargs)
        step = self.parts.tally.steps
        if self._scale_sampled != step:  # one sample of the batch's scale per step is enough
            self._scale_sampled = step
            named = named_call_arguments(module, args, kwargs)
            names = [n for n, t in named.items() if t.is_floating_point() and t.numel()]
            if names:
                with torch.no_grad():
                    amax = torch.stack([named[n].detach().abs().amax().float() for n in names])
                if amax.device.type == "cpu":  # already on the host: fold it now, outside optimizer.step()
                    self.parts.detector.note_batch_scale(step, dict(zip(names, amax.tolist(), strict=True)))
                else:
                    self.scales.push(step, amax, names)

    def on_forward_end(self, module: torch.nn.Module, output: Any) -> None:
        self.recorder.on_forward_end(module, output)

    def on_backward(self, tensor: torch.Tensor, gradient: torch.Tensor | None, loss: torch.Tensor | None,
                    mine: bool) -> None:
        if mine:
            self.recorder.on_backward(tensor, gradient, loss)
            self.stall.note_backward(tensor, loss)
        else:
            self.recorder.stop_recording(foreign=True)

    def observe_loss(self, loss: torch.Tensor) -> None:
        self.inputs.observed.append(loss.detach().float().reshape(()))

    def note_clip_norm(self, norm: torch.Tensor, num_tensors: int) -> None:
        self.inputs.user_norm = (num_tensors, norm.detach())

    def _take_inputs(self) -> tuple[StepInputs, list[ForwardCall], torch.Tensor | None, bool]:
        """What arrived for a step that ``run`` does not see (a step the GradScaler skipped)."""
        inputs, self.inputs = self.inputs, StepInputs()
        calls = self.recorder.take()
        loss, _ = BOOK.take(self)
        for value in inputs.observed:
            loss = value if loss is None else loss + value.to(loss.device)
        return inputs, calls, loss, loss is not None

    # ------------------------------------------------------------------ the step
    def run(self, original: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        optimizer = self.parts.subjects.optimizer
        if self.closed or self.responder.aborted or isinstance(optimizer, torch.optim.LBFGS):
            # LBFGS re-evaluates its closure inside step(); it cannot take a verdict from outside.
            return original(*args, **kwargs)
        closure = (kwargs.get("closure") if "closure" in kwargs else (args[0] if args and callable(args[0]) else None)) \
            if args or kwargs else None
        closure_loss = None
        if closure is not None and self.inputs.closure is None:
            # optimizer.step(closure): run it here, once, so the step stays replayable.
            rng = RngState.capture(full=False)
            with torch.enable_grad():
                closure_loss = closure()
            if isinstance(closure_loss, torch.Tensor) and not BOOK.has(self):
                self.observe_loss(closure_loss)
            self.inputs.closure = StepCapture(rerun=closure, rng_state=rng)
            args, kwargs = (), {k: v for k, v in kwargs.items() if k != "closure"}
        tally = self.parts.tally
        step = tally.steps
        tally.steps = step + 1
        optimizer._opt_called = True  # type: ignore[union-attr]  # what an LR scheduler checks for
        inputs, self.inputs = self.inputs, StepInputs()
        calls = self.recorder.take()
        loss = BOOK.take(self)[0] if BOOK.pending else None
        for value in inputs.observed:
            loss = value if loss is None else loss + value.to(loss.device)
        has_loss = loss is not None
        if self._starting:
            self._starting = self.on_step_start(step)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized() \
            and dist_utils.is_distributed()
        if self.readback.pending or self.scales.pending:
            self.process(until=step - 1 if self.device_mode and distributed else None)
        self.stall.on_step(step, loss, read_now=not self.device_mode)
        if self.responder.forced_skips and self.responder.forced_skip(step):
            return closure_loss
        context = StepContext(step, self.parts.detector.limits(), has_loss, calls, inputs.closure, lockstep=distributed)
        result = self._decide(context, original, args, kwargs, loss, inputs)
        return closure_loss if closure_loss is not None else result

    def _signals(self, context: StepContext, loss: torch.Tensor | None,
                 inputs: StepInputs) -> tuple[dict[str, Any], list[torch.Tensor], Limits, bool]:
        """The step's device scalars (by name), its gradients, the limits in force, and whether weights are checked.

        On the host path in a single process the total gradient norm is left to the host (``NORM`` holds the
        per-tensor norms, see :func:`~nanguard.step.verdict.read_on_host`): two kernels fewer per step.
        """
        subjects, cfg = self.parts.subjects, self.parts.config
        params = subjects.params()
        grads = [g for g in [p.grad for p in params] if g is not None]
        device = grads[0].device if grads else (params[0].device if params else torch.device("cpu"))
        optimizer = subjects.optimizer
        grad_scale = vars(optimizer).get("grad_scale")  # set by a GradScaler for a fused optimizer
        user = inputs.user_norm
        user_clipped = user is not None and user[0] >= len(grads) and grad_scale is None
        plain = subjects.simple
        norm: Any
        if user is not None and user_clipped:
            norm = user[1].float().to(device)
        elif plain and grads and not context.lockstep and grad_scale is None and not self.device_mode:
            norm = per_tensor_norms(grads)
        else:
            norm = total_norm(grads, device, plain=plain)
            if grad_scale is not None:
                norm = norm / grad_scale.float().to(device)
        limits = context.limits
        if user_clipped and limits.clips:
            # The script clipped already: its gradients are no longer what ``norm`` measured. Clip nothing more.
            limits = limits._replace(clip=FLOAT32_MAX)
        parts: dict[str, Any] = {LOSS: loss if loss is not None else torch.zeros((), device=device), NORM: norm}
        check = bool(cfg.check_weights_every) and context.step % cfg.check_weights_every == 0 and bool(params)
        if check:
            parts[WEIGHTS] = total_norm(params, device, plain=plain)
        if subjects.scaler_enabled:
            found_inf = vars(optimizer).get("found_inf")
            if isinstance(found_inf, torch.Tensor):
                parts[SCALER_FOUND] = found_inf.to(device)
            scale = getattr(subjects.scaler, "_scale", None)
            if isinstance(scale, torch.Tensor):
                parts[LOSS_SCALE] = scale.to(device)
        return parts, grads, limits, check

    def _decide(self, context: StepContext, original: Callable[..., Any], args: tuple[Any, ...],
                kwargs: dict[str, Any], loss: torch.Tensor | None, inputs: StepInputs) -> Any:
        parts, grads, limits, check = self._signals(context, loss, inputs)
        context.limits = limits
        if self.device_mode:
            return self._fused(context, original, (args, kwargs), parts, check)
        return self._sync(context, original, (args, kwargs), parts, grads, check)

    def _sync(self, context: StepContext, original: Callable[..., Any], call: tuple[tuple[Any, ...], dict[str, Any]],
              parts: dict[str, Any], grads: list[torch.Tensor], check: bool) -> Any:
        if isinstance(parts[NORM], list):
            layout, values, world = *read_on_host(parts), 1  # the one read of this step
        else:
            layout, vector = encode(parts)
            rows = lockstep.gather(vector) if context.lockstep else vector
            values, world = rows.reshape(-1).tolist(), (rows.shape[0] if rows.dim() == 2 else 1)
        verdict = self._decode(context, values, Reading(layout, world))
        if verdict.bad:
            self.responder.on_bad(verdict, context)
            return None
        if verdict.scaler_overflow:
            self._scaler_overflow(verdict, context)
            return None
        result = self._apply(verdict, original, call, grads)
        if check and not bool(all_finite(self.parts.subjects.params())):
            self.responder.on_bad(verdict.with_post_weights_bad(), context, update_applied=True)
        else:
            self.responder.on_good(verdict, context)
            self.stall.on_good(verdict)
        return result

    def _apply(self, verdict: Verdict, original: Callable[..., Any], call: tuple[tuple[Any, ...], dict[str, Any]],
               grads: list[torch.Tensor]) -> Any:
        """Call the real step on the host path: the LR multiplier around it, clipping into a fused kernel's
        ``grad_scale`` or, for any other optimizer, by one in-place multiply of the gradients."""
        optimizer = self.parts.subjects.optimizer
        fused = self._fused_optimizer
        base_scale = vars(optimizer).get("grad_scale")
        if verdict.clipped and fused:
            clip = torch.tensor(1.0 / verdict.clip_coef, device=grads[0].device)
            optimizer.grad_scale = clip * base_scale.float() if isinstance(base_scale, torch.Tensor) else clip  # type: ignore[union-attr]
        elif verdict.clipped:
            scale_grads_(grads, verdict.clip_coef)
        lr = self.parts.lr
        saved_lr = lr.apply(verdict.step)
        probe = self.stall.before_update(verdict.step)
        try:
            return original(*call[0], **call[1])
        finally:
            lr.restore(saved_lr)
            self.stall.after_update(probe, read_now=not self.device_mode)
            if verdict.clipped and fused:
                if base_scale is None:
                    delattr(optimizer, "grad_scale")
                else:
                    optimizer.grad_scale = base_scale  # type: ignore[union-attr]

    def _fused(self, context: StepContext, original: Callable[..., Any], call: tuple[tuple[Any, ...], dict[str, Any]],
               parts: dict[str, torch.Tensor], check: bool) -> Any:
        optimizer = self.parts.subjects.optimizer
        limits = context.limits
        layout, vector = encode(parts)
        rows = lockstep.gather(vector) if context.lockstep else vector
        device = vector.device
        upper = self.uploads.send(upper_bounds(layout, limits, has_loss=context.has_loss), device)
        found = device_found(rows, upper, self.uploads.constant(-FLOAT32_MAX, len(layout), device))
        saved = {name: getattr(optimizer, name) for name in ("grad_scale", "found_inf") if hasattr(optimizer, name)}
        optimizer.found_inf = found  # type: ignore[union-attr]
        if limits.clips:
            # Clipping folded into the fused kernel's unscale: grads / (grad_scale / coef) == grads * coef / grad_scale.
            # The host computes the same coefficient from the norm it reads back.
            scale = device_clip_scale(parts[NORM], limits.clip)
            base = saved.get("grad_scale")
            optimizer.grad_scale = scale * base.float() if isinstance(base, torch.Tensor) else scale  # type: ignore[union-attr]
        lr = self.parts.lr
        saved_lr = lr.apply(context.step)
        probe = self.stall.before_update(context.step)
        try:
            result = original(*call[0], **call[1])
        finally:
            lr.restore(saved_lr)
            self.stall.after_update(probe, read_now=not self.device_mode)
            for name in ("grad_scale", "found_inf"):
                if name in saved:
                    setattr(optimizer, name, saved[name])
                elif hasattr(optimizer, name):
                    delattr(optimizer, name)
        self._dispatched = context.step
        world = rows.shape[0] if rows.dim() == 2 else 1
        vector = rows.reshape(-1) if rows.dim() != 1 else rows
        if check:  # the weights after the update travel at the end of the vector
            vector = torch.cat([vector, total_norm(self.parts.subjects.params()).reshape(1).to(vector.device)])
        pending = _Pending(context, Reading(layout, world, check))
        if vector.device.type == "cpu" and not self.defer_host_verdict and not len(self.readback):
            self._act(pending, vector.tolist(), pre_step=True)  # reading a CPU tensor costs nothing: act at once
        else:
            self.readback.push(context.step, vector, pending)
            if vector.device.type != "cuda" and not self.defer_host_verdict:
                self.process()
        return result

    def _decode(self, context: StepContext, values: list[float], reading: Reading) -> Verdict:
        return decode(context.step, values, reading, context.limits, has_loss=context.has_loss,
                      scaler_enabled=self.parts.subjects.scaler_enabled)

    # ------------------------------------------------------------------ host side of fused verdicts
    def process(self, wait: bool = False, until: int | None = None) -> None:
        """Act on verdicts that reached the host. ``until``: wait for those up to that step (under
        torch.distributed every rank must act on a verdict at the same step, not whenever its device is done)."""
        for scale in self.scales.poll(wait=wait):
            self.parts.detector.note_batch_scale(scale.step, dict(zip(scale.context, scale.values(), strict=False)))
        for item in self.readback.poll(wait=wait or until is not None, until=until):
            self._act(item.context, item.values(), pre_step=item.step >= self._dispatched)
        self.stall.poll(wait=wait)

    def _act(self, pending: _Pending, values: list[float], pre_step: bool) -> None:
        """Hand a fused step's verdict on. ``pre_step``: no later update has reached the weights since."""
        verdict = self._decode(pending.context, values, pending.reading)
        if verdict.bad:
            self.responder.on_bad(verdict, pending.context, state_is_pre_step=pre_step)
        elif verdict.post_weights_bad:
            self.responder.on_bad(verdict, pending.context, update_applied=True)
        elif verdict.scaler_overflow:
            self._scaler_overflow(verdict, pending.context, pre_step=pre_step)
        else:
            self.responder.on_good(verdict, pending.context)
            self.stall.on_good(verdict)

    # ------------------------------------------------------------------ GradScaler
    def on_scaler_step(self, scaler: Any, call: Callable[[], Any]) -> Any:
        """``scaler.step(optimizer)`` for this guard's optimizer: count a step the scaler skipped on its own."""
        subjects = self.parts.subjects
        if subjects.scaler is not scaler:
            subjects.scaler = scaler
        before = self.parts.tally.steps
        result = call()
        if self.parts.tally.steps == before and not self.closed:
            self._scaler_skipped()
        return result

    def _scaler_skipped(self) -> None:
        """GradScaler found inf and did not call ``optimizer.step()``: an overflow, unless the loss is bad."""
        inputs, calls, loss, has_loss = self._take_inputs()
        tally = self.parts.tally
        step = tally.steps
        tally.steps += 1
        loss_bad = torch.zeros(1) if loss is None else (~torch.isfinite(loss.detach().float().reshape(1))).float()
        rows = lockstep.gather(loss_bad)  # the scaler synchronised already; every rank decides alike
        value = float(loss) if loss is not None else math.nan
        scale = self.parts.subjects.scaler.get_scale() if self.parts.subjects.scaler_enabled else None
        context = StepContext(step, self.parts.detector.limits(), has_loss, calls, inputs.closure,
                              lockstep=dist_utils.is_distributed())
        self.stall.on_step(step, loss, read_now=not self.device_mode)
        if bool(rows.amax() > 0):
            verdict = Verdict(step=step, loss=value if has_loss else math.nan, grad_norm=math.nan, loss_bad=True,
                              grad_bad=True, loss_scale=scale)
            self.responder.on_bad(verdict, context)
        else:
            verdict = Verdict(step=step, loss=value if has_loss else None, grad_norm=math.inf, grad_bad=True,
                              scaler_overflow=True, loss_scale=scale)
            self._scaler_overflow(verdict, context)

    def _scaler_overflow(self, verdict: Verdict, context: StepContext, pre_step: bool = True) -> None:
        """A GradScaler skip: silent while it is an overflow the scaler outgrows; a bad step when its NaN
        survives a replay at loss scale 1 (see :class:`~nanguard.step.scaler.ScalerSkips`)."""
        evidence = self.stall.scaler_skip(context.calls, context.closure, pre_step=pre_step, together=context.lockstep)
        if evidence:
            self.responder.on_bad(verdict._replace(scaler_overflow=False, grad_bad=True), context, evidence=evidence)
        else:
            self.responder.on_scaler_overflow(verdict)

    def flush(self) -> None:
        """Read back every outstanding verdict (waits for the device) and act on it."""
        self.process(wait=True)
        self.stall.flush()


__all__ = ["StepInputs", "StepPipeline", "is_fused"]
