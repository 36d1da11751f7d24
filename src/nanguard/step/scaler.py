"""GradScaler as the guard sees it: unscaled losses, and the steps the scaler skips on its own.

``GradScaler.scale`` and ``GradScaler.step`` are patched on the class, process-wide, while a guard is
open (refcounted, see :mod:`nanguard.patches`); nothing is written onto a scaler instance, so a user's
scaler stays picklable and its ``state_dict()`` unchanged. ``scale`` tells the loss book which scaled
tensor stands for which loss. ``step`` hands a guarded optimizer's step to its guard, which attaches the
scaler if it was not given one and counts a step the scaler skipped (an fp16 overflow) without calling
``optimizer.step()``.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any, Protocol

import torch

from nanguard import patches
from nanguard.step.losses import BOOK


class ScalerClient(Protocol):
    def on_scaler_step(self, scaler: Any, call: Callable[[], Any]) -> Any: ...


_CLIENTS: weakref.WeakKeyDictionary[torch.optim.Optimizer, ScalerClient] = weakref.WeakKeyDictionary()
_DEPTH = threading.local()


def _make_scale(original: Any) -> Any:
    def scale(self: Any, outputs: Any) -> Any:
        scaled = original(self, outputs)
        if isinstance(outputs, torch.Tensor) and isinstance(scaled, torch.Tensor):
            BOOK.note_scaled(scaled, outputs)
        return scaled

    scale.__wrapped__ = original  # type: ignore[attr-defined]
    return scale


def _make_step(original: Any) -> Any:
    def step(self: Any, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        client = _CLIENTS.get(optimizer)
        depth = getattr(_DEPTH, "value", 0)
        if client is None or depth:  # not guarded, or a subclass's step calling its base's: pass through
            return original(self, optimizer, *args, **kwargs)
        _DEPTH.value = depth + 1
        try:
            return client.on_scaler_step(self, lambda: original(self, optimizer, *args, **kwargs))
        finally:
            _DEPTH.value = depth

    step.__wrapped__ = original  # type: ignore[attr-defined]
    return step


def _defining_class(cls: type, name: str) -> type:
    return next((klass for klass in cls.__mro__ if name in klass.__dict__), cls)


def watch(client: ScalerClient, optimizer: torch.optim.Optimizer, scaler_type: type | None = None) -> list[patches.Lease]:
    """Route ``optimizer``'s scaler steps to ``client``; returns the leases to release on close."""
    _CLIENTS[optimizer] = client
    classes: list[type] = [torch.amp.GradScaler] if hasattr(torch.amp, "GradScaler") else []
    if scaler_type is not None and scaler_type not in classes:
        classes.append(scaler_type)
    leases = []
    for cls in classes:
        leases.append(patches.acquire(_defining_class(cls, "scale"), "scale", _make_scale))
        leases.append(patches.acquire(_defining_class(cls, "step"), "step", _make_step))
    return leases


def unwatch(client: ScalerClient, optimizer: torch.optim.Optimizer, leases: list[patches.Lease]) -> None:
    if _CLIENTS.get(optimizer) is client:
        del _CLIENTS[optimizer]
    for lease in leases:
        lease.release()


__all__ = ["ScalerClient", "unwatch", "watch"]
