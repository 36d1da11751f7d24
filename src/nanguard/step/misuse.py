"""Gradients clipped or measured while the GradScaler's scale is still on them.

``scaler.scale(loss).backward(); clip_grad_norm_(params, 1.0); scaler.step(opt)`` clips gradients that are
65,536 times too large: the clip coefficient is 65,536 times too small, and once ``scaler.step`` unscales
them every update is that much smaller than intended. Nothing fails; the run just stops learning. The
same holds for a gradient norm logged or compared with a threshold before ``scaler.unscale_(optimizer)``.

The functions every such call goes through are patched process-wide while a guard is open (refcounted,
see :mod:`nanguard.patches`): ``_get_total_norm`` and ``_clip_grads_with_norm_`` of
``torch.nn.utils.clip_grad`` (``clip_grad_norm_`` looks both up at call time, however the script imported
it) with their public names ``get_total_norm`` and ``clip_grads_with_norm_``, and ``clip_grad_value_``.
Each call asks the open guards' :class:`MisuseWatch` es whether their gradients are still scaled: a
backward of a scaled loss reached them since their last step, and the GradScaler has not unscaled them for
their optimizer (its per-optimizer stage is still ``READY``). That is a few host lookups, no tensor work;
the first misuse of each kind is kept (with the norm tensor, unread) and reported at the guard's step.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from nanguard import patches
from nanguard.forensics.scale import scale_tensor
from nanguard.step.scaler import last_scaler

_WATCHES: list[weakref.ref[MisuseWatch]] = []


@dataclass
class Misuse:
    """One call that measured or clipped scaled gradients (numbers read only when it is reported)."""

    call: str  # "clip_grad_norm_", "get_total_norm", "clip_grad_value_", "clip_grads_with_norm_"
    scale: torch.Tensor  # a copy of the loss scale at the call
    norm: torch.Tensor | None = None  # the (scaled) norm the call computed
    max_norm: float | None = None  # the clip threshold, when the norm was used to clip
    clip_value: float | None = None


class MisuseWatch:
    """One guard's side of the check: are its gradients still scaled, and what misused them."""

    def __init__(self, optimizer: torch.optim.Optimizer, scaler: Callable[[], Any]) -> None:
        self.optimizer = optimizer
        self.scaler = scaler  # the guard's GradScaler, when it knows one
        self.scaled_backward = False  # a scaled loss's backward reached this guard since its last step
        self.found: list[Misuse] = []
        self.reported: set[str] = set()

    def note_backward(self, scaled: bool) -> None:
        if scaled:
            self.scaled_backward = True

    def scaler_on_grads(self) -> Any:
        """The GradScaler whose scale is still on this guard's gradients, or None."""
        if not self.scaled_backward:
            return None
        scaler = self.scaler() or last_scaler()
        if scale_tensor(scaler) is None:
            return None
        state = getattr(scaler, "_per_optimizer_states", {}).get(id(self.optimizer))  # .get: never create one
        return scaler if state is None or getattr(state.get("stage"), "name", "READY") == "READY" else None

    def owns(self, grads: list[torch.Tensor]) -> bool:
        wanted = {id(g) for g in grads}
        return any(id(p.grad) in wanted for group in self.optimizer.param_groups for p in group["params"]
                   if p.grad is not None)

    def note(self, misuse: Misuse) -> None:
        if misuse.call not in self.reported and all(m.call != misuse.call for m in self.found):
            self.found.append(misuse)

    def note_clip(self, norm: torch.Tensor, max_norm: float) -> None:
        """``_clip_grads_with_norm_`` used a norm this watch saw measured: that measurement clipped."""
        for misuse in self.found:
            if misuse.norm is norm:
                misuse.max_norm = max_norm

    def take(self) -> list[Misuse]:
        """What to report at this step (each kind once per run); the step resets the backward flag."""
        found, self.found = self.found, []
        self.reported.update(m.call for m in found)
        self.scaled_backward = False
        return found


# ------------------------------------------------------------------------------------------ the patches
def _watches() -> list[MisuseWatch]:
    return [w for w in (ref() for ref in _WATCHES) if w is not None]


def _as_list(tensors: torch.Tensor | Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)


def _seen(call: str, grads: list[torch.Tensor], norm: torch.Tensor | None, clip_value: float | None = None) -> None:
    for watch in _watches():
        scaler = watch.scaler_on_grads()
        if scaler is not None and watch.owns(grads):
            scale = scaler._scale.detach().clone()
            watch.note(Misuse(call, scale, norm=norm, clip_value=clip_value))


def _make_norm(call: str) -> Callable[[Any], Any]:
    def make(original: Any) -> Any:
        def total_norm(tensors: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
            tensors = _as_list(tensors)
            norm = original(tensors, *args, **kwargs)
            if _WATCHES:
                _seen(call, tensors, norm)
            return norm

        total_norm.__wrapped__ = original  # type: ignore[attr-defined]
        return total_norm

    return make


def _make_clip_with_norm(original: Any) -> Any:
    def clip_grads_with_norm_(parameters: Any, max_norm: float, total_norm: torch.Tensor, *args: Any,
                              **kwargs: Any) -> Any:
        if _WATCHES:
            for watch in _watches():
                watch.note_clip(total_norm, float(max_norm))
        return original(parameters, max_norm, total_norm, *args, **kwargs)

    clip_grads_with_norm_.__wrapped__ = original  # type: ignore[attr-defined]
    return clip_grads_with_norm_


def _make_clip_value(original: Any) -> Any:
    def clip_grad_value_(parameters: Any, clip_value: float, *args: Any, **kwargs: Any) -> Any:
        parameters = _as_list(parameters)
        if _WATCHES:
            _seen("clip_grad_value_", [p.grad for p in parameters if p.grad is not None], None, float(clip_value))
        return original(parameters, clip_value, *args, **kwargs)

    clip_grad_value_.__wrapped__ = original  # type: ignore[attr-defined]
    return clip_grad_value_


def watch(misuse: MisuseWatch) -> list[patches.Lease]:
    """Check ``misuse``'s gradients at every clip and norm call from now on; release the leases to stop."""
    _WATCHES[:] = [ref for ref in _WATCHES if ref() is not None] + [weakref.ref(misuse)]
    utils, clip = torch.nn.utils, torch.nn.utils.clip_grad
    leases = [patches.acquire(clip, "_get_total_norm", _make_norm("clip_grad_norm_")),
              patches.acquire(clip, "_clip_grads_with_norm_", _make_clip_with_norm),
              patches.acquire(clip, "clip_grad_value_", _make_clip_value)]
    for name, make in (("get_total_norm", _make_norm("get_total_norm")),
                       ("clip_grads_with_norm_", _make_clip_with_norm), ("clip_grad_value_", _make_clip_value)):
        if hasattr(utils, name):
            leases.append(patches.acquire(utils, name, make))
    return leases


def unwatch(misuse: MisuseWatch, leases: list[patches.Lease]) -> None:
    _WATCHES[:] = [ref for ref in _WATCHES if ref() is not None and ref() is not misuse]
    for lease in leases:
        lease.release()


__all__ = ["Misuse", "MisuseWatch", "unwatch", "watch"]
