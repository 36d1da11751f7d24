"""Operator tracer: find the first operator that made a NaN or an inf during a replayed step.

Three instruments work together while one step is replayed:

* module forward pre/post hooks keep a stack of ``named_modules()`` names, so every operator knows
  which module called it ('' = the root; no module on the stack after the root returned = loss code);
* a ``TorchFunctionMode`` sees each torch-level call return with its autograd node attached and maps
  every new node to (module, phase, forward aten op), so backward operators can be blamed on the
  forward op and module that created them;
* a ``TorchDispatchMode`` sees every aten operator in forward and backward, checks its outputs
  (one fused abs-max reduction per output, one host sync per op) and, when an output is non-finite,
  its inputs: NaN out of NaN-free inputs is a NaN *birth*, inf out of finite inputs an inf *birth*.
  Every non-finite tensor remembers which birth it descends from, so the loss's NaN can be traced
  back to, say, the ``-inf`` mask fill that fed the softmax that made it.

The tracer is heavy by design: it only ever runs on a replay of a step that already went wrong.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary

from nanguard.forensics.trace.births import (
    Birth,
    ModuleStat,
    absmax_values,
    dtype_name,
    is_float,
    summarize,
    tensors_in,
)
from nanguard.forensics.trace.inputs import InputRecords, op_extra
from nanguard.forensics.trace.ops import ALLOCATION_OPS, MAX_BIRTHS, Bound, bind


@dataclass
class _Flags:
    version: int
    nan: bool
    inf: bool
    origin: int | None
    lazy: bool = False  # a view of non-finite data: its own values are checked when it is used


@dataclass
class _NodeInfo:
    node: Any
    module: str | None
    phase: str
    op: str | None


@dataclass
class _Context:
    phase: str
    module: str | None
    forward_op: str | None = None
    backward_node: str | None = None


def _norm(name: str) -> str:
    return name.split("::")[-1].replace("_", "").lower()


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


class _DispatchSpy(TorchDispatchMode):
    def __init__(self, tracer: OpTracer) -> None:
        super().__init__()
        self.tracer = tracer

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        return self.tracer._on_op(func, args, kwargs or {})


class _FunctionSpy(TorchFunctionMode):
    def __init__(self, tracer: OpTracer) -> None:
        super().__init__()
        self.tracer = tracer

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        tracer = self.tracer
        if tracer._busy:
            return func(*args, **kwargs)
        start = len(tracer.forward_ops)
        out = func(*args, **kwargs)
        tracer._attribute_nodes(out, func, start)
        return out


class OpTracer:
    """Context manager that instruments the models and records births while a step is replayed."""

    def __init__(
        self,
        models: Sequence[torch.nn.Module],
        batch: dict[str, Any] | None = None,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        self.models = list(models)
        self.births: list[Birth] = []
        self.inputs = InputRecords(self._field_of)
        self.module_stats: dict[str, ModuleStat] = {}
        self.forward_ops: list[tuple[str, str | None]] = []
        self.error_context: dict[str, Any] | None = None
        self.low_precision: set[str] = set()
        self.op_count = 0
        self.last_nonfinite_origin: dict[str, int | None] = {}
        self._stack: list[str] = []
        self._roots_done = 0
        self._busy = False
        self._flags: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._nodes: dict[int, _NodeInfo] = {}
        self._handles: list[Any] = []
        self._modes: list[Any] = []
        self._roots: set[int] = set()
        self._module_names: dict[int, str] = {}
        self._named: dict[int, tuple[Any, str]] = {}
        self._named_storage: dict[int, str] = {}
        self._param_owner: dict[int, str] = {}
        self._index_names(batch or {}, optimizer)

    # ----------------------------------------------------------------- naming
    def _index_names(self, batch: dict[str, Any], optimizer: torch.optim.Optimizer | None) -> None:
        for i, model in enumerate(self.models):
            prefix = "" if i == 0 else f"models[{i}]"
            self._roots.add(id(model))
            for name, module in model.named_modules():
                full = ".".join(p for p in (prefix, name) if p)
                self._module_names.setdefault(id(module), full)
                for pname, p in module.named_parameters(recurse=False):
                    self._name_tensor(p, f"parameter {full + '.' if full else ''}{pname}")
                    self._param_owner.setdefault(id(p), full)
                for bname, b in module.named_buffers(recurse=False):
                    if b is not None:
                        self._name_tensor(b, f"buffer {full + '.' if full else ''}{bname}")
        for key, value in batch.items():
            if isinstance(value, torch.Tensor):
                self._name_tensor(value, f"batch field {key}")

    def _name_tensor(self, t: torch.Tensor, name: str) -> None:
        self._named.setdefault(id(t), (t, name))
        try:
            if t.numel():
                self._named_storage.setdefault(t.untyped_storage().data_ptr(), name)
        except (RuntimeError, NotImplementedError):
            pass

    def name_of(self, t: torch.Tensor) -> str | None:
        hit = self._named.get(id(t))
        if hit is not None and hit[0] is t:
            return hit[1]
        try:
            return self._named_storage.get(t.untyped_storage().data_ptr()) if t.numel() else None
        except (RuntimeError, NotImplementedError):
            return None

    def origin_of(self, t: torch.Tensor | None) -> Birth | None:
        """The birth a traced tensor's non-finite values descend from, if it was seen non-finite."""
        if t is None:
            return None
        cached = self._flags.get(t)
        if cached is not None and cached.origin is not None and cached.origin < len(self.births):
            return self.births[cached.origin]
        return None

    def last_origin(self, phase: str) -> Birth | None:
        index = self.last_nonfinite_origin.get(phase)
        return self.births[index] if index is not None and index < len(self.births) else None

    # ------------------------------------------------------------ install
    def __enter__(self) -> OpTracer:
        for model in self.models:
            for module in model.modules():
                name = self._module_names.get(id(module))
                if name is None:
                    continue
                self._handles.append(module.register_forward_pre_hook(self._make_pre_hook(name)))
                self._handles.append(module.register_forward_hook(self._make_post_hook(name)))
        function_spy, dispatch_spy = _FunctionSpy(self), _DispatchSpy(self)
        function_spy.__enter__()
        self._modes.append(function_spy)
        dispatch_spy.__enter__()
        self._modes.append(dispatch_spy)
        return self

    def __exit__(self, *exc: Any) -> None:
        while self._modes:
            self._modes.pop().__exit__(None, None, None)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._nodes.clear()  # drop our references to the autograd graph

    def _make_pre_hook(self, name: str):
        def pre_hook(module: torch.nn.Module, args: Any) -> None:
            self._stack.append(name)

        return pre_hook

    def _make_post_hook(self, name: str):
        def post_hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            # Without always_call, a module that raised stays on the stack: error_context keeps it.
            if self._stack and self._stack[-1] == name:
                self._stack.pop()
            if id(module) in self._roots and not self._stack:
                self._roots_done += 1

        return post_hook

    # ------------------------------------------------------------ attribution
    def _context(self) -> _Context:
        node = torch._C._current_autograd_node()
        if node is None:
            if self._stack:
                return _Context("forward", self._stack[-1])
            return _Context("loss" if self._roots_done else "forward", None)
        node_name = type(node).__name__
        info = self._nodes.get(id(node))
        if info is not None and info.node is node:
            return _Context("backward", info.module, info.op, node_name)
        if node_name == "AccumulateGrad":
            variable = getattr(node, "variable", None)
            owner = self._param_owner.get(id(variable)) if variable is not None else None
            return _Context("backward", owner, "accumulate_grad", node_name)
        return _Context("backward", None, None, node_name)

    def _attribute_nodes(self, out: Any, func: Any, start: int) -> None:
        self._busy = True
        try:
            roots = [t.grad_fn for t in tensors_in(out) if t.grad_fn is not None]
            if not roots:
                return
            ctx = self._context()
            if ctx.phase == "backward":
                return
            ops = self.forward_ops[start:]
            queue, budget = list(roots), 10_000
            while queue and budget:
                node = queue.pop()
                budget -= 1
                known = self._nodes.get(id(node))
                if (known is not None and known.node is node) or type(node).__name__ == "AccumulateGrad":
                    continue
                self._nodes[id(node)] = _NodeInfo(
                    node, ctx.module, ctx.phase, self._match_op(node, ops, func)
                )
                queue.extend(nxt for nxt, _ in node.next_functions if nxt is not None)
        finally:
            self._busy = False

    @staticmethod
    def _match_op(node: Any, ops: Sequence[tuple[str, str | None]], func: Any) -> str:
        node_name = re.sub(r"Backward\d*$", "", type(node).__name__)
        key = _norm(node_name)
        for name, _ in reversed(ops):
            candidate = _norm(name)
            if candidate == key or (
                len(key) >= 3 and (candidate.startswith(key) or key.startswith(candidate))
            ):
                return name
        if len(ops) == 1:
            return ops[0][0]
        if node_name and node_name[0].isupper():
            return "aten::" + _snake(node_name)
        return str(getattr(func, "__name__", node_name))

    # ------------------------------------------------------------ per op
    def _on_op(self, func: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        name = func._schema.name
        self.op_count += 1
        if self._busy:
            return func(*args, **kwargs)
        ctx = self._context()
        if ctx.phase != "backward":
            self.forward_ops.append((name, ctx.module))
        if name in ALLOCATION_OPS:
            out = func(*args, **kwargs)
            for t in tensors_in(out):
                self._flags[t] = _Flags(t._version, False, False, None)
            return out
        bound = bind(func, args, kwargs)
        self._busy = True
        try:
            if ctx.phase != "backward":
                self.inputs.record(name, bound.by_name(), bound.scalars, ctx.module, ctx.phase)
            mutated_pre = {
                id(t): self._flags_of(t, (name, ctx))
                for _, t, role in bound.tensors
                if role == "mutated" and is_float(t)
            }
        finally:
            self._busy = False
        try:
            out = func(*args, **kwargs)
        except Exception as exc:
            if self.error_context is None:
                self.error_context = {
                    "op": name,
                    "phase": ctx.phase,
                    "module": ctx.module,
                    "module_stack": list(self._stack),
                    "forward_op": ctx.forward_op,
                    "error": f"{type(exc).__name__}: {exc}"[:300],
                }
            raise
        if getattr(func, "is_view", False) or name in ("aten::detach", "aten::lift_fresh", "aten::alias"):
            self._inherit_view_flags(bound, out)
            return out
        self._busy = True
        try:
            self._after_op(name, bound, out, ctx, mutated_pre)
        finally:
            self._busy = False
        return out

    def _inherit_view_flags(self, bound: Bound, out: Any) -> None:
        """A view shares its base's values: finite base, finite view; otherwise check on use."""
        base = next((t for _, t, role in bound.tensors if role != "write"), None)
        if base is None:
            return
        cached = self._flags.get(base)
        if cached is None or cached.version != base._version:
            return
        for t in tensors_in(out):
            bad = cached.nan or cached.inf
            self._flags[t] = _Flags(t._version, cached.nan, cached.inf, cached.origin, lazy=bad)

    def _flags_of(self, t: torch.Tensor, user: tuple[str, _Context] | None = None) -> _Flags:
        cached = self._flags.get(t)
        if cached is not None and cached.version == t._version and not cached.lazy:
            return cached
        value = absmax_values([t])[0]
        flags = _Flags(t._version, math.isnan(value), math.isinf(value), None)
        if flags.nan or flags.inf:
            inherited = cached.origin if cached is not None and cached.version == t._version else None
            flags.origin = inherited if inherited is not None else self._external_birth(t, flags, user).index
        self._flags[t] = flags
        return flags

    def _external_birth(self, t: torch.Tensor, flags: _Flags, user: tuple[str, _Context] | None) -> Birth:
        """A tensor that entered the step already non-finite: a parameter, a batch field or a constant."""
        source = self.name_of(t) or "constant"
        ctx = user[1] if user is not None else None
        if source == "constant" and ctx is not None and ctx.phase == "backward":
            # Made inside a composite backward formula by work the tracer cannot see (a fill of a view, C++
            # internals of LinalgEighBackward0): born in that backward, attributed to its forward op.
            assert user is not None
            birth = Birth(index=len(self.births), kind="nan" if flags.nan else "inf", phase="backward",
                          op=user[0], module=ctx.module, forward_op=ctx.forward_op, backward_node=ctx.backward_node,
                          dtype=dtype_name(t.dtype), outputs=[summarize(t)], extra={"made_inside_backward": True})
            self._add_birth(birth)
            return birth
        birth = Birth(
            index=len(self.births),
            kind="nan" if flags.nan else "inf",
            phase="input",
            op=None,
            module=user[1].module if user else None,
            source=source,
            intended=source == "constant" and not flags.nan,
            dtype=dtype_name(t.dtype),
            outputs=[summarize(t)],
        )
        if user is not None:
            birth.extra = {"first_used_by": user[0], "first_used_in_phase": user[1].phase}
        self._add_birth(birth)
        return birth

    def _add_birth(self, birth: Birth) -> None:
        birth.index = len(self.births)
        if len(self.births) < MAX_BIRTHS:
            self.births.append(birth)
        else:  # keep the index space consistent without growing: reuse the last slot
            birth.index = len(self.births) - 1

    def _after_op(
        self,
        name: str,
        bound: Bound,
        out: Any,
        ctx: _Context,
        mutated_pre: dict[int, _Flags],
    ) -> None:
        outs = [t for t in tensors_in(out) if is_float(t)]
        if not outs:
            return
        values = absmax_values(outs)
        backward = ctx.phase == "backward"
        stat = None
        if ctx.module is not None:
            stat = self.module_stats.setdefault(ctx.module, ModuleStat(ctx.module))
            if stat.first_op < 0 and not backward:
                stat.first_op = len(self.forward_ops) - 1
            for t, v in zip(outs, values, strict=True):
                stat.see(t, v, backward)
        for t in outs:
            if t.dtype in (torch.float16, torch.bfloat16):
                self.low_precision.add(dtype_name(t.dtype))
        bad = [(t, v) for t, v in zip(outs, values, strict=True) if not math.isfinite(v)]
        if not bad:
            for t in outs:
                self._flags[t] = _Flags(t._version, False, False, None)
            return
        inputs: list[tuple[str, torch.Tensor, _Flags]] = []
        for arg, t, role in bound.tensors:
            if role == "write" or not is_float(t):
                continue
            pre = mutated_pre.get(id(t)) if role == "mutated" else None
            inputs.append((arg, t, pre if pre is not None else self._flags_of(t, (name, ctx))))
        in_nan = [f for _, _, f in inputs if f.nan]
        in_inf = [f for _, _, f in inputs if f.inf]
        out_nan = any(math.isnan(v) for _, v in bad)
        origin: int | None
        if out_nan and not in_nan:
            parent = in_inf[0].origin if in_inf else None
            origin = self._op_birth("nan", name, bound, outs, ctx, parent).index
        elif not out_nan and not in_nan and not in_inf:
            origin = self._op_birth("inf", name, bound, outs, ctx, None).index
        else:
            source = in_nan if out_nan and in_nan else (in_nan or in_inf)
            origin = source[0].origin
        for t, v in zip(outs, values, strict=True):
            finite = math.isfinite(v)
            self._flags[t] = _Flags(t._version, math.isnan(v), math.isinf(v), None if finite else origin)
        self.last_nonfinite_origin[ctx.phase] = origin
        intended = origin is not None and 0 <= origin < len(self.births) and self.births[origin].intended
        if stat is not None and not (intended and not out_nan):
            for _ in bad:
                stat.count_nonfinite(backward)

    def _op_birth(
        self,
        kind: str,
        name: str,
        bound: Bound,
        outs: list[torch.Tensor],
        ctx: _Context,
        parent: int | None,
    ) -> Birth:
        birth = Birth(
            index=len(self.births),
            kind=kind,
            phase=ctx.phase,
            op=name,
            module=ctx.module,
            forward_op=ctx.forward_op,
            backward_node=ctx.backward_node,
            parent=parent,
            dtype=dtype_name(outs[0].dtype),
            scalars=dict(bound.scalars),
        )
        if ctx.phase != "backward":
            birth.extra["op_index"] = len(self.forward_ops) - 1
        # A non-finite scalar written into finite data is a deliberate fill (a mask), not an accident.
        birth.intended = kind == "inf" and any(v in ("inf", "-inf") for v in bound.scalars.values())
        try:
            birth.outputs = [summarize(t) for t in outs[:2]]
            birth.inputs = [summarize(t, arg) for arg, t, role in bound.tensors[:6] if role != "write"]
            birth.extra = {**birth.extra, **op_extra(name, bound.by_name(), bound.scalars, outs)}
        except Exception as exc:  # summaries are a courtesy: never let them break the replay
            birth.extra["summary_error"] = f"{type(exc).__name__}: {exc}"[:200]
        self._add_birth(birth)
        return birth

    @property
    def loss_ops(self) -> list[dict[str, Any]]:
        return self.inputs.loss_ops

    @property
    def embedding_ops(self) -> list[dict[str, Any]]:
        return self.inputs.embedding_ops

    @property
    def batchnorm_ops(self) -> list[dict[str, Any]]:
        return self.inputs.batchnorm_ops

    @property
    def record_errors(self) -> list[str]:
        return self.inputs.errors

    def _field_of(self, t: torch.Tensor) -> str | None:
        """The batch field ``t`` is, or holds the same values as (``labels.reshape(-1)`` in a loss call)."""
        source = self.name_of(t)
        if source and source.startswith("batch field "):
            return source[len("batch field ") :]
        for ref, label in self._named.values():
            if not label.startswith("batch field "):
                continue
            if (
                ref.numel() == t.numel()
                and ref.dtype == t.dtype
                and ref.device == t.device
                and torch.equal(ref.reshape(-1), t.reshape(-1))
            ):
                return label[len("batch field ") :]
        return None
