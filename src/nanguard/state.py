"""What a guard watches, and the one way nanguard saves and restores it.

:class:`Subjects` is what one guard trains: its optimizer, the model(s), an optional GradScaler and LR
scheduler. :class:`SavedState` is the single saved-state primitive behind rollback snapshots, forensic
replays and the re-run of a previous batch: parameters, buffers, optionally gradients, optimizer state,
the GradScaler through its ``state_dict()``, the LR scheduler through its ``state_dict()``, and every
RNG (torch CPU and CUDA, python ``random``, numpy).

It copies tensors and plain values only. It never pickles or deep-copies a GradScaler, a scheduler or
anything else that might hold the guard or an open file, so a scaler that is disabled (as nanoGPT
creates it) or in mid-iteration is no obstacle.

Two flavours of restore: a *rollback* copies saved values into whatever tensors are live now; a
*scoped* restore (``reattach=True``, for replays) also puts back the exact storage a tensor had, since
the float32 counterfactual swaps ``.data`` for an upcast copy.
"""

from __future__ import annotations

import copy
import math
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nanguard.distributed import is_dtensor
from nanguard.errors import CheckpointError
from nanguard.step.norms import simple


@dataclass(frozen=True)
class RngState:
    """Generator states. ``capture(full=False)`` takes only torch's (cheap: the per-forward-call recording
    uses it); the full capture adds python ``random`` and numpy, which cost tens of microseconds."""

    cpu: torch.Tensor
    cuda: list[torch.Tensor] | None = None
    python: Any = None
    numpy: Any = None

    @classmethod
    def capture(cls, full: bool = True) -> RngState:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        if not full:
            return cls(cpu=torch.get_rng_state(), cuda=cuda)
        return cls(cpu=torch.get_rng_state(), cuda=cuda, python=random.getstate(), numpy=_numpy_state())

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        if self.python is not None:
            random.setstate(self.python)
        if self.numpy is not None:
            import numpy as np

            np.random.set_state(self.numpy)


def _numpy_state() -> Any:
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        return None
    return np.random.get_state()


@dataclass(eq=False)
class Subjects:
    """What one guard trains. ``attach_*`` on the guard add to it; every part reads it from here."""

    optimizer: torch.optim.Optimizer | None
    models: list[torch.nn.Module] = field(default_factory=list)
    scaler: Any = None
    scheduler: Any = None
    _params: tuple[int, list[torch.Tensor], bool] | None = field(default=None, repr=False)

    def params(self) -> list[torch.Tensor]:
        """The optimizer's parameters, in param-group order (cached until a group gains parameters)."""
        return self._param_cache()[1]

    @property
    def simple(self) -> bool:
        """Plain tensors on one device, of one dtype (so are their gradients): one fused norm covers them."""
        return self._param_cache()[2]

    def _param_cache(self) -> tuple[int, list[torch.Tensor], bool]:
        if self.optimizer is None:
            return (0, [], False)
        groups = self.optimizer.param_groups
        count = sum(len(g["params"]) for g in groups) if len(groups) > 1 else len(groups[0]["params"])
        if self._params is None or self._params[0] != count:
            params = [p for g in groups for p in g["params"]]
            self._params = (count, params, bool(params) and simple(params))
        return self._params

    @property
    def scaler_enabled(self) -> bool:
        return self.scaler is not None and bool(getattr(self.scaler, "is_enabled", lambda: False)())

    def named_parameters(self) -> list[tuple[str, torch.Tensor]]:
        """Unique parameters of the models with their ``named_parameters()`` names (later models prefixed)."""
        return _unique_named(self.models, lambda m: m.named_parameters())

    def named_buffers(self) -> list[tuple[str, torch.Tensor]]:
        return _unique_named(self.models, lambda m: m.named_buffers())


def _unique_named(models: Sequence[torch.nn.Module], items: Any) -> list[tuple[str, torch.Tensor]]:
    seen: set[int] = set()
    out: list[tuple[str, torch.Tensor]] = []
    for i, model in enumerate(models):
        prefix = "" if i == 0 else f"models[{i}]."
        for name, tensor in items(model):
            if tensor is not None and id(tensor) not in seen:
                seen.add(id(tensor))
                out.append((prefix + name, tensor))
    return out


class _Copy:
    """A live tensor, a copy of its values, and (scoped) the storage holder it had when copied."""

    __slots__ = ("data", "live", "saved")

    def __init__(self, live: torch.Tensor, where: str, scoped: bool) -> None:
        self.live = live
        self.data = live.data if scoped else None
        self.saved = _copy_tensor(live.detach(), where)

    def restore(self) -> None:
        with torch.no_grad():
            if self.live.layout != torch.strided:  # a sparse gradient has no storage to copy into: swap it
                self.live.data = self.saved.clone()
            elif self.data is not None:
                if self.live.data is not self.data and (self.live.dtype != self.data.dtype
                                                        or self.live.data_ptr() != self.data.data_ptr()):
                    self.live.data = self.data
                self.data.copy_(self.saved)
            else:
                self.live.copy_(self.saved, non_blocking=self.saved.is_pinned())


def _copy_tensor(value: torch.Tensor, where: str) -> torch.Tensor:
    """``where``: "same" clones on the tensor's device; "cpu" copies to (pinned, on CUDA) host memory."""
    if where == "same" or value.device.type == "cpu" or is_dtensor(value):
        return value.clone()
    host = torch.empty(value.shape, dtype=value.dtype, pin_memory=torch.cuda.is_available())
    host.copy_(value, non_blocking=host.is_pinned())
    return host


def _copy_value(value: Any, where: str, scoped: bool) -> Any:
    if isinstance(value, torch.Tensor):
        return _Copy(value, where, scoped)
    try:
        return copy.deepcopy(value)
    except Exception:  # an exotic object in optimizer state: keep the reference rather than fail
        return value


def _restored(value: Any) -> Any:
    if isinstance(value, _Copy):
        value.restore()
        return value.live
    try:
        return copy.deepcopy(value)
    except Exception:
        return value


@dataclass
class SavedState:
    """A copy of a guard's training state, restorable any number of times. Build it with :meth:`capture`."""

    step: int | None
    subjects: Subjects
    params: list[torch.Tensor]  # the models' parameters and the optimizer's, each once
    tensors: list[_Copy]
    optimizer_state: dict[Any, dict[str, Any]] | None
    groups: list[dict[str, Any]] | None
    rng: RngState
    scaler: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    grads: list[tuple[torch.Tensor, torch.Tensor | None, _Copy | None]] | None = None
    modes: list[tuple[torch.nn.Module, bool]] | None = None
    requires_grad: list[tuple[torch.Tensor, bool]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    where: str = "same"  # where the tensor copies live: "same" (the tensors' device) or "cpu" (host memory)
    _finite: dict[bool, bool] = field(default_factory=dict, repr=False)

    @classmethod
    def capture(cls, subjects: Subjects, *, step: int | None = None, where: str = "same", scoped: bool = False,
                tensors: Iterable[torch.Tensor] = (), extra: dict[str, Any] | None = None) -> SavedState:
        """Copy the state now. ``scoped`` (replays): also gradients, module train flags, ``requires_grad``
        flags and the given extra ``tensors`` (the batch), restorable bit for bit into the same objects."""
        params: dict[int, torch.Tensor] = {id(t): t for _, t in subjects.named_parameters()}
        for t in subjects.params():
            params.setdefault(id(t), t)
        live = dict(params)
        for _, t in subjects.named_buffers():
            live.setdefault(id(t), t)
        if scoped:
            for t in tensors:
                if isinstance(t, torch.Tensor):
                    live.setdefault(id(t), t)
        optimizer = subjects.optimizer
        state = cls(
            step=step, subjects=subjects, params=list(params.values()),
            tensors=[_Copy(t, where, scoped) for t in live.values()],
            optimizer_state=None if optimizer is None else {
                p: {k: _copy_value(v, where, scoped) for k, v in values.items()} for p, values in optimizer.state.items()},
            groups=None if optimizer is None else [
                {k: _copy_value(v, where, scoped) for k, v in g.items() if k != "params"} for g in optimizer.param_groups],
            rng=RngState.capture(), scaler=scaler_state(subjects.scaler), scheduler=_scheduler_state(subjects.scheduler),
            extra=copy.deepcopy(extra or {}), where=where,
        )
        if scoped:
            state.grads = [(p, p.grad, None if p.grad is None else _Copy(p.grad, "same", True)) for p in state.params]
            state.modes = [(m, m.training) for model in subjects.models for m in model.modules()]
            state.requires_grad = [(p, p.requires_grad) for p in state.params]
        return state

    def restore(self, *, clear_grads: bool = False, rng: bool = True, schedule: bool = True) -> None:
        """Put the saved state back. ``clear_grads`` leaves every ``.grad`` None (a replay's clean start);
        ``schedule=False`` leaves the LR scheduler and the param groups' hyperparameters as they are now."""
        for saved in self.tensors:
            saved.restore()
        if self.requires_grad is not None:
            for p, flag in self.requires_grad:
                if p.requires_grad != flag:
                    p.requires_grad_(flag)
        if self.grads is not None:
            for p, grad, bits in self.grads:
                if clear_grads or grad is None or bits is None:
                    p.grad = None
                else:
                    bits.restore()
                    p.grad = grad
        if self.modes is not None:
            for module, flag in self.modes:
                module.training = flag
        self._restore_optimizer(schedule)
        if self.scaler is not None and self.subjects.scaler is not None:
            restore_scaler(self.subjects.scaler, self.scaler)
        if schedule and self.scheduler is not None and self.subjects.scheduler is not None:
            self.subjects.scheduler.load_state_dict(copy.deepcopy(self.scheduler))
        if rng:
            self.rng.restore()

    def _restore_optimizer(self, groups: bool) -> None:
        optimizer = self.subjects.optimizer
        if self.optimizer_state is None or optimizer is None:
            return
        live = optimizer.state
        for key in [k for k in live if k not in self.optimizer_state]:
            del live[key]
        for key, values in self.optimizer_state.items():
            live[key] = {k: _restored(v) for k, v in values.items()}
        if groups and self.groups is not None:
            for group, saved in zip(optimizer.param_groups, self.groups, strict=False):
                for k in [k for k in group if k != "params" and k not in saved]:
                    del group[k]
                group.update({k: _restored(v) for k, v in saved.items()})

    def restore_tensors(self, tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
        """Put back only the given live tensors (those this state saved, with unchanged shape)."""
        wanted = {id(t): t for t in tensors}
        restored = []
        for saved in self.tensors:
            live = wanted.get(id(saved.live))
            if live is not None and saved.saved.shape == live.shape:
                saved.restore()
                restored.append(live)
        return restored

    def grad_pairs(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """(parameter, gradient as it was when captured) pairs (scoped captures only)."""
        return [(p, None if bits is None else bits.saved) for p, _, bits in (self.grads or [])]

    def is_finite(self, weights_only: bool = False) -> bool:
        """Every saved parameter and buffer (and, unless ``weights_only``, optimizer buffer) is finite.

        Checked on the event path, once per snapshot (the answer is cached: a snapshot never changes)."""
        if weights_only not in self._finite:
            _wait_for_copies()
            ok = all(_finite(c.saved) for c in self.tensors)
            if ok and not weights_only:
                ok = all(_finite(v.saved if isinstance(v, _Copy) else v)
                         for values in (self.optimizer_state or {}).values() for v in values.values())
            self._finite[weights_only] = ok
        return self._finite[weights_only]

    def checkpoint(self, reason: str) -> dict[str, Any]:
        """A ``torch.save`` payload that ``torch.load(path, weights_only=True)`` accepts."""
        _wait_for_copies()
        saved = {id(c.live): c.saved for c in self.tensors}
        models = [{name: saved.get(id(t), t.detach()) for name, t in m.state_dict(keep_vars=True).items()
                   if isinstance(t, torch.Tensor)} for m in self.subjects.models]
        params = self.subjects.params()
        index = {id(p): i for i, p in enumerate(params)}
        optimizer = None if self.subjects.optimizer is None else {
            "state": {index[id(p)]: {k: (v.saved if isinstance(v, _Copy) else v) for k, v in values.items()}
                      for p, values in (self.optimizer_state or {}).items() if id(p) in index},
            "param_groups": _checkpoint_groups(self.subjects.optimizer, self.groups or [], index),
        }
        scheduler = self.scheduler if _plain(self.scheduler) else None
        return {
            "step": self.step, "reason": reason,
            "model": models[0] if len(models) == 1 else {str(i): m for i, m in enumerate(models)},
            "optimizer": optimizer, "scaler": _plain_scaler(self.scaler), "scheduler": scheduler,
            "rng_cpu": self.rng.cpu,
        }


def _checkpoint_groups(optimizer: torch.optim.Optimizer, groups: list[dict[str, Any]],
                       index: dict[int, int]) -> list[dict[str, Any]]:
    out = []
    for live, saved in zip(optimizer.param_groups, groups, strict=False):
        values = {k: (v.saved if isinstance(v, _Copy) else v) for k, v in saved.items()}
        out.append({**{k: v for k, v in values.items() if _plain(v)}, "params": [index[id(p)] for p in live["params"]]})
    return out


def _plain(value: Any) -> bool:
    """Only types ``torch.load(weights_only=True)`` accepts."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, (str, int)) and _plain(v) for k, v in value.items())
    return False


def _finite(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        if not (value.is_floating_point() or value.is_complex()):
            return True
        local = getattr(value, "_local_tensor", value)
        return bool(torch.isfinite(local).all())
    if isinstance(value, float):
        return math.isfinite(value)
    return True


def _wait_for_copies() -> None:
    """Host copies are asynchronous on CUDA: finish them before reading (event path only)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- scaler and scheduler
def scaler_state(scaler: Any) -> dict[str, Any] | None:
    """A GradScaler's ``state_dict()``, taken without reading the scale back to the host.

    ``state_dict()`` itself calls ``get_scale()`` (a host sync); when the scale tensor exists its copy
    stands in for the number, and :func:`restore_scaler` turns it back into one on the event path.
    A disabled scaler has no state (``state_dict()`` is empty).
    """
    if scaler is None or not callable(getattr(scaler, "state_dict", None)):
        return None
    if not bool(getattr(scaler, "is_enabled", lambda: True)()):
        return None
    scale, tracker = getattr(scaler, "_scale", None), getattr(scaler, "_growth_tracker", None)
    if isinstance(scale, torch.Tensor) and isinstance(tracker, torch.Tensor):
        return {"scale": scale.detach().clone(), "growth_factor": scaler.get_growth_factor(),
                "backoff_factor": scaler.get_backoff_factor(), "growth_interval": scaler.get_growth_interval(),
                "_growth_tracker": tracker.detach().clone()}
    state = scaler.state_dict()
    return dict(state) if state else None


def restore_scaler(scaler: Any, state: dict[str, Any]) -> None:
    scaler.load_state_dict(_plain_scaler(state))


def _plain_scaler(state: dict[str, Any] | None) -> dict[str, Any] | None:
    if state is None:
        return None
    out = dict(state)
    if isinstance(out.get("scale"), torch.Tensor):
        out["scale"] = float(out["scale"])
    if isinstance(out.get("_growth_tracker"), torch.Tensor):
        out["_growth_tracker"] = int(out["_growth_tracker"])
    return out


def _scheduler_state(scheduler: Any) -> dict[str, Any] | None:
    if scheduler is None or not callable(getattr(scheduler, "state_dict", None)):
        return None
    try:
        return copy.deepcopy(scheduler.state_dict())
    except Exception:  # a scheduler whose state cannot be copied is left out of the snapshot, not guessed
        return None


def write_checkpoint(path: str | os.PathLike[str], payload: dict[str, Any]) -> Path:
    """Write a checkpoint atomically: a reader never sees a half-written file, and a failed write leaves none.

    Any failure (a full disk makes ``torch.save`` raise a ``RuntimeError`` from its zip writer, not an
    ``OSError``) comes out as :class:`~nanguard.errors.CheckpointError` naming the path, with the cause chained.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except Exception as exc:
        reason = getattr(exc, "strerror", None) or (str(exc).splitlines() or [""])[0].strip()
        raise CheckpointError(f"could not write the checkpoint {path} ({type(exc).__name__}: {reason})") from exc
    finally:
        _remove_quietly(tmp)
    return path


def _remove_quietly(path: Path) -> None:
    try:
        if os.path.lexists(path):
            path.unlink()
    except OSError:
        pass


__all__ = ["RngState", "SavedState", "Subjects", "restore_scaler", "scaler_state", "write_checkpoint"]
