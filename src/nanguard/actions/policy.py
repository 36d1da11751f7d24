"""The escalation ladder: from what went wrong at a step to what the guard does about it.

Pure host-side bookkeeping; it never touches tensors. Skip first; roll back when skipping cannot help
(the state itself is bad) or bad steps keep coming; back off the learning rate after a rollback and after
divergence; stop only when all of that failed. Which causes are state damage and which live in the
batch comes from the cause registry (:mod:`nanguard.causes`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from nanguard.causes import CORRUPTION_CAUSES, STATE_CAUSES
from nanguard.config import GuardConfig


class Action(str, enum.Enum):
    """What the guard did about a step (the event's ``action``)."""

    NONE = "none"
    SKIP = "skip"
    CLIP = "clip"
    ROLLBACK = "rollback"
    LR_BACKOFF = "lr_backoff"
    ABORT = "abort"


@dataclass(frozen=True)
class Decision:
    action: Action
    lr_backoff: bool = False
    reason: str = ""
    before: int | None = None  # roll back to a snapshot from before this step's update

    @property
    def rollback(self) -> bool:
        return self.action is Action.ROLLBACK

    @property
    def abort(self) -> bool:
        return self.action is Action.ABORT

    @property
    def drops_update(self) -> bool:
        """The step's update does not count (skipped, undone, or the run stops)."""
        return self.action in (Action.SKIP, Action.ROLLBACK, Action.ABORT)


class EscalationPolicy:
    """Counts bad steps and rollbacks and decides the next rung of the ladder."""

    def __init__(self, config: GuardConfig) -> None:
        self.config = config
        self.consecutive_bad = 0
        self.rollbacks = 0

    def on_good_step(self) -> None:
        self.consecutive_bad = 0

    def decide(self, trigger: str, cause: str, *, can_rollback: bool, update_applied: bool) -> Decision:
        """Decide for one bad step. ``update_applied``: the bad update already reached the weights."""
        cfg = self.config
        self.consecutive_bad += 1
        nonfinite = trigger.startswith("nonfinite")
        if trigger == "divergence":
            return Decision(Action.LR_BACKOFF, lr_backoff=True,
                            reason="the loss has been trending up: learning rate backed off")
        if cfg.on_nonfinite == "none" and nonfinite:
            return Decision(Action.NONE, reason="on_nonfinite='none': recorded only")
        if cfg.on_nonfinite == "abort" and nonfinite:
            return Decision(Action.ABORT, reason="on_nonfinite='abort'")
        wants_rollback = self._wants_rollback(cause, update_applied)
        if self.consecutive_bad >= cfg.abort_after or (self.rollbacks >= cfg.max_rollbacks and wants_rollback):
            return Decision(Action.ABORT, reason=f"{self.consecutive_bad} bad steps in a row and {self.rollbacks} "
                                                 "rollbacks: nothing more to try")
        if wants_rollback or (cfg.on_nonfinite == "rollback" and nonfinite):
            if not can_rollback:
                if cause in STATE_CAUSES or update_applied:
                    return Decision(Action.ABORT,
                                    reason="the state is corrupt and no good snapshot exists to roll back to")
                # Only the streak asked for a rollback; every bad update was skipped, so the weights are intact.
                return Decision(Action.SKIP, reason="the update was not applied (no snapshot yet to roll back to; "
                                                    "the weights were not touched by the skipped steps)")
            self.rollbacks += 1
            # Corrupted state (an inf written into a weight, a NaN in Adam's moments) says nothing about the
            # learning rate the first time; a repeat, or any other cause, does.
            back_off = cause not in CORRUPTION_CAUSES or self.rollbacks > 1
            return Decision(Action.ROLLBACK, lr_backoff=back_off, reason="restored the newest good snapshot"
                            + (" and backed off the learning rate" if back_off else ""))
        return Decision(Action.SKIP, reason="the update was not applied")

    def learning_rate_spike(self, update_step: int, *, can_rollback: bool) -> Decision:
        """The update at ``update_step`` used a spiked learning rate: undo it (the LR is pinned by the caller)."""
        self.consecutive_bad += 1
        held = "the learning rate is held at its earlier level while the schedule stays high"
        if not can_rollback:
            return Decision(Action.SKIP, reason=f"the update was not applied and {held} (no snapshot to roll back to)")
        self.rollbacks += 1
        return Decision(Action.ROLLBACK, before=update_step,
                        reason=f"restored a snapshot from before the update at step {update_step}; {held}")

    def _wants_rollback(self, cause: str, update_applied: bool) -> bool:
        return cause in STATE_CAUSES or update_applied or self.consecutive_bad >= self.config.rollback_after

    def after_rollback(self) -> None:
        self.consecutive_bad = 0

    def state_dict(self) -> dict[str, Any]:
        return {"consecutive_bad": self.consecutive_bad, "rollbacks": self.rollbacks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.consecutive_bad = int(state.get("consecutive_bad", 0))
        self.rollbacks = int(state.get("rollbacks", 0))


__all__ = ["Action", "Decision", "EscalationPolicy"]
