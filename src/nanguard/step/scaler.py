"""GradScaler as the guard sees it: unscaled losses, and the steps the scaler skips on its own.

``GradScaler.scale`` and ``GradScaler.step`` are patched on the class, process-wide, while a guard is
open (refcounted, see :mod:`nanguard.patches`); nothing is written onto a scaler instance, so a user's
scaler stays picklable and its ``state_dict()`` unchanged. ``scale`` tells the loss book which scaled
tensor stands for which loss. ``step`` hands a guarded optimizer's step to its guard, which attaches the
scaler if it was not given one and counts a step the scaler skipped (an fp16 overflow) without calling
``optimizer.step()``.

:class:`ScalerSkips` sorts those skips: an overflow the scaler will outgrow by lowering its scale (silent,
as the early skips of every fp16 run are), or a NaN that survives a replay at loss scale 1, which no scale
can fix and which the guard then treats as the bad step it is (see :mod:`nanguard.forensics.scale`).
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable
from typing import Any, Protocol

import torch

from nanguard import distributed as dist_utils
from nanguard import patches
from nanguard.config import GuardConfig
from nanguard.forensics.capture import ForwardCall, step_capture
from nanguard.forensics.request import StepCapture
from nanguard.forensics.scale import ScaleTest, unit_scale_replay
from nanguard.state import Subjects
from nanguard.step import lockstep
from nanguard.step.losses import BOOK


class ScalerClient(Protocol):
    def on_scaler_step(self, scaler: Any, call: Callable[[], Any]) -> Any: ...


_CLIENTS: weakref.WeakKeyDictionary[torch.optim.Optimizer, ScalerClient] = weakref.WeakKeyDictionary()
_DEPTH = threading.local()
_LAST: list[weakref.ref[Any]] = []  # the scaler that scaled a loss last (a zero-code guard meets it at its step)


def last_scaler() -> Any:
    """The GradScaler that scaled a loss most recently, if it still exists."""
    return _LAST[0]() if _LAST else None


def _dispatch_modes_off() -> contextlib.AbstractContextManager[Any]:
    disable = getattr(torch.utils._python_dispatch, "_disable_current_modes", None)
    return disable() if disable is not None else contextlib.nullcontext()


def _make_scale(original: Any) -> Any:
    def scale(self: Any, outputs: Any) -> Any:
        if isinstance(outputs, torch.Tensor) and getattr(self, "_scale", 0) is None and self.is_enabled():
            # Create the scale tensor outside any loss recording: a replay must multiply by the scaler's own
            # tensor (which a replay at loss scale 1 sets to 1), not re-create it at its initial value.
            with _dispatch_modes_off():
                self._lazy_init_scale_growth_tracker(outputs.device)
        scaled = original(self, outputs)
        if isinstance(outputs, torch.Tensor) and isinstance(scaled, torch.Tensor):
            BOOK.note_scaled(scaled, outputs)
            if not _LAST or _LAST[0]() is not self:
                _LAST[:] = [weakref.ref(self)]
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


class ScalerSkips:
    """Per guard: which GradScaler skips are overflows and which are NaNs that survive loss scale 1.

    A replay costs one forward and backward, so within a streak of skips only the 1st to 4th and then every
    power of two are replayed; the others take the answer of the last replay of their streak. A good step
    ends the streak. Nothing is replayed with ``forensics=False`` or ``scaler_replay=False``, under FSDP (no
    rank may replay alone), or when the verdict reached the host after a later update (the state moved on).
    """

    def __init__(self, config: GuardConfig, subjects: Subjects,
                 scope: Callable[[], contextlib.AbstractContextManager[Any]]) -> None:
        self.config = config
        self.subjects = subjects
        self.scope = scope  # an isolated replay: no collective, no loss accounting, no recording
        self.streak = 0
        self.last: ScaleTest | None = None
        self.replays = 0

    def on_good(self) -> None:
        self.streak = 0
        self.last = None

    def classify(self, calls: list[ForwardCall], closure: StepCapture | None, *, pre_step: bool,
                 together: bool) -> ScaleTest | None:
        """The scale test for this skip (or the streak's last one); None when nothing is known.
        ``together``: every rank decides this step in lockstep and must reach the same answer."""
        self.streak += 1
        streak = self.streak
        due = streak <= 4 or streak & (streak - 1) == 0
        if due and self._can_replay(pre_step):
            capture, _, _ = step_capture(calls, closure, rename=False)
            self.last = unit_scale_replay(self.subjects, capture, self.scope())
            self.replays += 1
            if together and dist_utils.is_distributed():
                flag = torch.tensor([1.0 if self.last.survives else 0.0])
                if bool(lockstep.gather(flag).amax() > 0) and not self.last.survives:
                    self.last = ScaleTest(True, self.last.scale, ["another rank's replay at loss scale 1 kept its "
                                                                  "gradients non-finite"])
        return self.last

    def _can_replay(self, pre_step: bool) -> bool:
        cfg = self.config
        return (pre_step and cfg.forensics and cfg.scaler_replay
                and not dist_utils.uses_sharded_parameters(self.subjects.models))


__all__ = ["ScalerClient", "ScalerSkips", "last_scaler", "unwatch", "watch"]
