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
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary

# Memory straight from the allocator: whatever bits it holds are not a value anyone computed.
ALLOCATION_OPS = frozenset(
    {
        "aten::empty",
        "aten::empty_like",
        "aten::empty_strided",
        "aten::empty_permuted",
        "aten::new_empty",
        "aten::new_empty_strided",
        "aten::resize_",
        "aten::resize_as_",
        "aten::set_",
    }
)
# In-place ops that overwrite ``self`` entirely: its old contents are not an input.
OVERWRITE_OPS = frozenset(
    {
        "aten::copy_",
        "aten::fill_",
        "aten::zero_",
        "aten::normal_",
        "aten::uniform_",
        "aten::bernoulli_",
        "aten::random_",
        "aten::exponential_",
        "aten::geometric_",
        "aten::cauchy_",
        "aten::log_normal_",
    }
)
# Loss operators whose targets are recorded so label checks work without knowing the batch layout.
CLASS_TARGET_LOSS_OPS = frozenset(
    {
        "aten::nll_loss_forward",
        "aten::nll_loss2d_forward",
        "aten::nll_loss",
        "aten::nll_loss_nd",
        "aten::nll_loss2d",
        "aten::multi_margin_loss",
        "aten::cross_entropy_loss",
    }
)
OTHER_LOSS_OPS = frozenset(
    {
        "aten::binary_cross_entropy",
        "aten::binary_cross_entropy_with_logits",
        "aten::mse_loss",
        "aten::l1_loss",
        "aten::smooth_l1_loss",
        "aten::huber_loss",
        "aten::kl_div",
        "aten::soft_margin_loss",
        "aten::poisson_nll_loss",
        "aten::_ctc_loss",
        "aten::ctc_loss",
    }
)
LOSS_OPS = CLASS_TARGET_LOSS_OPS | OTHER_LOSS_OPS
SOFTMAX_OPS = frozenset({"aten::_softmax", "aten::_log_softmax", "aten::_safe_softmax", "aten::softmax"})
MAX_BIRTHS = 64
MAX_RECORDS = 64


def _is_float(t: torch.Tensor) -> bool:
    return (t.is_floating_point() or t.is_complex()) and t.device.type != "meta"


def _num(value: float) -> float | str:
    """A JSON-safe number: non-finite floats become their repr ('nan', 'inf', '-inf')."""
    value = float(value)
    return value if math.isfinite(value) else repr(value)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _tensors_in(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            if isinstance(item, torch.Tensor):
                yield item


def _scalar_repr(value: Any) -> Any:
    if isinstance(value, bool) or value is None or isinstance(value, int):
        return value
    if isinstance(value, float):
        return _num(value)
    if isinstance(value, (torch.dtype, torch.device, torch.memory_format, torch.layout)):
        return str(value)
    if (
        isinstance(value, (list, tuple))
        and len(value) <= 8
        and all(isinstance(v, (int, float)) for v in value)
    ):
        return [_scalar_repr(v) for v in value]
    return None


def absmax_values(tensors: Sequence[torch.Tensor]) -> list[float]:
    """max|t| per tensor (NaN when it holds a NaN, inf when it holds an inf), with one sync per device."""
    results: list[float] = [0.0] * len(tensors)
    by_device: dict[torch.device, list[tuple[int, torch.Tensor]]] = {}
    for i, t in enumerate(tensors):
        if t.numel() == 0 or not _is_float(t):
            continue
        try:
            value = torch.linalg.vector_norm(t.detach(), float("inf")).to(torch.float32)
        except (RuntimeError, NotImplementedError, TypeError):
            continue  # sparse or exotic layouts: treat as finite rather than fail the replay
        by_device.setdefault(value.device, []).append((i, value))
    for items in by_device.values():
        values = torch.stack([v for _, v in items]).tolist()
        for (i, _), v in zip(items, values, strict=True):
            results[i] = v
    return results


def summarize(t: torch.Tensor, name: str | None = None) -> dict[str, Any]:
    """Counts and ranges of one tensor, for quoting numbers in the evidence."""
    out: dict[str, Any] = {"shape": list(t.shape), "dtype": _dtype_name(t.dtype)}
    if name is not None:
        out = {"arg": name, **out}
    if t.numel() == 0 or t.device.type == "meta":
        return out
    with torch.no_grad():
        x = t.detach()
        if x.is_complex():
            x = x.abs()
        if not x.is_floating_point():
            if x.dtype == torch.bool:
                out["true"] = int(x.sum())
                return out
            lo, hi = torch.aminmax(x)
            out.update(min=int(lo), max=int(hi))
            return out
        finite = torch.isfinite(x)
        counts = torch.stack(
            [x.isnan().sum(), (x == math.inf).sum(), (x == -math.inf).sum(), (x == 0).sum(), (x < 0).sum()]
        ).tolist()
        out.update(nan=counts[0], posinf=counts[1], neginf=counts[2], zeros=counts[3], negatives=counts[4])
        values = x[finite]
        if values.numel():
            lo, hi = torch.aminmax(values.float())
            low, high = float(lo), float(hi)
            out.update(min=_num(low), max=_num(high), absmax=_num(max(abs(low), abs(high))))
    return out


def _rows_with(mask: torch.Tensor, limit: int = 8) -> list[int]:
    """Indices along dim 0 where ``mask`` is set anywhere (the batch rows that hold the problem)."""
    if mask.dim() == 0:
        return [0] if bool(mask) else []
    rows = mask.reshape(mask.shape[0], -1).any(dim=1).nonzero().flatten()
    return [int(r) for r in rows[:limit].tolist()]


@dataclass
class Birth:
    """Where non-finite values first appeared: an op, or a tensor that came in already non-finite."""

    index: int
    kind: str  # "nan" | "inf"
    phase: str  # "forward" | "loss" | "backward" | "input"
    op: str | None
    module: str | None
    forward_op: str | None = None  # for backward births: the forward op whose derivative this is
    backward_node: str | None = None
    source: str | None = None  # for phase "input": "parameter fc.weight", "batch field x", "constant"
    intended: bool = False  # a deliberate -inf/+inf fill (mask), not a fault by itself
    parent: int | None = None  # for a NaN made from infs: the birth of those infs
    dtype: str | None = None
    outputs: list[dict[str, Any]] = field(default_factory=list)
    inputs: list[dict[str, Any]] = field(default_factory=list)
    scalars: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def where(self) -> str:
        parts = [self.op or self.source or "?"]
        if self.module is not None:
            parts.append(f"in `{self.module or '<root>'}`")
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v not in (None, [], {})}


@dataclass
class ModuleStat:
    module: str
    dtype: str | None = None
    act_absmax: float = 0.0
    grad_absmax: float = 0.0
    nonfinite: int = 0
    _bits: int = 1 << 30

    def see(self, t: torch.Tensor, absmax: float, backward: bool) -> None:
        if not math.isfinite(absmax):
            self.nonfinite += 1
        elif backward:
            self.grad_absmax = max(self.grad_absmax, absmax)
        else:
            self.act_absmax = max(self.act_absmax, absmax)
        if not backward and t.is_floating_point():
            bits = torch.finfo(t.dtype).bits
            if bits < self._bits:
                self._bits, self.dtype = bits, _dtype_name(t.dtype)

    def to_dict(self) -> dict[str, Any]:
        limit = None
        if self.dtype is not None:
            limit = float(torch.finfo(getattr(torch, self.dtype)).max)
        return {
            "module": self.module,
            "dtype": self.dtype,
            "dtype_max": limit,
            "act_absmax": self.act_absmax,
            "grad_absmax": self.grad_absmax,
            "nonfinite": self.nonfinite,
        }


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
class _Bound:
    tensors: list[tuple[str, torch.Tensor, str]] = field(default_factory=list)
    scalars: dict[str, Any] = field(default_factory=dict)

    def by_name(self) -> dict[str, torch.Tensor]:
        return {arg: t for arg, t, role in self.tensors if role != "write"}


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
        self.loss_ops: list[dict[str, Any]] = []
        self.embedding_ops: list[dict[str, Any]] = []
        self.batchnorm_ops: list[dict[str, Any]] = []
        self.module_stats: dict[str, ModuleStat] = {}
        self.forward_ops: list[tuple[str, str | None]] = []
        self.error_context: dict[str, Any] | None = None
        self.record_errors: list[str] = []
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
            roots = [t.grad_fn for t in _tensors_in(out) if t.grad_fn is not None]
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
            for t in _tensors_in(out):
                self._flags[t] = _Flags(t._version, False, False, None)
            return out
        bound = self._bind(func, args, kwargs)
        self._busy = True
        try:
            self._record_special(name, bound, ctx)
            mutated_pre = {
                id(t): self._flags_of(t, (name, ctx))
                for _, t, role in bound.tensors
                if role == "mutated" and _is_float(t)
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

    @staticmethod
    def _bind(func: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> _Bound:
        """Tensor arguments with their role (read, mutated, write) and the scalar arguments by name."""
        name = func._schema.name
        bound = _Bound()
        positional = 0
        for arg in func._schema.arguments:
            if arg.kwarg_only:
                if arg.name not in kwargs:
                    continue
                value = kwargs[arg.name]
            elif positional < len(args):
                value = args[positional]
                positional += 1
            elif arg.name in kwargs:
                value = kwargs[arg.name]
            else:
                continue
            role = "read"
            alias = arg.alias_info
            if alias is not None and alias.is_write:
                role = (
                    "write"
                    if (arg.kwarg_only or (name in OVERWRITE_OPS and arg.name == "self"))
                    else "mutated"
                )
            tensors = list(_tensors_in(value))
            for t in tensors:
                bound.tensors.append((arg.name, t, role))
            if not tensors:
                rendered = _scalar_repr(value)
                if rendered is not None:
                    bound.scalars[arg.name] = rendered
        return bound

    def _inherit_view_flags(self, bound: _Bound, out: Any) -> None:
        """A view shares its base's values: finite base, finite view; otherwise check on use."""
        base = next((t for _, t, role in bound.tensors if role != "write"), None)
        if base is None:
            return
        cached = self._flags.get(base)
        if cached is None or cached.version != base._version:
            return
        for t in _tensors_in(out):
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
        birth = Birth(
            index=len(self.births),
            kind="nan" if flags.nan else "inf",
            phase="input",
            op=None,
            module=user[1].module if user else None,
            source=source,
            intended=source == "constant" and not flags.nan,
            dtype=_dtype_name(t.dtype),
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
        bound: _Bound,
        out: Any,
        ctx: _Context,
        mutated_pre: dict[int, _Flags],
    ) -> None:
        outs = [t for t in _tensors_in(out) if _is_float(t)]
        if not outs:
            return
        values = absmax_values(outs)
        backward = ctx.phase == "backward"
        if ctx.module is not None:
            stat = self.module_stats.setdefault(ctx.module, ModuleStat(ctx.module))
            for t, v in zip(outs, values, strict=True):
                stat.see(t, v, backward)
        for t in outs:
            if t.dtype in (torch.float16, torch.bfloat16):
                self.low_precision.add(_dtype_name(t.dtype))
        bad = [(t, v) for t, v in zip(outs, values, strict=True) if not math.isfinite(v)]
        if not bad:
            for t in outs:
                self._flags[t] = _Flags(t._version, False, False, None)
            return
        inputs: list[tuple[str, torch.Tensor, _Flags]] = []
        for arg, t, role in bound.tensors:
            if role == "write" or not _is_float(t):
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

    def _op_birth(
        self,
        kind: str,
        name: str,
        bound: _Bound,
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
            dtype=_dtype_name(outs[0].dtype),
            scalars=dict(bound.scalars),
        )
        # A non-finite scalar written into finite data is a deliberate fill (a mask), not an accident.
        birth.intended = kind == "inf" and any(v in ("inf", "-inf") for v in bound.scalars.values())
        try:
            birth.outputs = [summarize(t) for t in outs[:2]]
            birth.inputs = [summarize(t, arg) for arg, t, role in bound.tensors[:6] if role != "write"]
            birth.extra = self._extra(name, bound, outs)
        except Exception as exc:  # summaries are a courtesy: never let them break the replay
            birth.extra["summary_error"] = f"{type(exc).__name__}: {exc}"[:200]
        self._add_birth(birth)
        return birth

    @staticmethod
    def _extra(name: str, bound: _Bound, outs: list[torch.Tensor]) -> dict[str, Any]:
        extra: dict[str, Any] = {"nonfinite_rows": _rows_with(~torch.isfinite(outs[0].detach()))}
        tensors = bound.by_name()
        scalars = bound.scalars
        x = tensors.get("self") if "self" in tensors else tensors.get("input")
        if name in SOFTMAX_OPS and x is not None and x.dim() > 0:
            dim = int(scalars.get("dim", -1))
            masked = torch.isneginf(x.detach()).all(dim=dim)
            extra["rows_all_masked"] = int(masked.sum())
            extra["softmax_dim"] = dim
            extra["batch_rows_all_masked"] = _rows_with(masked)
        if "scaled_dot_product" in name:
            mask = tensors.get("attn_mask")
            if mask is not None:
                masked = (~mask).all(dim=-1) if mask.dtype == torch.bool else torch.isneginf(mask).all(dim=-1)
                extra["rows_all_masked"] = int(masked.sum())
                extra["batch_rows_all_masked"] = _rows_with(masked)
        if name == "aten::div" and "other" in tensors:
            a, b = tensors.get("self"), tensors["other"]
            extra["divisor_zeros"] = int((b == 0).sum())
            if a is not None:
                extra["zero_over_zero"] = int(((a == 0) & (b == 0)).sum())
        if "batch_norm" in name and x is not None and x.dim() >= 2:
            extra.update(batchnorm_stats(x))
        return extra

    def _record_special(self, name: str, bound: _Bound, ctx: _Context) -> None:
        """Loss targets, embedding ids and batch-norm inputs, recorded *before* the op can raise."""
        if ctx.phase == "backward":
            return
        tensors = bound.by_name()
        try:
            if name in LOSS_OPS and len(self.loss_ops) < MAX_RECORDS:
                ignore_index = bound.scalars.get("ignore_index", -100)
                self.loss_ops.append(self._loss_record(name, tensors, ctx, int(ignore_index)))
            elif "embedding" in name and "backward" not in name and len(self.embedding_ops) < MAX_RECORDS:
                weight, indices = tensors.get("weight"), tensors.get("indices")
                if weight is not None and indices is not None and indices.numel():
                    lo, hi = torch.aminmax(indices.detach())
                    size = int(weight.shape[0])
                    self.embedding_ops.append(
                        {
                            "op": name,
                            "module": ctx.module,
                            "num_embeddings": size,
                            "min": int(lo),
                            "max": int(hi),
                            "out_of_range": int(((indices < 0) | (indices >= size)).sum()),
                            "field": self._field_of(indices),
                        }
                    )
            elif "batch_norm" in name and len(self.batchnorm_ops) < MAX_RECORDS:
                x = tensors.get("input")
                if x is not None and x.dim() >= 2 and _is_float(x):
                    self.batchnorm_ops.append({"op": name, "module": ctx.module, **batchnorm_stats(x)})
        except Exception as exc:
            self.record_errors.append(f"{name}: {type(exc).__name__}: {exc}"[:200])

    def _field_of(self, t: torch.Tensor) -> str | None:
        source = self.name_of(t)
        if source and source.startswith("batch field "):
            return source[len("batch field ") :]
        for ref, label in self._named.values():
            if not label.startswith("batch field "):
                continue
            # The same values, also reshaped or flattened (``labels.reshape(-1)`` in the loss call).
            if (
                ref.numel() == t.numel()
                and ref.dtype == t.dtype
                and ref.device == t.device
                and torch.equal(ref.reshape(-1), t.reshape(-1))
            ):
                return label[len("batch field ") :]
        return None

    def _loss_record(
        self, name: str, tensors: dict[str, torch.Tensor], ctx: _Context, ignore_index: int
    ) -> dict[str, Any]:
        record: dict[str, Any] = {"op": name, "module": ctx.module, "phase": ctx.phase}
        x, target = tensors.get("self"), tensors.get("target")
        if x is None or target is None:
            return record
        record["input"] = {"shape": list(x.shape), "dtype": _dtype_name(x.dtype)}
        record["field"] = self._field_of(target)
        if name in CLASS_TARGET_LOSS_OPS and not target.is_floating_point():
            record.update(class_target_stats(x.detach(), target.detach(), ignore_index))
        else:
            record["target"] = summarize(target)
        return record


def class_target_stats(logp: torch.Tensor, target: torch.Tensor, ignore_index: int = -100) -> dict[str, Any]:
    """Out-of-range class targets, and valid targets whose input entry is -inf (a masked target logit)."""
    class_dim = 1 if logp.dim() >= 2 else 0
    classes = int(logp.shape[class_dim])
    t = target.long()
    ignored = t == ignore_index
    out_of_range = ((t < 0) | (t >= classes)) & ~ignored
    stats: dict[str, Any] = {
        "num_classes": classes,
        "ignore_index": ignore_index,
        "target_min": int(t.min()) if t.numel() else None,
        "target_max": int(t.max()) if t.numel() else None,
        "out_of_range": int(out_of_range.sum()),
        "out_of_range_values": sorted({int(v) for v in t[out_of_range][:16].tolist()}),
        "out_of_range_rows": _rows_with(out_of_range),
    }
    valid = ~(ignored | out_of_range)
    safe = torch.where(valid, t, torch.zeros_like(t))
    picked = logp.gather(class_dim, safe.unsqueeze(class_dim)).squeeze(class_dim)
    masked = torch.isneginf(picked) & valid
    stats["masked_targets"] = int(masked.sum())
    stats["masked_target_rows"] = _rows_with(masked)
    stats["nan_targets"] = int((torch.isnan(picked) & valid).sum())
    if masked.any() and logp.dim() == 2:
        # Rows whose unmasked classes form a prefix [0, k) and whose target is >= k: a label beyond the
        # classes that row's dataset has (the multi-dataset logits-masking case), not a stray mask.
        beyond = []
        for row in masked.nonzero().flatten()[:16].tolist():
            live = torch.isfinite(logp[row]) | (logp[row] > -math.inf)
            k = int(live.sum())
            if k and bool(live[:k].all()) and int(t[row]) >= k:
                beyond.append({"row": row, "target": int(t[row]), "valid_classes": k})
        stats["targets_beyond_valid_prefix"] = beyond
    return stats


def batchnorm_stats(x: torch.Tensor) -> dict[str, Any]:
    """Values per channel and channels with zero batch variance: the two ways batch statistics degenerate."""
    with torch.no_grad():
        flat = x.detach().transpose(0, 1).reshape(x.shape[1], -1).float()
        per_channel = int(flat.shape[1])
        zero_var = int((flat.var(dim=1, unbiased=False) == 0).sum()) if per_channel else 0
    return {
        "values_per_channel": per_channel,
        "channels": int(x.shape[1]),
        "zero_variance_channels": zero_var,
    }


def root_of(births: Sequence[Birth], birth: Birth) -> Birth:
    """Follow a NaN back to the infs it was made from, stopping at a deliberate fill (a mask)."""
    seen = {birth.index}
    while birth.parent is not None and birth.parent < len(births) and birth.parent not in seen:
        parent = births[birth.parent]
        if parent.intended:
            break
        seen.add(parent.index)
        birth = parent
    return birth


def iter_births(
    births: Iterable[Birth], kind: str | None = None, phase: str | None = None
) -> Iterator[Birth]:
    for birth in births:
        if (kind is None or birth.kind == kind) and (phase is None or birth.phase == phase):
            yield birth
