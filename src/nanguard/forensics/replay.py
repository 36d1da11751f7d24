"""Re-run the bad step faithfully, as many times as the checks need, and leave no trace of having done so.

``TrainingState`` saves parameters, buffers, gradients, optimizer state, GradScaler state, batch tensors,
module train/eval flags and every RNG, and puts them back *bitwise* (same tensor objects, same bits),
before each replay and once more at the end. ``replay`` runs ``capture.rerun()`` under optional
instruments and reports what came out: the loss, and which gradients are non-finite.

``Float32Mode`` is the counterfactual "what if this step ran in float32": parameters, buffers and
batch tensors in half precision are upcast in place for the replay, and a dispatch mode upcasts the
inputs of every op and rewrites any cast or allocation to fp16/bf16 into float32. That works the same
for autocast (its casts are refused) and for pure-half models (their weights are upcast).
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from nanguard.forensics.request import StepCapture

LOW_PRECISION = (torch.float16, torch.bfloat16)


def named_parameters(models: Sequence[torch.nn.Module]) -> list[tuple[str, torch.nn.Parameter]]:
    """Unique parameters with their ``named_parameters()`` names (models after the first are prefixed)."""
    seen: set[int] = set()
    out: list[tuple[str, torch.nn.Parameter]] = []
    for i, model in enumerate(models):
        prefix = "" if i == 0 else f"models[{i}]."
        for name, p in model.named_parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append((prefix + name, p))
    return out


def named_buffers(models: Sequence[torch.nn.Module]) -> list[tuple[str, torch.Tensor]]:
    seen: set[int] = set()
    out: list[tuple[str, torch.Tensor]] = []
    for i, model in enumerate(models):
        prefix = "" if i == 0 else f"models[{i}]."
        for name, b in model.named_buffers():
            if b is not None and id(b) not in seen:
                seen.add(id(b))
                out.append((prefix + name, b))
    return out


def optimizer_params(optimizer: torch.optim.Optimizer | None) -> list[torch.Tensor]:
    if optimizer is None:
        return []
    return [p for group in optimizer.param_groups for p in group["params"]]


@dataclass
class _Saved:
    """A tensor's object, its storage-holding ``.data`` and a copy of its bits."""

    ref: torch.Tensor
    data: torch.Tensor
    bits: torch.Tensor

    @classmethod
    def of(cls, t: torch.Tensor) -> _Saved:
        data = t.data
        return cls(t, data, data.clone())

    def restore(self) -> None:
        with torch.no_grad():
            current = self.ref.data
            if current.dtype != self.data.dtype or current.data_ptr() != self.data.data_ptr():
                self.ref.data = self.data
            self.data.copy_(self.bits)


def _save_values(values: dict[Any, Any]) -> dict[Any, Any]:
    return {k: (_Saved.of(v) if isinstance(v, torch.Tensor) else copy.deepcopy(v)) for k, v in values.items()}


def _restore_values(saved: dict[Any, Any]) -> dict[Any, Any]:
    out: dict[Any, Any] = {}
    for k, v in saved.items():
        if isinstance(v, _Saved):
            v.restore()
            out[k] = v.ref
        else:
            out[k] = copy.deepcopy(v)
    return out


def _rng_get() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    with contextlib.suppress(ImportError):
        import numpy as np

        state["numpy"] = np.random.get_state()
    return state


def _rng_set(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


class TrainingState:
    """Everything a replay could disturb, saved on construction and restorable any number of times."""

    def __init__(
        self,
        models: Sequence[torch.nn.Module],
        optimizer: torch.optim.Optimizer | None = None,
        scaler: Any | None = None,
        batch: dict[str, Any] | None = None,
    ) -> None:
        self.models = list(models)
        self.optimizer = optimizer
        self.scaler = scaler
        params: dict[int, torch.Tensor] = {}
        for _, param in named_parameters(self.models):
            params[id(param)] = param
        for tensor in optimizer_params(optimizer):
            params.setdefault(id(tensor), tensor)
        self.params = list(params.values())
        self._params = [_Saved.of(p) for p in self.params]
        self._requires_grad = [p.requires_grad for p in self.params]
        self._grads = [(p.grad, p.grad.clone() if p.grad is not None else None) for p in self.params]
        self._buffers = [_Saved.of(b) for _, b in named_buffers(self.models)]
        self._training = [(m, m.training) for model in self.models for m in model.modules()]
        self._batch = [_Saved.of(t) for t in (batch or {}).values() if isinstance(t, torch.Tensor)]
        self._optimizer = self._save_optimizer(optimizer)
        self._scaler = self._save_object(scaler)
        self._rng = _rng_get()

    @staticmethod
    def _save_optimizer(optimizer: torch.optim.Optimizer | None) -> dict[str, Any] | None:
        if optimizer is None:
            return None
        state = {key: _save_values(value) for key, value in optimizer.state.items()}
        groups = [_save_values({k: v for k, v in g.items() if k != "params"}) for g in optimizer.param_groups]
        return {"state": state, "groups": groups}

    @staticmethod
    def _save_object(obj: Any) -> dict[str, Any] | None:
        if obj is None or not hasattr(obj, "__dict__"):
            return None
        saved: dict[str, Any] = {}
        for k, v in vars(obj).items():
            if isinstance(v, torch.Tensor):
                saved[k] = _Saved.of(v)
            else:
                try:
                    saved[k] = copy.deepcopy(v)
                except Exception:
                    saved[k] = v
        return saved

    def restore(self, *, clear_grads: bool = False) -> None:
        """Put everything back as it was at construction; ``clear_grads`` leaves ``.grad`` None instead."""
        for saved in self._params + self._buffers + self._batch:
            saved.restore()
        for p, flag in zip(self.params, self._requires_grad, strict=True):
            if p.requires_grad != flag:
                p.requires_grad_(flag)
        for p, (grad, bits) in zip(self.params, self._grads, strict=True):
            if clear_grads or grad is None:
                p.grad = None
            else:
                with torch.no_grad():
                    grad.copy_(bits)  # type: ignore[arg-type]
                p.grad = grad
        for module, flag in self._training:
            module.training = flag
        self._restore_optimizer()
        if self._scaler is not None:
            for k, v in self._scaler.items():
                if isinstance(v, _Saved):
                    v.restore()
                    setattr(self.scaler, k, v.ref)
                else:
                    setattr(self.scaler, k, copy.deepcopy(v) if not callable(v) else v)
        _rng_set(self._rng)

    def _restore_optimizer(self) -> None:
        if self.optimizer is None or self._optimizer is None:
            return
        state = self.optimizer.state
        saved_state = self._optimizer["state"]
        for key in [k for k in state if k not in saved_state]:
            del state[key]
        for key, values in saved_state.items():
            state[key] = _restore_values(values)
        for group, saved in zip(self.optimizer.param_groups, self._optimizer["groups"], strict=False):
            for k in [k for k in group if k != "params" and k not in saved]:
                del group[k]
            group.update(_restore_values(saved))

    def entry_grads(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """(parameter, gradient as it was on entry) pairs, the bad step's own gradients."""
        return [(p, bits) for p, (_, bits) in zip(self.params, self._grads, strict=True)]


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
    state: TrainingState,
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

    The caller's ``TrainingState.restore`` puts the original half-precision storage back.
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
