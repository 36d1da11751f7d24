r"""Recording a training step cheaply enough to leave on, so the bad one can be re-run exactly.

Without a closure nanguard cannot call the user's step again, so it records what it needs:

* at each gradient-enabled call of a watched root module: the call's arguments (references, no copies)
  and the RNG states just before it, so a replay draws the same dropout masks;
* between the root module's return and ``backward()``: the loss computation, as the list of aten
  operators it ran (one shared dispatch mode that only appends to the active :class:`LossRecorder`\ s —
  no checks, no copies, no synchronisation). Tensors produced by earlier recorded operators or returned
  by the model become placeholders; everything else (labels, masks) is kept by reference.

Re-running the step is then: restore RNG, call the model with the same arguments, re-apply the
recorded operators to its new outputs, and call ``backward`` on the same tensor as the user did.

Root modules are watched (:mod:`nanguard.forensics.watch`) through their class's ``__call__`` and a
registry of watched instances, never through hooks stored on the module: a watched model can be pickled,
saved and deep-copied, and the copy carries nothing of nanguard.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode
from torch.utils._pytree import tree_flatten, tree_map

from nanguard.forensics import watch as watching
from nanguard.forensics.naming import name_from_frames, named_call_arguments
from nanguard.forensics.request import StepCapture
from nanguard.state import RngState

MAX_RECORDED_OPS = 512


@dataclass(frozen=True)
class _Slot:
    """A placeholder for a tensor produced during the step: ``("out", i)`` model output, ``("op", i, j)`` op result."""

    key: tuple[Any, ...]


@dataclass
class RecordedOp:
    func: Any
    args: Any
    kwargs: Any
    outputs: list[_Slot | None]


class LossRecorder:
    """Appends every aten call made while it is active to ``ops``, with produced tensors replaced by slots."""

    def __init__(self, slots: dict[int, tuple[weakref.ref[torch.Tensor], _Slot]]) -> None:
        self.slots = slots
        self.ops: list[RecordedOp] = []
        self.overflowed = False

    def _slot_of(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            hit = self.slots.get(id(value))
            if hit is not None and hit[0]() is value:
                return hit[1]
        return value

    def record(self, func: Any, args: Any, kwargs: Any, out: Any) -> None:
        if self.overflowed:
            return
        if len(self.ops) >= MAX_RECORDED_OPS:
            self.overflowed = True
            return
        index = len(self.ops)
        # Map the arguments before registering the outputs: an in-place op (``loss *= k``) returns its input,
        # which must stay bound to the slot it had, not point at the op's own result.
        mapped_args, mapped_kwargs = tree_map(self._slot_of, args), tree_map(self._slot_of, kwargs)
        flat, _ = tree_flatten(out)
        slots: list[_Slot | None] = []
        for j, value in enumerate(flat):
            if isinstance(value, torch.Tensor):
                slot = _Slot(("op", index, j))
                self.slots[id(value)] = (weakref.ref(value), slot)
                slots.append(slot)
            else:
                slots.append(None)
        self.ops.append(RecordedOp(func, mapped_args, mapped_kwargs, slots))


class _RecordingMode(TorchDispatchMode):
    """The one dispatch mode every active recorder shares (one mode on the stack, however many guards)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        for recorder in list(_ACTIVE):
            recorder.record(func, args, kwargs, out)
        return out


_ACTIVE: list[LossRecorder] = []
_MODE: list[_RecordingMode] = []  # the mode while it is on the dispatch stack


def _activate(recorder: LossRecorder) -> None:
    _ACTIVE.append(recorder)
    if not _MODE:
        mode = _RecordingMode()
        mode.__enter__()
        _MODE.append(mode)


def _deactivate(recorder: LossRecorder) -> None:
    if recorder in _ACTIVE:
        _ACTIVE.remove(recorder)
    if _ACTIVE or not _MODE:
        return
    # Pop the mode only from the top of the stack: popping under a mode the user pushed since would pop
    # theirs. Left below it, ours records nothing (no recorder is active) and is popped at a later chance.
    if _get_current_dispatch_mode() is _MODE[0]:
        _MODE.pop().__exit__(None, None, None)


def stop_all() -> None:
    """End every loss recording (a ``backward()`` ends the loss region of every watched call)."""
    for recorder in list(_ACTIVE):
        _deactivate(recorder)


@dataclass
class ForwardCall:
    """One gradient-enabled call of a root module and the loss computed from its outputs."""

    module: torch.nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    rng: RngState
    autocast: tuple[str, torch.dtype] | None
    output_slots: dict[int, tuple[weakref.ref[torch.Tensor], _Slot]] = field(default_factory=dict)
    recorder: LossRecorder | None = None
    backward_slot: _Slot | None = None
    loss_slot: _Slot | None = None
    backward_gradient: torch.Tensor | None = None
    # Called while ``head``'s loss region was open (a second root, or the same model again before backward):
    # the call is replayed from ``head``'s recorded ops, in order, with its outputs bound to slots there.
    head: ForwardCall | None = None
    # Its loss region ended in a backward() that reached none of this guard's parameters (another optimizer's
    # loss, e.g. a GAN's generator step): it added nothing to this step's gradients, so it is not replayed.
    foreign: bool = False


class _CallMarker:
    """A recorded op that stands for a watched call made inside another call's loss region."""

    def __init__(self, call: ForwardCall) -> None:
        self.call = call
        self.__name__ = f"call of {type(call.module).__name__}"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        call = self.call
        call.rng.restore()
        if call.autocast is not None:
            with torch.autocast(call.autocast[0], dtype=call.autocast[1]):
                return call.module(*args, **kwargs)
        return call.module(*args, **kwargs)


def _flat_output(output: Any) -> list[Any]:
    flat, _ = tree_flatten(output if not hasattr(output, "to_tuple") else output.to_tuple())
    return flat


def _autocast_state() -> tuple[str, torch.dtype] | None:
    for device_type in ("cuda", "cpu"):
        try:
            if torch.is_autocast_enabled(device_type):
                return device_type, torch.get_autocast_dtype(device_type)
        except (TypeError, AttributeError, RuntimeError):  # older torch: no device_type argument
            continue
    return None


class StepRecorder:
    """Holds the watched forward calls of the current step, until the step takes them."""

    def __init__(self) -> None:
        self.calls: list[ForwardCall] = []
        self._active: ForwardCall | None = None
        self._pending: ForwardCall | None = None

    # --- called on the hot path: keep these to a few attribute writes --------------------------
    def on_forward_start(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        head = self._active
        if head is not None and head.recorder is not None and not head.recorder.overflowed:
            _deactivate(head.recorder)  # the call's own ops are not loss ops; its outputs will be slots
        else:
            self.stop_recording()
            head = None
        self._pending = ForwardCall(module, args, kwargs, RngState.capture(full=False), _autocast_state(), head=head)

    def on_forward_end(self, module: torch.nn.Module, output: Any) -> None:
        pending = self._pending
        if pending is None or pending.module is not module:
            return
        self._pending = None
        if pending.head is not None:
            self._chain(pending, output)
            return
        flat = _flat_output(output)
        for i, value in enumerate(flat):
            if isinstance(value, torch.Tensor):
                pending.output_slots[id(value)] = (weakref.ref(value), _Slot(("out", i)))
        pending.recorder = LossRecorder(dict(pending.output_slots))
        _activate(pending.recorder)
        self.calls.append(pending)
        self._active = pending

    def _chain(self, call: ForwardCall, output: Any) -> None:
        """Record ``call`` as one op of its head's loss region and resume recording there."""
        head = call.head
        assert head is not None and head.recorder is not None
        recorder = head.recorder
        self.calls.append(call)
        if len(recorder.ops) >= MAX_RECORDED_OPS:
            recorder.overflowed = True
            return
        index = len(recorder.ops)
        args, kwargs = tree_map(recorder._slot_of, call.args), tree_map(recorder._slot_of, call.kwargs)
        slots: list[_Slot | None] = []
        for j, value in enumerate(_flat_output(output)):
            slot = _Slot(("op", index, j)) if isinstance(value, torch.Tensor) else None
            if slot is not None:
                recorder.slots[id(value)] = (weakref.ref(value), slot)
            slots.append(slot)
        recorder.ops.append(RecordedOp(_CallMarker(call), args, kwargs, slots))
        _activate(recorder)

    def on_backward(self, tensor: torch.Tensor, gradient: torch.Tensor | None, loss: torch.Tensor | None) -> None:
        call = self._active
        self.stop_recording()
        if call is None or call.recorder is None:
            return
        slot = call.recorder._slot_of(tensor)
        call.backward_slot = slot if isinstance(slot, _Slot) else None
        if loss is not None:
            slot = call.recorder._slot_of(loss)
            call.loss_slot = slot if isinstance(slot, _Slot) else None
        call.backward_gradient = gradient

    def stop_recording(self, foreign: bool = False) -> None:
        """End the open loss region; ``foreign``: it ended in a backward() that is not this guard's."""
        call, self._active = self._active, None
        if call is not None and call.recorder is not None:
            _deactivate(call.recorder)
            call.foreign = foreign

    def take(self) -> list[ForwardCall]:
        """The step's calls (references only); the recorder starts afresh for the next step."""
        self.stop_recording()
        calls, self.calls = self.calls, []
        self._pending = None
        return calls


# ------------------------------------------------------------------------------ event path
def _own(calls: list[ForwardCall]) -> list[ForwardCall]:
    """The calls whose loss reached this guard's backward: foreign regions and the calls chained in them go."""
    return [c for c in calls if not c.foreign and (c.head is None or not c.head.foreign)]


def replayable(calls: list[ForwardCall]) -> bool:
    heads = [c for c in _own(calls) if c.head is None]
    return bool(heads) and all(
        c.recorder is not None and not c.recorder.overflowed and c.backward_slot is not None for c in heads
    )


def batch_of(calls: list[ForwardCall]) -> dict[str, Any]:
    """The step's batch tensors, named after the model's forward arguments and the loss ops' arguments."""
    named: dict[str, Any] = {}
    heads = [c for c in calls if c.head is None]
    region = -1
    for call in calls:
        region += call.head is None
        prefix = f"micro{region}." if len(heads) > 1 else ""
        produced = call.head.recorder if call.head is not None else None
        for name, value in named_call_arguments(call.module, call.args, call.kwargs).items():
            if produced is not None and (value.requires_grad or isinstance(produced._slot_of(value), _Slot)):
                continue  # made earlier in this step (another root's output): not batch data
            if any(value is seen for seen in named.values()):
                continue
            key, k = prefix + name, 1
            while key in named:
                k += 1
                key = f"{prefix}{name}_{k}"
            named[key] = value
        if call.recorder is not None:
            _name_loss_inputs(call.recorder, prefix, named)
    return named


def _name_loss_inputs(recorder: LossRecorder, prefix: str, named: dict[str, Any]) -> None:
    seen = {id(v) for v in named.values()}
    for op in recorder.ops:
        for arg_name, value in _loss_tensor_args(op):
            if id(value) not in seen:
                named.setdefault(f"{prefix}{arg_name}", value)
                seen.add(id(value))
    # Other data the loss code used (labels before a reshape, a mask): named by the user's frames later.
    for op in recorder.ops:
        for value in tree_flatten((op.args, op.kwargs))[0]:
            if (isinstance(value, torch.Tensor) and id(value) not in seen and not value.requires_grad
                    and not isinstance(value, torch.nn.Parameter) and value.dim() > 0
                    and not _is_additive_mask(value)):
                named.setdefault(f"{prefix}loss_input{len(seen)}", value)
                seen.add(id(value))


def build_rerun(calls: list[ForwardCall]) -> Callable[[], torch.Tensor | None]:
    """A function that re-runs the recorded calls and their loss ops, in order, and returns the loss."""
    calls = [c for c in _own(calls) if c.head is None]  # chained calls replay inside their head's ops

    def rerun() -> torch.Tensor | None:
        total: torch.Tensor | None = None
        for i, call in enumerate(calls):
            if i > 0:
                call.rng.restore()
            loss = _rerun_call(call)
            if loss is not None:
                total = loss.detach() if total is None else total + loss.detach()
        return total

    return rerun


def _is_additive_mask(tensor: torch.Tensor) -> bool:
    """A float tensor whose only non-finite values are -inf is a mask by intent (``scores + mask``), not bad data."""
    if not tensor.is_floating_point():
        return False
    finite = torch.isfinite(tensor)
    return bool((~finite).any()) and bool((finite | (tensor == float("-inf"))).all())


def _loss_tensor_args(op: RecordedOp) -> list[tuple[str, torch.Tensor]]:
    """Name the non-placeholder tensor arguments of loss operators (their targets) by schema argument name."""
    name = str(getattr(op.func, "__name__", ""))
    if not any(key in name for key in ("loss", "nll", "entropy", "ctc")):
        return []
    out: list[tuple[str, torch.Tensor]] = []
    try:
        schema_args = [a.name for a in op.func._schema.arguments]
    except AttributeError:
        schema_args = []
    for i, value in enumerate(op.args):
        if isinstance(value, torch.Tensor):
            out.append((schema_args[i] if i < len(schema_args) else f"arg{i}", value))
    for key, value in op.kwargs.items():
        if isinstance(value, torch.Tensor):
            out.append((key, value))
    return out


def _rerun_call(call: ForwardCall) -> torch.Tensor | None:
    assert call.recorder is not None
    if call.autocast is not None:
        with torch.autocast(call.autocast[0], dtype=call.autocast[1]):
            output = call.module(*call.args, **call.kwargs)
    else:
        output = call.module(*call.args, **call.kwargs)
    flat = _flat_output(output)
    values: dict[tuple[Any, ...], Any] = {}
    for i, value in enumerate(flat):
        values[("out", i)] = value

    def bind(value: Any) -> Any:
        if isinstance(value, _Slot):
            return values.get(value.key)
        # A tensor the step computed outside the recorded calls (a GAN's real-image loss from an unwatched
        # sub-module): its graph was consumed by the step's backward, so the replay uses its value only.
        return value.detach() if isinstance(value, torch.Tensor) and value.grad_fn is not None else value

    for index, op in enumerate(call.recorder.ops):
        result = op.func(*tree_map(bind, op.args), **tree_map(bind, op.kwargs))
        flat_out = _flat_output(result) if isinstance(op.func, _CallMarker) else tree_flatten(result)[0]
        for j, value in enumerate(flat_out):
            values[("op", index, j)] = value
    assert call.backward_slot is not None
    target = values.get(call.backward_slot.key)
    if not isinstance(target, torch.Tensor):
        return None
    if target.requires_grad:
        target.backward(call.backward_gradient)
    loss = values.get(call.loss_slot.key) if call.loss_slot is not None else target
    return loss if isinstance(loss, torch.Tensor) else target


def step_capture(calls: list[ForwardCall], closure: StepCapture | None = None, *,
                 rename: bool = True) -> tuple[StepCapture | None, dict[str, Any], dict[str, str]]:
    """How to replay a step, its named batch, and how batch fields were renamed after the user's variables.

    A closure the user gave is the replay; otherwise the recorded calls are, when every one of them
    reached ``backward()`` with its loss ops recorded in full.
    """
    calls = _own(calls)
    batch = batch_of(calls)
    renamed: dict[str, str] = {}
    if rename:
        batch, renamed = name_from_frames(batch)
    recorded = None
    if replayable(calls):
        first = calls[0]
        recorded = StepCapture(
            rerun=build_rerun(calls), batch=batch, rng_state=first.rng,
            autocast_dtype=first.autocast[1] if first.autocast else None,
            device_type=first.autocast[0] if first.autocast else "cpu",
            eager=any(watching.was_compiled(call.module) for call in calls),
        )
    if closure is not None:
        return (StepCapture(rerun=closure.rerun, batch=batch, rng_state=closure.rng_state, recorded=recorded),
                batch, renamed)
    return recorded, batch, renamed
