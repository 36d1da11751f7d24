"""Rollback: a ring of snapshots of the training state, which of them to trust, and repairs.

A snapshot is a :class:`~nanguard.state.SavedState`: parameters, buffers, optimizer state, GradScaler,
LR scheduler and every RNG, plus the detector's statistics. A rollback restores all of it except the
learning-rate schedule: the scheduler's position and the param groups' hyperparameters stay where they
are, because rolling the weights back does not rewind the step count or the data (a schedule rewound
to an earlier step would replay, say, the LR bug that caused the rollback). The statistics come back
with the weights, so they describe the restored model. The emergency checkpoint holds the scheduler's
state of its step, for a resume from it. With ``snapshot_device="cpu"`` (default) tensors go to pinned host memory with
non-blocking copies; ``"same"`` keeps them on the parameters' device (faster to restore, costs device
memory). The first snapshot is taken at the first step, not at construction: a script that loads a
checkpoint after creating its optimizer must roll back to the loaded state, not the initial one.

A snapshot is *trusted* once ``TRUST_AFTER`` good steps have run from it: a snapshot taken right after an
update that ruined the weights while its own loss still looked normal (a learning-rate spike shows in the
next step's loss) never earns that, so a rollback prefers the newest trusted snapshot, and so does the
emergency checkpoint. After a rollback the snapshots newer than the restored one describe an abandoned
timeline and are dropped.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from nanguard.config import GuardConfig
from nanguard.state import SavedState, Subjects, write_checkpoint

TRUST_AFTER = 5


class Rollback:
    """Owns the snapshots of one guard."""

    def __init__(self, config: GuardConfig, subjects: Subjects, extra: Callable[[], dict[str, Any]]) -> None:
        self.config = config
        self.subjects = subjects
        self.extra = extra
        self.ring: deque[SavedState] = deque(maxlen=config.snapshot_keep)
        self._failed: set[int] = set()
        self._last_restored: tuple[int, int] | None = None  # (snapshot step, step it was restored at)
        self._good_after: dict[int, int] = {}  # id(snapshot) -> good steps run from it so far

    def __len__(self) -> int:
        return len(self.ring)

    def take(self, step: int) -> SavedState:
        where = "same" if self.config.snapshot_device == "same" else "cpu"
        snap = SavedState.capture(self.subjects, step=step, where=where, extra=self.extra())
        if len(self.ring) == self.ring.maxlen:
            self._good_after.pop(id(self.ring[0]), None)
        self.ring.append(snap)
        self._good_after[id(snap)] = 0
        return snap

    def trusted(self, snap: SavedState) -> bool:
        return self._good_after.get(id(snap), 0) >= TRUST_AFTER

    def on_step_start(self, step: int) -> None:
        if self.config.snapshot_every and not self.ring:
            self.take(step)

    def on_good_step(self, step: int) -> None:
        for key in self._good_after:
            self._good_after[key] += 1
        every = self.config.snapshot_every
        if every and step > 0 and step % every == 0:
            self.take(step + 1)  # the state from just before step ``step + 1``

    def reset(self) -> None:
        """Forget every snapshot (the models changed: old snapshots no longer describe them)."""
        self.ring.clear()
        self._failed.clear()
        self._last_restored = None
        self._good_after.clear()

    def newest_finite(self, *, at_most: int | None = None, exclude: set[int] | frozenset[int] = frozenset(),
                      weights_only: bool = False) -> SavedState | None:
        """The newest snapshot whose tensors are all finite, trusted ones first (see the module docstring).
        ``at_most``: taken before step ``at_most`` ran."""
        for trusted_only in (True, False):
            for snap in reversed(self.ring):
                step = snap.step if snap.step is not None else -1
                if trusted_only and not self.trusted(snap):
                    continue
                if (at_most is None or step <= at_most) and step not in exclude and snap.is_finite(weights_only):
                    return snap
        return None

    def can_restore(self) -> bool:
        return self.newest_finite(weights_only=True) is not None

    def restore(self, step: int, streak_start: int | None, before: int | None = None) -> SavedState | None:
        """Restore the newest trustworthy snapshot; returns it (None: nothing to restore).

        A snapshot taken right after the update that preceded the trouble may already hold that update's
        damage (a learning-rate bug leaves finite but ruined weights), so prefer a trusted one taken before the
        streak began (``before``: the step of the first bad update, when known); and a snapshot that failed
        again soon after being restored is not used twice.
        """
        start = streak_start if streak_start is not None else step
        if before is not None:
            start = min(start, before + 1)
        recent = self._last_restored
        if recent is not None and step - recent[1] <= max(self.config.snapshot_every, 10):
            self._failed.add(recent[0])
        snap = (self.newest_finite(at_most=start - 1, exclude=self._failed)
                or self.newest_finite(exclude=self._failed) or self.newest_finite())
        if snap is None:
            # No snapshot is finite throughout, e.g. a resumed checkpoint whose Adam moments hold NaN: restore the
            # weights from one whose weights are finite and start the broken optimizer buffers afresh.
            snap = self.newest_finite(weights_only=True)
            if snap is None:
                return None
            snap.restore(schedule=False)
            self._reset_nonfinite_optimizer_state()
        else:
            self._last_restored = (snap.step if snap.step is not None else -1, step)
            snap.restore(schedule=False)
        for param in self.subjects.params():
            param.grad = None
        self._drop_newer_than(snap)
        return snap

    def _drop_newer_than(self, snap: SavedState) -> None:
        if snap.step is None:
            return
        kept = [s for s in self.ring if s.step is None or s.step <= snap.step]
        kept_ids = {id(s) for s in kept}
        for dropped in self.ring:
            if id(dropped) not in kept_ids:
                self._good_after.pop(id(dropped), None)
        self.ring.clear()
        self.ring.extend(kept)

    def _reset_nonfinite_optimizer_state(self) -> None:
        """Zero optimizer buffers holding NaN/Inf (moments, momentum): as if those parameters started afresh."""
        optimizer = self.subjects.optimizer
        if optimizer is None:
            return
        with torch.no_grad():
            for state in optimizer.state.values():
                for value in state.values():
                    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() > 0 \
                            and not bool(torch.isfinite(value).all()):
                        value.zero_()

    def repair_buffers(self) -> list[str]:
        """A skipped step's forward has already run: BatchNorm running statistics may hold its NaN.

        Skipping the update does not undo that, and eval would then return NaN. Non-finite buffers are put back
        from the newest snapshot (running statistics a few steps old are harmless; NaN ones are not).
        """
        bad = {id(buf): name for name, buf in self.subjects.named_buffers()
               if buf.is_floating_point() and not bool(torch.isfinite(buf).all())}
        if not bad:
            return []
        snap = self.newest_finite()
        if snap is None:
            return []
        live = [buf for _, buf in self.subjects.named_buffers() if id(buf) in bad]
        return [bad[id(buf)] for buf in snap.restore_tensors(live)]

    def emergency_checkpoint(self, path: Path, reason: str) -> tuple[str, int] | None:
        """Write the newest finite snapshot to ``path`` (the out dir's ``emergency_checkpoint.pt``); (path, step)
        or None when there is no finite snapshot. A failed write raises
        :class:`~nanguard.errors.CheckpointError` and leaves no partial file."""
        snap = self.newest_finite()
        if snap is None:
            return None
        written = write_checkpoint(path, snap.checkpoint(reason))
        return str(written), snap.step if snap.step is not None else -1


__all__ = ["Rollback"]
