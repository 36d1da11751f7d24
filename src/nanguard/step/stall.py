"""The stall watch: training that keeps running and no longer learns, though nothing is non-finite.

Four ways a run goes on for days and learns nothing, each with its own cheap check:

* **updates that round away** (bf16/fp16 weights without fp32 masters): every ``stall_every`` applied steps,
  on the device and without a sync, a strided sample of each parameter (``SAMPLE`` elements) is copied before
  the update and compared bit for bit after it. Per param group and dtype the vector read back holds how
  many sampled elements had a non-zero gradient, how many of those the update left bit-identical, and the
  summed update and weight magnitudes. When most of them stayed unchanged at ``CONFIRM`` samples in a row
  while the gradient norm had not collapsed (a converged model's gradients vanish; a stalled one's do not),
  the run has stalled: ``update_underflow``;
* **a learning rate of 0** that a scheduler set after it had been positive, for ``LR_ZERO_STEPS`` steps in a
  row (a cosine that reaches 0 on its last step is fine): a host read of ``param_groups`` per step;
* **parameters without a gradient** whose module runs in forward (a detached branch): at a sample, the
  optimizer's parameters that require grad but have none; if there are any, one global forward hook for
  the next step tells which modules ran with gradients enabled, and those that did are reported;
* **GradScaler skips** that are not overflows, and **gradients clipped or measured while scaled**: the
  scale test (:class:`~nanguard.step.scaler.ScalerSkips`) and the misuse check (:mod:`nanguard.step.misuse`)
  live in their own modules; this watch reports what the misuse check found.

Findings are events with trigger ``stalled`` and action ``none``: nanguard reports, it does not change the
training (DESIGN.md principle 6). Each is reported once until it clears.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, cast

import torch

from nanguard.actions.respond import Parts
from nanguard.events import Diagnosis, Event
from nanguard.forensics.capture import ForwardCall
from nanguard.forensics.request import StepCapture
from nanguard.forensics.rules import stall as words
from nanguard.forensics.rules.stall import GroupSample, MisuseFacts, ZeroLr
from nanguard.step.misuse import MisuseWatch
from nanguard.step.readback import DeviceReadback
from nanguard.step.scaler import ScalerSkips
from nanguard.step.verdict import Verdict

SAMPLE = 1024  # elements sampled per parameter tensor
STALLED = 0.5  # fraction of sampled elements with a gradient that the update left bit-identical
CONFIRM = 2  # consecutive samples
CONVERGED = 1e-3  # a gradient norm below this fraction of its peak: converged, not stalled
MIN_ELEMENTS = 64
LR_ZERO_STEPS = 20
_BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
         torch.float64: torch.int64}


@dataclass
class _Probe:
    """One sample on its way: per (group, dtype) key, the sampled parameters and strides, and the copies."""

    step: int
    keys: list[tuple[int, torch.dtype]]
    params: list[list[tuple[torch.Tensor, int]]]
    before: list[torch.Tensor]
    has_grad: list[torch.Tensor]


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded (FSDP2 ``DTensor``) parameter or gradient as this rank's shard: each rank samples its own."""
    to_local = getattr(tensor, "to_local", None)
    return cast(torch.Tensor, to_local()) if callable(to_local) else tensor


def _view(tensor: torch.Tensor, stride: int) -> torch.Tensor:
    return _local(tensor).detach().view(-1)[::stride][:SAMPLE]


class StallWatch:
    """One guard's stall watch (see the module docstring). The pipeline calls it; it writes its own events."""

    def __init__(self, parts: Parts) -> None:
        self.parts = parts
        self.every = parts.config.stall_every
        subjects = parts.subjects
        self.misuse = MisuseWatch(subjects.optimizer, lambda: subjects.scaler)  # type: ignore[arg-type]
        self.skips = ScalerSkips(parts.config, subjects, parts.desk.replay_scope)
        self.readback: DeviceReadback[list[tuple[int, torch.dtype, int]]] = DeviceReadback()
        self._values: dict[int, list[GroupSample]] = {}  # sampled steps read back, waiting for their verdict
        self._good: dict[int, Verdict] = {}  # good sampled steps, waiting for their numbers
        self._last_probe = -1
        self._stalled: list[tuple[int, list[GroupSample]]] = []  # the current run of stalled samples
        self._reported_underflow = False
        self._peak_grad = 0.0
        self._lr: dict[int, list[Any]] = {}  # group -> [last positive lr, zero since step, reported]
        self._zero_lr = False  # some group's lr is 0 and not reported yet (the per-step check stays short)
        self._suspects: frozenset[int] = frozenset()  # parameters without a gradient at the last sample
        self._cleared: frozenset[int] = frozenset()  # a suspect set whose modules did not run: not again
        self._armed: tuple[int, set[int], Any] | None = None  # (sample step, modules that ran, hook handle)
        self._reported_no_grad: set[int] = set()

    # ------------------------------------------------------------------ every step
    def on_step(self, step: int, loss: torch.Tensor | None = None, *, read_now: bool = True) -> None:
        """At each ``optimizer.step()`` (also one the GradScaler skipped), before the update. ``read_now``: the
        step reads its verdict on the host anyway (not the fused device path, where :meth:`poll` reads)."""
        if self.misuse.found or self.misuse.scaled_backward:
            for found in self.misuse.take():
                self._report_misuse(step, found, loss)
        if not self.every:
            return
        self._check_lr(step)
        if self._armed is not None:
            self._confirm_no_grad(step)
        if read_now and self.readback.pending:
            self._poll()

    def poll(self, wait: bool = False) -> None:
        """Read the samples that reached the host (the pipeline calls this where it reads its own verdicts)."""
        if self.readback.pending:
            self._poll(wait=wait)

    def note_backward(self, tensor: torch.Tensor, loss: torch.Tensor | None) -> None:
        """A backward of this guard's loss; ``tensor is not loss``: it was the GradScaler's scaled loss."""
        self.misuse.note_backward(loss is not None and tensor is not loss)

    # ------------------------------------------------------------------ sampled steps
    def before_update(self, step: int) -> _Probe | None:
        """At a sampled step, just before the real update: copy the sample (device ops, no sync)."""
        if not self.every or step % self.every:
            return None
        self._find_no_grad(step)
        keys: dict[tuple[int, torch.dtype], list[tuple[torch.Tensor, int]]] = {}
        for index, group in enumerate(self.parts.subjects.optimizer.param_groups):  # type: ignore[union-attr]
            if group.get("lr") == 0:
                continue  # no update is asked for (a warm-up's first step, a frozen group): nothing can round away
            for p in group["params"]:
                g = p.grad
                if g is None or p.dtype not in _BITS or g.is_sparse:
                    continue
                local, local_grad = _local(p), _local(g)
                if local.shape != local_grad.shape or not local.is_contiguous() or not local_grad.is_contiguous():
                    continue
                keys.setdefault((index, p.dtype), []).append((p, max(1, local.numel() // SAMPLE)))
        if not keys:
            return None
        with torch.no_grad():
            before = [torch.cat([_view(p, s) for p, s in ps]) for ps in keys.values()]
            has_grad = [torch.cat([_view(cast(torch.Tensor, p.grad), s) != 0 for p, s in ps]) for ps in keys.values()]
        self._last_probe = step
        return _Probe(step, list(keys), list(keys.values()), before, has_grad)

    def after_update(self, probe: _Probe | None, *, read_now: bool = True) -> None:
        """Right after the update: compare, reduce, and send the numbers home (read at once on a CPU when
        ``read_now``: the step syncs anyway)."""
        if probe is None:
            return
        rows = []
        with torch.no_grad():
            for (_, dtype), ps, before, mask in zip(probe.keys, probe.params, probe.before, probe.has_grad, strict=True):
                after = torch.cat([_view(p, s) for p, s in ps])  # views again: an optimizer may rebind .data
                same = (after.view(_BITS[dtype]) == before.view(_BITS[dtype])) & mask
                wide = before.float()
                rows += [mask.sum().float(), same.sum().float(), ((after.float() - wide).abs() * mask).sum(),
                         (wide.abs() * mask).sum()]
            vector = torch.stack([r.to(rows[0].device) for r in rows])
        context = [(group, dtype, len(ps)) for (group, dtype), ps in zip(probe.keys, probe.params, strict=True)]
        self.readback.push(probe.step, vector, context)
        if read_now and vector.device.type == "cpu":
            self._poll()

    def on_good(self, verdict: Verdict) -> None:
        """The step's verdict was good (its update counts): a sample taken at it may be judged."""
        self.skips.on_good()
        if verdict.step == self._last_probe or verdict.step in self._values:
            self._good[verdict.step] = verdict
            self._settle()

    def flush(self) -> None:
        if self.readback.pending:
            self._poll(wait=True)

    def _poll(self, wait: bool = False) -> None:
        for item in self.readback.poll(wait=wait):
            values = item.values()
            self._values[item.step] = [
                GroupSample(group, dtype, tensors, int(values[4 * i]), int(values[4 * i + 1]), values[4 * i + 2],
                            values[4 * i + 3]) for i, (group, dtype, tensors) in enumerate(item.context)]
        self._settle()

    def _settle(self) -> None:
        """Judge samples whose numbers and good verdict have both arrived; drop those whose step was not good
        (a later sample exists and their verdict never came: the update was skipped)."""
        for step in sorted(self._values):
            verdict = self._good.pop(step, None)
            if verdict is None:
                if step < self._last_probe:
                    del self._values[step]
                    continue
                break
            self._judge(step, self._values.pop(step), verdict)
        for step in [s for s in self._good if s < self._last_probe and s not in self._values]:
            del self._good[step]

    def _judge(self, step: int, groups: list[GroupSample], verdict: Verdict) -> None:
        grad = verdict.grad_norm
        if math.isfinite(grad):
            self._peak_grad = max(self._peak_grad, grad)
        total = sum(g.with_grad for g in groups)
        unchanged = sum(g.unchanged for g in groups)
        zero_lr = any(state[1] is not None for state in self._lr.values())
        converged = math.isfinite(grad) and grad < CONVERGED * self._peak_grad
        if total < MIN_ELEMENTS or unchanged < STALLED * total or converged or zero_lr:
            self._stalled = []
            self._reported_underflow = False
            return
        self._stalled.append((step, groups))
        if len(self._stalled) >= CONFIRM and not self._reported_underflow:
            self._reported_underflow = True
            optimizer = type(self.parts.subjects.optimizer).__name__
            diagnosis = words.underflow(self._stalled[-CONFIRM:], self.parts.lr.current(), optimizer)
            self._emit(step, diagnosis, verdict.loss, grad, {"samples": [
                {"step": s, "unchanged": sum(g.unchanged for g in gs), "with_grad": sum(g.with_grad for g in gs)}
                for s, gs in self._stalled[-CONFIRM:]]})

    # ------------------------------------------------------------------ learning rate of 0
    def _check_lr(self, step: int) -> None:
        for index, group in enumerate(self.parts.subjects.optimizer.param_groups):  # type: ignore[union-attr]
            lr = group.get("lr")
            if not isinstance(lr, (float, int)):
                continue  # a tensor learning rate would need a read from the device
            state = self._lr.get(index)
            if lr > 0:
                if state is None or state[1] is not None:
                    self._lr[index] = [float(lr), None, False]
                else:
                    state[0] = float(lr)
            elif state is not None and lr == 0 and state[1] is None:
                state[1] = step
                self._zero_lr = True
        if self._zero_lr:
            due = [i for i, (_, since, done) in self._lr.items()
                   if since is not None and not done and step - since + 1 >= LR_ZERO_STEPS]
            self._zero_lr = any(since is not None and not done for _, since, done in self._lr.values())
            if due:
                self._report_lr(step, due)

    def _report_lr(self, step: int, due: list[int]) -> None:
        groups = self.parts.subjects.optimizer.param_groups  # type: ignore[union-attr]
        names = {id(p): n for n, p in self.parts.subjects.named_parameters()}
        found = []
        for index in due:
            state = self._lr[index]
            state[2] = True
            params = [p for p in groups[index]["params"] if p.requires_grad]
            if params:
                found.append(ZeroLr(index, state[1], step - state[1] + 1, state[0], len(params),
                                    _common_module([names.get(id(p)) for p in params])))
        if found:
            scheduler = self.parts.subjects.scheduler
            diagnosis = words.lr_zero(found, type(scheduler).__name__ if scheduler is not None else None)
            self._emit(step, diagnosis, None, None, {"zero_lr_groups": [f.group for f in found]})

    # ------------------------------------------------------------------ parameters without gradients
    def _find_no_grad(self, step: int) -> None:
        if self._armed is not None or not self.parts.subjects.models:
            return
        suspects = frozenset(id(p) for p in self.parts.subjects.params()
                             if p.requires_grad and p.grad is None and id(p) not in self._reported_no_grad)
        self._suspects = suspects
        if suspects and suspects != self._cleared:
            ran: set[int] = set()

            def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
                if torch.is_grad_enabled():
                    ran.add(id(module))

            handle = torch.nn.modules.module.register_module_forward_hook(hook)
            self._armed = (step, ran, handle)

    def _confirm_no_grad(self, step: int) -> None:
        assert self._armed is not None
        first, ran, handle = self._armed
        if step == first:
            return  # the hook waits for the next step's forward
        handle.remove()
        self._armed = None
        still = set(self._suspects)
        by_module: dict[str, list[str]] = {}
        for model_index, model in enumerate(self.parts.subjects.models):
            prefix = "" if model_index == 0 else f"models[{model_index}]."
            for name, module in model.named_modules():
                if id(module) not in ran:
                    continue
                for pname, p in module.named_parameters(recurse=False):
                    if id(p) in still and p.grad is None:
                        still.discard(id(p))
                        self._reported_no_grad.add(id(p))
                        by_module.setdefault(prefix + name, []).append(prefix + (f"{name}." if name else "") + pname)
        if not by_module:
            self._cleared = self._suspects
            return
        for module, params in by_module.items():
            self._emit(step, words.no_gradient(module, params, first, step), None, None,
                       {"parameters_without_gradient": params})

    # ------------------------------------------------------------------ GradScaler skips and misuse
    def scaler_skip(self, calls: list[ForwardCall], closure: StepCapture | None, *, pre_step: bool,
                    together: bool) -> list[str] | None:
        """Evidence lines when this GradScaler skip's NaN survives loss scale 1 (not an overflow), else None."""
        test = self.skips.classify(calls, closure, pre_step=pre_step, together=together)
        return test.evidence if test is not None and test.survives else None

    def _report_misuse(self, step: int, found: Any, loss: torch.Tensor | None) -> None:
        norm = float(found.norm) if found.norm is not None else None  # one read, once per kind per run
        facts = MisuseFacts(found.call, float(found.scale), norm, found.max_norm, found.clip_value)
        value = float(loss) if loss is not None else None
        self._emit(step, words.misuse(facts), value, None, {"call": found.call})

    # ------------------------------------------------------------------ records
    def _emit(self, step: int, diagnosis: Diagnosis, loss: float | None, grad_norm: float | None,
              details: dict[str, Any]) -> None:
        p = self.parts
        event = Event(step=step, trigger="stalled", action="none", diagnosis=diagnosis, loss=loss, grad_norm=grad_norm,
                      lr=p.lr.current(), rank=p.rank, details={**details, "reason": "reported only: nanguard does not "
                                                               "change a run that stopped moving"})
        p.events.append(event)
        p.records.on_event(event)

    def close(self) -> None:
        if self._armed is not None:
            self._armed[2].remove()
            self._armed = None

    def state_dict(self) -> dict[str, Any]:
        return {"reported_underflow": self._reported_underflow, "peak_grad": self._peak_grad,
                "lr": {str(k): list(v) for k, v in self._lr.items()}, "misuse_reported": sorted(self.misuse.reported)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._reported_underflow = bool(state.get("reported_underflow", False))
        self._peak_grad = float(state.get("peak_grad", 0.0))
        self._lr = {int(k): [float(v[0]), v[1] if v[1] is None else int(v[1]), bool(v[2])]
                    for k, v in state.get("lr", {}).items()}
        self._zero_lr = any(v[1] is not None and not v[2] for v in self._lr.values())
        self.misuse.reported = set(state.get("misuse_reported", []))


def _common_module(names: list[str | None]) -> str | None:
    """The deepest module that holds every named parameter ('' = the root module), or None if a name is unknown."""
    if not names or any(n is None for n in names):
        return None
    paths = [n.split(".")[:-1] for n in names if n is not None]
    common = paths[0]
    for path in paths[1:]:
        length = 0
        while length < min(len(common), len(path)) and common[length] == path[length]:
            length += 1
        common = common[:length]
    return ".".join(common)


__all__ = ["CONFIRM", "LR_ZERO_STEPS", "SAMPLE", "STALLED", "StallWatch"]
