"""What the tracer finds: where non-finite values were born, and the summaries that explain them."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


def is_float(t: torch.Tensor) -> bool:
    return (t.is_floating_point() or t.is_complex()) and t.device.type != "meta"


def num(value: float) -> float | str:
    """A JSON-safe number: non-finite floats become their repr ('nan', 'inf', '-inf')."""
    value = float(value)
    return value if math.isfinite(value) else repr(value)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def tensors_in(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            if isinstance(item, torch.Tensor):
                yield item


def scalar_repr(value: Any) -> Any:
    if isinstance(value, bool) or value is None or isinstance(value, int):
        return value
    if isinstance(value, float):
        return num(value)
    if isinstance(value, (torch.dtype, torch.device, torch.memory_format, torch.layout)):
        return str(value)
    if (
        isinstance(value, (list, tuple))
        and len(value) <= 8
        and all(isinstance(v, (int, float)) for v in value)
    ):
        return [scalar_repr(v) for v in value]
    return None


def absmax_values(tensors: Sequence[torch.Tensor]) -> list[float]:
    """max|t| per tensor (NaN when it holds a NaN, inf when it holds an inf), with one sync per device."""
    results: list[float] = [0.0] * len(tensors)
    by_device: dict[torch.device, list[tuple[int, torch.Tensor]]] = {}
    for i, t in enumerate(tensors):
        if t.numel() == 0 or not is_float(t):
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
    out: dict[str, Any] = {"shape": list(t.shape), "dtype": dtype_name(t.dtype)}
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
            out.update(min=num(low), max=num(high), absmax=num(max(abs(low), abs(high))))
    return out


def rows_with(mask: torch.Tensor, limit: int = 8) -> list[int]:
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
        if self.module == "":
            parts.append("in the root module")
        elif self.module is not None:
            head, _, rest = self.module.partition(".")
            parts.append(f"in `model[{head}]{'.' + rest if rest else ''}`" if head.isdigit() else f"in `{self.module}`")
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
    forward_nonfinite: int = 0  # op outputs holding NaN/Inf in forward and loss (intended mask fills excluded)
    backward_nonfinite: int = 0
    role: str = "clean"  # "birth" | "upstream" | "downstream" | "clean", set by the tracer after the replay
    first_op: int = -1  # index of the first forward op that ran in the module (to tell upstream from downstream)
    _bits: int = 1 << 30

    def count_nonfinite(self, backward: bool) -> None:
        """One op output of this module held a NaN/Inf that was not an intended mask fill."""
        self.nonfinite += 1
        if backward:
            self.backward_nonfinite += 1
        else:
            self.forward_nonfinite += 1

    def see(self, t: torch.Tensor, absmax: float, backward: bool) -> None:
        if not math.isfinite(absmax):
            return
        if backward:
            self.grad_absmax = max(self.grad_absmax, absmax)
        else:
            self.act_absmax = max(self.act_absmax, absmax)
        if not backward and t.is_floating_point():
            bits = torch.finfo(t.dtype).bits
            if bits < self._bits:
                self._bits, self.dtype = bits, dtype_name(t.dtype)

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
            "forward_nonfinite": self.forward_nonfinite,
            "backward_nonfinite": self.backward_nonfinite,
            "role": self.role,
            "first_op": self.first_op,
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
