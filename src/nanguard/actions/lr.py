"""The learning rate, as the guard steers it: a multiplier, a held scheduler, and what each update used.

* The LR backoff is a multiplier applied around each real ``optimizer.step()`` and undone right after,
  so a scheduler that rewrites ``param_group["lr"]`` every step cannot undo it; it recovers gradually.
* A scheduler must not advance past a step the guard skipped. Its class's ``step`` is patched while a
  guard holds one of its instances (refcounted, see :mod:`nanguard.patches`), and a registry of held
  instances decides; nothing is written onto the scheduler, so its ``state_dict()`` stays the user's.
* The learning rate each applied update used is remembered, so a spike of it can be named.
* After a learning-rate spike the LR is *pinned*: while the schedule's value stays ``JUMP`` times above
  the level the updates used before the jump, each update uses that earlier level instead (the
  multiplier is ``level / schedule``); once the schedule comes back below, the pin is released.
"""

from __future__ import annotations

import weakref
from collections import deque
from typing import Any

import torch

from nanguard import patches
from nanguard.causes import fixes_for
from nanguard.config import GuardConfig
from nanguard.events import Diagnosis

_HELD: weakref.WeakKeyDictionary[Any, LearningRate] = weakref.WeakKeyDictionary()
JUMP = 3.0  # an update whose LR is this many times the median of the ones before it used a spiked LR


def _make_scheduler_step(original: Any) -> Any:
    def step(self: Any, *args: Any, **kwargs: Any) -> Any:
        owner = _HELD.get(self)
        if owner is not None and owner.consume_hold():
            return None
        return original(self, *args, **kwargs)

    step.__wrapped__ = original  # type: ignore[attr-defined]
    return step


def _defining_class(cls: type, name: str) -> type:
    return next((klass for klass in cls.__mro__ if name in klass.__dict__), cls)


class LearningRate:
    """One guard's LR multiplier, its scheduler hold and the record of applied learning rates."""

    def __init__(self, config: GuardConfig, optimizer: torch.optim.Optimizer) -> None:
        self.config = config
        self.optimizer = optimizer
        self.multiplier = 1.0
        self._restore_factor = (1.0 / config.lr_backoff) ** (1.0 / max(1, config.lr_restore_steps))
        self._hold = False
        self._leases: dict[int, tuple[Any, patches.Lease]] = {}
        self.applied: deque[tuple[int, float]] = deque(maxlen=64)
        self.pinned: float | None = None  # the LR level held while the schedule stays spiked

    # ------------------------------------------------------------------ multiplier
    def back_off(self) -> None:
        self.multiplier *= self.config.lr_backoff

    def on_good_step(self) -> None:
        if self.multiplier < 1.0:
            self.multiplier = min(1.0, self.multiplier * self._restore_factor)

    def pin(self, level: float) -> None:
        """Hold updates at ``level`` while the schedule stays spiked above it."""
        self.pinned = level

    def _factor(self) -> float:
        """The multiplier times the pin's factor (releasing the pin once the schedule is back in line)."""
        if self.pinned is None:
            return self.multiplier
        groups = self.optimizer.param_groups
        lr = groups[0].get("lr") if groups else None
        if lr is None or isinstance(lr, torch.Tensor) or float(lr) * self.multiplier < JUMP * self.pinned:
            self.pinned = None
            return self.multiplier
        return self.pinned / float(lr)

    def apply(self, step: int) -> list[Any] | None:
        """Scale every group's LR by the multiplier (and the pin) for one real update; pass the result to
        :meth:`restore`."""
        groups = self.optimizer.param_groups
        first = groups[0]["lr"] if groups else None
        factor = self._factor()
        if first is not None and not isinstance(first, torch.Tensor):
            self.applied.append((step, float(first) * factor))
        if factor == 1.0:
            return None
        saved = [group["lr"] for group in groups]
        for group in groups:
            group["lr"] = group["lr"] * factor
        return saved

    def restore(self, saved: list[Any] | None) -> None:
        if saved is not None:
            for group, lr in zip(self.optimizer.param_groups, saved, strict=False):
                group["lr"] = lr

    def current(self) -> float | None:
        """The learning rate the next update would use (the schedule's value times the multiplier)."""
        groups = self.optimizer.param_groups
        lr = groups[0].get("lr") if groups else None
        if lr is None or isinstance(lr, torch.Tensor):
            return None
        if self.pinned is not None and float(lr) * self.multiplier >= JUMP * self.pinned:
            return self.pinned
        return float(lr) * self.multiplier

    # ------------------------------------------------------------------ scheduler hold
    def hold(self, scheduler: Any) -> None:
        """Watch ``scheduler``: its next ``step()`` after a skipped optimizer step does nothing."""
        if id(scheduler) in self._leases:
            return
        _HELD[scheduler] = self
        owner = _defining_class(type(scheduler), "step")
        self._leases[id(scheduler)] = (weakref.ref(scheduler), patches.acquire(owner, "step", _make_scheduler_step))

    def hold_next(self) -> None:
        if not self.config.advance_scheduler_on_skip:
            self._hold = True

    def consume_hold(self) -> bool:
        held, self._hold = self._hold, False
        return held

    def release(self) -> None:
        for ref, lease in self._leases.values():
            scheduler = ref()
            if scheduler is not None and _HELD.get(scheduler) is self:
                del _HELD[scheduler]
            lease.release()
        self._leases.clear()

    # ------------------------------------------------------------------ evidence
    def jump(self, step: int) -> tuple[int, float, float] | None:
        """(step, lr, typical lr) of the last update before ``step`` when its LR was ``JUMP`` times the median
        of the updates before it, else None."""
        earlier = [(s, lr) for s, lr in self.applied if s < step]
        if len(earlier) < 4:
            return None
        last_step, last_lr = earlier[-1]
        typical = sorted(lr for _, lr in earlier[:-1])[len(earlier[:-1]) // 2]
        if typical <= 0 or last_lr < JUMP * typical:
            return None
        return last_step, last_lr, typical

    def blame(self, step: int, diagnosis: Diagnosis) -> None:
        """The last update damaged the weights: if its learning rate jumped, that is the story to tell.

        The spike's own words (loss far above its level, "inspect the samples") are replaced, not added to:
        the batch is not what to look at. Calling it again for the same step changes nothing.
        """
        found = self.jump(step)
        if found is None or diagnosis.cause == "learning_rate_spike":
            return
        last_step, last_lr, typical = found
        diagnosis.cause = "learning_rate_spike"
        diagnosis.phase = "optimizer"
        diagnosis.evidence.insert(0, f"the update at step {last_step} used lr={last_lr:.4g}, {last_lr / typical:.3g}x the "
                                     f"median lr {typical:.4g} of the steps before it: a learning-rate spike")
        diagnosis.fixes = fixes_for("learning_rate_spike", step=last_step)
        diagnosis.confidence = max(diagnosis.confidence, 0.8)

    def state_dict(self) -> dict[str, Any]:
        return {"multiplier": self.multiplier, "applied": list(self.applied), "pinned": self.pinned}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.multiplier = float(state.get("multiplier", 1.0))
        pinned = state.get("pinned")
        self.pinned = float(pinned) if pinned is not None else None
        self.applied.clear()
        self.applied.extend((int(s), float(lr)) for s, lr in state.get("applied", []))


__all__ = ["LearningRate"]
