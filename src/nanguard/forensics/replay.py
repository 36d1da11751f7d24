"""Re-run the bad step faithfully, as many times as the checks need, and leave no trace of having done so.

A scoped :class:`~nanguard.state.SavedState` holds parameters, buffers, gradients, optimizer state,
GradScaler state (through its ``state_dict()``), batch tensors, module train/eval flags and every RNG,
and puts them back *bitwise* (same tensor objects, same bits) before each replay and once more at the
end. ``replay`` runs ``capture.rerun()`` under optional instruments and reports what came out: the
loss, and which gradients are non-finite.

``Float32Mode`` is the counterfactual "what if this step ran in float32": parameters, buffers and
batch tensors in half precision are upcast in place for the replay, and a dispatch mode upcasts the
inputs of every op and rewrites any cast or allocation to fp16/bf16 into float32. That works the same
for autocast (its casts are refused) and for pure-half models (their weights are upcast).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from nanguard.forensics.request import StepCapture
from nanguard.state import SavedState, Subjects

LOW_PRECISION = (torch.float16, torch.bfloat16)


def named_parameters(models: Sequence[torch.nn.Module]) -> list[tuple[str, torch.Tensor]]:
    """Unique parameters with their ``named_parameters()`` names (models after the first are prefixed)."""
    return Subjects(None, list(models)).named_parameters()


def named_buffers(models: Sequence[torch.nn.Module]) -> list[tuple[str, torch.Tensor]]:
    return Subjects(None, list(models)).named_buffers()


@dataclass
class ReplayOutcome:
    """What one replay produced."""

    label: str
    loss: float | None = None
    grad_nonfinite: dict[str, dict[str, int]] = field(default_factory=dict)
    grad_norms: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    exception: BaseException | None = None
    seconds: float = 0.0
    loss_tensor: torch.Tensor | None = None

    @property
    def loss_finite(self) -> bool:
        return self.loss is not None and math.isfinite(self.loss)

    @property
    def grads_finite(self) -> bool:
        return not self.grad_nonfinite

    @property
    def finite(self) -> bool:
        return self.error is None and (self.loss is None or self.loss_finite) and self.grads_finite

    @property
    def total_grad_norm(self) -> float:
        return math.sqrt(sum(v * v for v in self.grad_norms.values())) if self.grad_norms else 0.0

    def to_dict(self) -> dict[str, Any]:
        top = sorted(self.grad_norms.items(), key=lambda kv: -kv[1] if math.isfinite(kv[1]) else -math.inf)[
            :5
        ]
        return {
            "label": self.label,
            "loss": None
            if self.loss is None
            else (self.loss if math.isfinite(self.loss) else repr(self.loss)),
            "finite": self.finite,
            "grad_nonfinite": dict(list(self.grad_nonfinite.items())[:20]),
            "grad_norm": _json(self.total_grad_norm),
            "top_grad_norms": {k: _json(v) for k, v in top},
            "error": self.error,
            "seconds": round(self.seconds, 4),
        }


def _json(value: float) -> float | str:
    return value if math.isfinite(value) else repr(value)


def grad_report(
    names: dict[int, str], params: Sequence[torch.Tensor]
) -> tuple[dict[str, dict[str, int]], dict[str, float]]:
    """Non-finite counts and norms of the gradients now in ``.grad``, by parameter name."""
    bad: dict[str, dict[str, int]] = {}
    norms: dict[str, float] = {}
    grads = [(names.get(id(p), f"param{i}"), p.grad) for i, p in enumerate(params) if p.grad is not None]
    if not grads:
        return bad, norms
    with torch.no_grad():
        values = torch.stack(
            [torch.linalg.vector_norm(g.detach().float()).to(grads[0][1].device) for _, g in grads]
        ).tolist()
    for (name, g), norm in zip(grads, values, strict=True):
        norms[name] = norm
        if not math.isfinite(norm):
            counts = torch.stack([g.isnan().sum(), g.isinf().sum()]).tolist()
            if counts[0] or counts[1]:
                bad[name] = {"nan": int(counts[0]), "inf": int(counts[1]), "numel": g.numel()}
            else:  # finite entries whose squares overflow the norm: huge, not non-finite
                norms[name] = float(g.detach().abs().max().double()) * math.sqrt(g.numel())
    return bad, norms


def replay(
    capture: StepCapture,
    state: SavedState,
    names: dict[int, str],
    *,
    label: str,
    instruments: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
) -> ReplayOutcome:
    """Run the step again from the saved state, under ``instruments``, and report what came out."""
    outcome = ReplayOutcome(label=label)
    rerun = capture.rerun
    if rerun is None:
        outcome.error = "no rerun: the step cannot be replayed"
        return outcome
    state.restore(clear_grads=True)
    if capture.rng_state is not None:
        capture.rng_state.restore()
    start = time.perf_counter()
    try:
        context = instruments() if instruments is not None else contextlib.nullcontext()
        with context:
            loss = rerun()
        if isinstance(loss, torch.Tensor):
            outcome.loss_tensor = loss
            outcome.loss = float(loss.detach().float().sum()) if loss.numel() else None
        elif isinstance(loss, (int, float)):
            outcome.loss = float(loss)
    except Exception as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"[:400]
        outcome.exception = exc
    outcome.seconds = time.perf_counter() - start
    try:
        outcome.grad_nonfinite, outcome.grad_norms = grad_report(names, state.params)
    except Exception as exc:
        outcome.error = outcome.error or f"grad check failed: {type(exc).__name__}: {exc}"[:400]
    return outcome


# --------------------------------------------------------------------------- float32 counterfactual
def _upcast(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.dtype in LOW_PRECISION:
        return value.float()
    if isinstance(value, torch.dtype) and value in LOW_PRECISION:
        return torch.float32
    return value


class _Float32Dispatch(TorchDispatchMode):
    """Every op sees float32 where it would have seen fp16/bf16; casts down to them are refused."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = dict(kwargs or {})
        schema = func._schema
        mutated = {
            i
            for i, arg in enumerate(schema.arguments)
            if arg.alias_info is not None and arg.alias_info.is_write
        }
        new_args = [a if i in mutated else tree_map(_upcast, a) for i, a in enumerate(args)]
        written = {
            arg.name for arg in schema.arguments if arg.alias_info is not None and arg.alias_info.is_write
        }
        new_kwargs = {k: (v if k in written else tree_map(_upcast, v)) for k, v in kwargs.items()}
        if schema.name in ("aten::_softmax", "aten::_log_softmax") and len(new_args) >= 3:
            new_args[2] = False  # half_to_float only applies to half inputs, which no longer exist
        return func(*new_args, **new_kwargs)


@contextlib.contextmanager
def float32_mode(tensors: Sequence[torch.Tensor]) -> Iterator[None]:
    """Upcast ``tensors`` (parameters, buffers, batch) in place, and run everything in float32.

    The caller's scoped ``SavedState.restore`` puts the original half-precision storage back.
    """
    with torch.no_grad():
        for t in tensors:
            if t.dtype in LOW_PRECISION:
                t.data = t.data.float()
    with _Float32Dispatch():
        yield


def low_precision_tensors(models: Sequence[torch.nn.Module], batch: dict[str, Any]) -> list[torch.Tensor]:
    tensors: list[torch.Tensor] = [p for _, p in named_parameters(models)]
    tensors += [b for _, b in named_buffers(models)]
    tensors += [t for t in batch.values() if isinstance(t, torch.Tensor)]
    return [t for t in tensors if t.dtype in LOW_PRECISION]
