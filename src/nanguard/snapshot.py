"""A ring of in-memory copies of the training state, to roll back to after a bad step.

A snapshot holds model parameters and buffers, optimizer state, GradScaler and LR-scheduler state, the
RNG states and the guard's own counters. Tensors are copied to pinned host memory with non-blocking
copies on CUDA, so taking one costs the copy bandwidth and no synchronisation; on CPU it is a memcpy.
"""

from __future__ import annotations

import copy
import math
import os
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nanguard.forensics.request import RngState


def _to_host(value: Any, pin: bool) -> Any:
    if isinstance(value, torch.Tensor):
        if value.device.type == "cpu":
            return value.detach().clone()
        host = torch.empty(value.shape, dtype=value.dtype, pin_memory=pin)
        host.copy_(value.detach(), non_blocking=pin)
        return host
    if isinstance(value, dict):
        return {k: _to_host(v, pin) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_host(v, pin) for v in value)
    return copy.deepcopy(value)


def _tensors_finite(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return not value.is_floating_point() or bool(torch.isfinite(value).all())
    if isinstance(value, dict):
        return all(_tensors_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(_tensors_finite(v) for v in value)
    if isinstance(value, float):
        return math.isfinite(value)
    return True


@dataclass
class Snapshot:
    step: int
    models: list[dict[str, torch.Tensor]]
    optimizer: dict[str, Any] | None
    scaler: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    rng: RngState | None = None
    python_rng: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    def is_finite(self, weights_only: bool = False) -> bool:
        return _tensors_finite(self.models) and (weights_only or _tensors_finite(self.optimizer))


class SnapshotRing:
    def __init__(self, keep: int) -> None:
        self._ring: deque[Snapshot] = deque(maxlen=keep)

    def __len__(self) -> int:
        return len(self._ring)

    def take(
        self,
        step: int,
        models: Sequence[torch.nn.Module],
        optimizer: torch.optim.Optimizer | None,
        scaler: Any = None,
        scheduler: Any = None,
        extra: dict[str, Any] | None = None,
    ) -> Snapshot:
        pin = torch.cuda.is_available()
        snap = Snapshot(
            step=step,
            models=[_to_host(m.state_dict(keep_vars=False), pin) for m in models],
            optimizer=_to_host(optimizer.state_dict(), pin) if optimizer is not None else None,
            scaler=_scaler_state(scaler, pin),
            scheduler=copy.deepcopy(scheduler.state_dict()) if scheduler is not None else None,
            rng=RngState.capture(),
            python_rng=random.getstate(),
            extra=copy.deepcopy(extra or {}),
        )
        self._ring.append(snap)
        return snap

    def newest_finite(self, *, at_most: int | None = None, exclude: frozenset[int] | set[int] = frozenset(),
                      weights_only: bool = False) -> Snapshot | None:
        """The newest snapshot whose tensors are all finite (checked now, on the event path).

        ``at_most``: only snapshots taken before step ``at_most`` ran; ``exclude``: snapshot steps known to be bad.
        """
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()  # pinned copies are asynchronous; finish them before reading
        for snap in reversed(self._ring):
            if (at_most is None or snap.step <= at_most) and snap.step not in exclude and snap.is_finite(weights_only):
                return snap
        return None



def _scaler_state(scaler: Any, pin: bool) -> dict[str, Any] | None:
    """GradScaler's tensors, copied without ``state_dict()`` (which reads the scale back: a sync)."""
    if scaler is None or not scaler.is_enabled() or getattr(scaler, "_scale", None) is None:
        return None
    return {"_scale": _to_host(scaler._scale, pin), "_growth_tracker": _to_host(scaler._growth_tracker, pin)}


def restore(
    snap: Snapshot,
    models: Sequence[torch.nn.Module],
    optimizer: torch.optim.Optimizer | None,
    scaler: Any = None,
    scheduler: Any = None,
) -> None:
    """Copy a snapshot back into the live objects, in place, bit for bit."""
    with torch.no_grad():
        for model, state in zip(models, snap.models, strict=False):
            live = model.state_dict(keep_vars=True)
            for name, saved in state.items():
                target = live.get(name)
                if isinstance(target, torch.Tensor):
                    target.copy_(saved)
    if optimizer is not None and snap.optimizer is not None:
        optimizer.load_state_dict(copy.deepcopy(snap.optimizer))
    if scaler is not None and snap.scaler is not None and getattr(scaler, "_scale", None) is not None:
        scaler._scale.copy_(snap.scaler["_scale"])
        scaler._growth_tracker.copy_(snap.scaler["_growth_tracker"])
    if scheduler is not None and snap.scheduler is not None:
        scheduler.load_state_dict(copy.deepcopy(snap.scheduler))
    if snap.rng is not None:
        snap.rng.restore()
    if snap.python_rng is not None:
        random.setstate(snap.python_rng)


def save_checkpoint(path: str | os.PathLike[str], snap: Snapshot, reason: str) -> Path:
    """Write a snapshot to disk atomically, loadable with ``torch.load(path, weights_only=True)``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "step": snap.step,
        "reason": reason,
        "model": snap.models[0] if len(snap.models) == 1 else {str(i): m for i, m in enumerate(snap.models)},
        "optimizer": snap.optimizer,
        "scaler": snap.scaler,
        "scheduler": snap.scheduler,
        "rng_cpu": snap.rng.cpu if snap.rng is not None else None,
    }
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path
