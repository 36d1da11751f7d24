"""Recording a training step cheaply enough to leave on, so the bad one can be re-run exactly.

Without a closure nanguard cannot call the user's step again, so it records what it needs:

* at each gradient-enabled call of a watched root module: the call's arguments (references, no copies)
  and the RNG states just before it, so a replay draws the same dropout masks;
* between the root module's return and ``backward()``: the loss computation, as the list of aten
  operators it ran (a :class:`LossRecorder` dispatch mode that only appends to a list — no checks, no
  copies, no synchronisation). Tensors produced by earlier recorded operators or returned by the model
  become placeholders; everything else (labels, masks) is kept by reference.

Re-running the step is then: restore RNG, call the model with the same arguments, re-apply the
recorded operators to its new outputs, and call ``backward`` on the same tensor as the user did.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from nanguard.forensics.request import RngState

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


class LossRecorder(TorchDispatchMode):
    """Appends every aten call to ``ops`` with produced tensors replaced by slots."""

    def __init__(self, slots: dict[int, tuple[weakref.ref[torch.Tensor], _Slot]]) -> None:
        super().__init__()
        self.slots = slots
        self.ops: list[RecordedOp] = []
        self.overflowed = False

    def _slot_of(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            hit = self.slots.get(id(value))
            if hit is not None and hit[0]() is value:
                return hit[1]
        return value

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.overflowed:
            return out
        if len(self.ops) >= MAX_RECORDED_OPS:
            self.overflowed = True
            return out
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
        return out


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


def _autocast_state() -> tuple[str, torch.dtype] | None:
    for device_type in ("cuda", "cpu"):
        try:
            if torch.is_autocast_enabled(device_type):
                return device_type, torch.get_autocast_dtype(device_type)
        except (TypeError, AttributeError, RuntimeError):  # older torch: no device_type argument
            continue
    return None


_SIGNATURES: weakref.WeakKeyDictionary[Any, inspect.Signature] = weakref.WeakKeyDictionary()


def _forward_signature(module: torch.nn.Module) -> inspect.Signature:
    """``inspect.signature`` is slow and runs once per step here: cache it per forward function."""
    forward = getattr(module.forward, "__func__", module.forward)
    try:
        return _SIGNATURES[forward]
    except (KeyError, TypeError):
        signature = inspect.signature(module.forward)
        try:
            _SIGNATURES[forward] = signature
        except TypeError:
            pass
        return signature


def named_call_arguments(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Name the tensors of a module call as users name them: ``input_ids``, ``labels``, ``x[3]``, ``batch.mask``."""
    try:
        bound = _forward_signature(module).bind_partial(*args, **kwargs)
        pairs = list(bound.arguments.items())
    except (TypeError, ValueError):
        pairs = [(f"args[{i}]", a) for i, a in enumerate(args)] + list(kwargs.items())
    named: dict[str, Any] = {}
    for name, value in pairs:
        if isinstance(value, dict) and any(isinstance(v, torch.Tensor) for v in value.values()):
            for key, inner in value.items():
                named[str(key) if name in ("kwargs", "batch", "inputs") else f"{name}.{key}"] = inner
        elif isinstance(value, (list, tuple)) and value and any(isinstance(v, torch.Tensor) for v in value):
            for i, inner in enumerate(value):
                named[f"{name}[{i}]"] = inner
        else:
            named[name] = value
    return {k: v for k, v in named.items() if isinstance(v, torch.Tensor)}


class StepRecorder:
    """Holds the forward calls of the current step and turns them into a re-runnable step."""

    def __init__(self) -> None:
        self.calls: list[ForwardCall] = []
        self._active: ForwardCall | None = None
        self._pending: ForwardCall | None = None

    # --- hooks, called on the hot path: keep them to a few attribute writes ---------------------
    def on_forward_start(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.stop_recording()
        if not torch.is_grad_enabled():
            return
        self._pending = ForwardCall(module, args, kwargs, RngState.capture(), _autocast_state())

    def on_forward_end(self, module: torch.nn.Module, output: Any) -> None:
        pending = self._pending
        if pending is None or pending.module is not module:
            return
        self._pending = None
        flat, _ = tree_flatten(output if not hasattr(output, "to_tuple") else output.to_tuple())
        for i, value in enumerate(flat):
            if isinstance(value, torch.Tensor):
                pending.output_slots[id(value)] = (weakref.ref(value), _Slot(("out", i)))
        pending.recorder = LossRecorder(dict(pending.output_slots))
        pending.recorder.__enter__()
        self.calls.append(pending)
        self._active = pending

    def on_backward(self, tensor: torch.Tensor, gradient: torch.Tensor | None, loss: torch.Tensor | None) -> None:
        call = self._active
        self.stop_recording()
        if call is None or call.recorder is None:
            return
        call.backward_slot = call.recorder._slot_of(tensor) if isinstance(call.recorder._slot_of(tensor), _Slot) else None
        if loss is not None:
            slot = call.recorder._slot_of(loss)
            call.loss_slot = slot if isinstance(slot, _Slot) else None
        call.backward_gradient = gradient

    def produced_by_watched_call(self, tensor: torch.Tensor) -> bool:
        """True when ``tensor`` was returned by the watched module or computed from its outputs since."""
        call = self._active
        return call is not None and call.recorder is not None and isinstance(call.recorder._slot_of(tensor), _Slot)

    def stop_recording(self) -> None:
        call, self._active = self._active, None
        if call is not None and call.recorder is not None:
            try:
                call.recorder.__exit__(None, None, None)
            except (AssertionError, RuntimeError, IndexError):
                pass  # another mode was pushed above ours; it has already been unwound

    def reset(self) -> None:
        self.stop_recording()
        self.calls = []
        self._pending = None

    # --- event path ----------------------------------------------------------------------------
    def replayable(self) -> bool:
        return bool(self.calls) and all(
            c.recorder is not None and not c.recorder.overflowed and c.backward_slot is not None for c in self.calls
        )

    def batch(self) -> dict[str, Any]:
        named: dict[str, Any] = {}
        for n, call in enumerate(self.calls):
            prefix = f"micro{n}." if len(self.calls) > 1 else ""
            for name, value in named_call_arguments(call.module, call.args, call.kwargs).items():
                named[prefix + name] = value
            if call.recorder is not None:
                seen = {id(v) for v in named.values()}
                for op in call.recorder.ops:
                    for arg_name, value in _loss_tensor_args(op):
                        if id(value) not in seen:
                            named.setdefault(f"{prefix}{arg_name}", value)
                            seen.add(id(value))
                # Other data the loss code used (labels before a reshape, a mask): named by the user's frames later.
                for op in call.recorder.ops:
                    for value in tree_flatten((op.args, op.kwargs))[0]:
                        if (isinstance(value, torch.Tensor) and id(value) not in seen and not value.requires_grad
                                and not isinstance(value, torch.nn.Parameter) and value.dim() > 0
                                and not _is_additive_mask(value)):
                            named.setdefault(f"{prefix}loss_input{len(seen)}", value)
                            seen.add(id(value))
        return named

    def build_rerun(self, scale_of_backward: Callable[[], torch.Tensor | None] | None = None) -> Callable[[], torch.Tensor | None]:
        calls = list(self.calls)

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
    flat, _ = tree_flatten(output if not hasattr(output, "to_tuple") else output.to_tuple())
    values: dict[tuple[Any, ...], Any] = {}
    for i, value in enumerate(flat):
        values[("out", i)] = value

    def bind(value: Any) -> Any:
        return values.get(value.key) if isinstance(value, _Slot) else value

    for index, op in enumerate(call.recorder.ops):
        result = op.func(*tree_map(bind, op.args), **tree_map(bind, op.kwargs))
        flat_out, _ = tree_flatten(result)
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


def is_library_module(name: str) -> bool:
    """torch's and nanguard's own frames (not a user package that merely starts with those letters)."""
    return any(name == root or name.startswith(root + ".") for root in ("torch", "nanguard"))


def tensors_from_traceback(exc: BaseException) -> dict[str, Any]:
    """Tensors visible in the user's frames of the traceback, innermost first, named as the user named them."""
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    found: dict[str, Any] = {}
    seen: set[int] = set()
    for frame in reversed(frames):
        module = frame.f_globals.get("__name__", "")
        if is_library_module(module):
            continue
        for name, value in frame.f_locals.items():
            items = value.items() if isinstance(value, dict) else [(name, value)]
            for key, inner in items:
                if isinstance(inner, torch.Tensor) and not isinstance(inner, torch.nn.Parameter) and id(inner) not in seen:
                    seen.add(id(inner))
                    found.setdefault(str(key), inner)
    return found
