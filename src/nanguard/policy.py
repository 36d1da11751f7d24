"""The escalation ladder: from what went wrong at a step to what the guard does about it.

Pure host-side bookkeeping; it never touches tensors. Skip first; roll back when skipping cannot
help (the state itself is bad) or bad steps keep coming; back off the learning rate after a rollback
and after divergence, restoring it gradually; stop only when all of that failed.
"""

from __future__ import annotations

from dataclasses import dataclass

from nanguard.config import GuardConfig

STATE_CAUSES = frozenset({"weights_nonfinite", "optimizer_state_nonfinite", "update_overflow"})
CORRUPTION_CAUSES = frozenset({"weights_nonfinite", "optimizer_state_nonfinite"})
# Causes that live in the batch: skipping the batch is the whole remedy.
DATA_CAUSES = frozenset({
    "input_nonfinite", "label_out_of_range", "input_extreme_scale", "masked_softmax_all_masked",
    "masked_target_logit", "batchnorm_degenerate", "nondeterministic",
})


@dataclass
class Decision:
    action: str  # one of events.ACTIONS
    rollback: bool = False
    lr_backoff: bool = False
    abort: bool = False
    reason: str = ""


class EscalationPolicy:
    def __init__(self, config: GuardConfig) -> None:
        self.config = config
        self.consecutive_bad = 0
        self.rollbacks = 0
        self.lr_multiplier = 1.0
        self._restore_factor = (1.0 / config.lr_backoff) ** (1.0 / max(1, config.lr_restore_steps))

    def on_good_step(self) -> None:
        self.consecutive_bad = 0
        if self.lr_multiplier < 1.0:
            self.lr_multiplier = min(1.0, self.lr_multiplier * self._restore_factor)

    def decide(self, trigger: str, cause: str, *, can_rollback: bool, update_applied: bool) -> Decision:
        """Decide for one bad step. ``update_applied``: the bad update already reached the weights."""
        cfg = self.config
        self.consecutive_bad += 1
        if trigger == "divergence":
            self._back_off()
            return Decision("lr_backoff", lr_backoff=True, reason="the loss has been trending up: learning rate backed off")
        if cfg.on_nonfinite == "none" and trigger.startswith("nonfinite"):
            return Decision("none", reason="on_nonfinite='none': recorded only")
        if cfg.on_nonfinite == "abort" and trigger.startswith("nonfinite"):
            return Decision("abort", abort=True, reason="on_nonfinite='abort'")
        if self.consecutive_bad >= cfg.abort_after or (self.rollbacks >= cfg.max_rollbacks and self._wants_rollback(cause, update_applied)):
            return Decision(
                "abort",
                abort=True,
                reason=f"{self.consecutive_bad} bad steps in a row and {self.rollbacks} rollbacks: nothing more to try",
            )
        if self._wants_rollback(cause, update_applied) or (cfg.on_nonfinite == "rollback" and trigger.startswith("nonfinite")):
            if can_rollback:
                self.rollbacks += 1
                # Corrupted state (an inf written into a weight, a NaN in Adam's moments) says nothing about the
                # learning rate the first time; a repeat, or any other cause, does.
                back_off = cause not in CORRUPTION_CAUSES or self.rollbacks > 1
                if back_off:
                    self._back_off()
                return Decision("rollback", rollback=True, lr_backoff=back_off,
                                reason="restored the newest good snapshot" + (" and backed off the learning rate" if back_off else ""))
            return Decision("abort", abort=True, reason="the state is corrupt and no good snapshot exists to roll back to")
        return Decision("skip", reason="the update was not applied")

    def _wants_rollback(self, cause: str, update_applied: bool) -> bool:
        return cause in STATE_CAUSES or update_applied or self.consecutive_bad >= self.config.rollback_after

    def _back_off(self) -> None:
        self.lr_multiplier *= self.config.lr_backoff

    def after_rollback(self) -> None:
        self.consecutive_bad = 0
