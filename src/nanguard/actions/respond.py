"""What the guard does with a verdict: learn from a good step, act on a bad one, write both down.

A good step teaches the detector, resets the escalation, may refresh a snapshot and is checked for a
slow divergence. A bad step is diagnosed (forensics within its budget, or the triage), the policy picks
the rung of the ladder (skip, roll back, back off the LR, abort), the action is carried out, and the
event and the history row are recorded.

A finite spike might be the first step of a new normal level (a task or data switch), so its event is
held back: when ``rollback_after`` spikes in a row sit on one steady level (see ``_steady``), the shift is accepted with one ``level_shift`` event (action ``none``) and the
statistics start afresh on the new level; any other outcome writes the held events as they were.
The parts it works with are the guard's, handed over in
:class:`Parts`; the step's own data (the verdict and its context) arrive as arguments.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nanguard.actions.divergence import DivergenceWatch
from nanguard.actions.level import BEFORE, RATIO, LevelWatch
from nanguard.actions.lr import LearningRate
from nanguard.actions.policy import Action, Decision, EscalationPolicy
from nanguard.actions.rollback import Rollback
from nanguard.causes import DATA_CAUSES, STATE_CAUSES, fixes_for
from nanguard.config import GuardConfig
from nanguard.errors import CheckpointError, TrainingAborted
from nanguard.events import Diagnosis, Event
from nanguard.forensics.capture import ForwardCall, step_capture
from nanguard.forensics.desk import Case, Desk
from nanguard.forensics.naming import tensors_from_traceback
from nanguard.forensics.request import StepCapture
from nanguard.records import RunRecords, Tally
from nanguard.state import Subjects
from nanguard.step.detector import Detector
from nanguard.step.verdict import Limits, Verdict


@dataclass
class StepContext:
    """The host-side facts of one step that travel with its verdict (nothing else remembers them)."""

    step: int
    limits: Limits
    has_loss: bool
    calls: list[ForwardCall] = field(default_factory=list)
    closure: StepCapture | None = None
    lockstep: bool = False  # decided in an all-gather with every rank: the event path may talk to them too


@dataclass
class Parts:
    """The guard's parts the responder acts through."""

    config: GuardConfig
    subjects: Subjects
    detector: Detector
    policy: EscalationPolicy
    lr: LearningRate
    rollback: Rollback
    divergence: DivergenceWatch
    desk: Desk
    records: RunRecords
    tally: Tally
    events: list[Event]
    rank: int


class Responder:
    """Turns verdicts into actions and records. ``close`` is the guard's, for an abort."""

    def __init__(self, parts: Parts, close: Callable[[str], None]) -> None:
        self.parts = parts
        self.close = close
        self.streak_start: int | None = None
        self.scaler_streak = 0
        self.forced_skips = 0
        self.aborted = False
        self.held: list[Event] = []  # spike events held back while a level shift may be under way
        self.level = LevelWatch()  # a jump to a new level that the spike test let through

    # ------------------------------------------------------------------ good steps
    def on_good(self, verdict: Verdict, context: StepContext) -> None:
        p = self.parts
        self.release_held()
        p.detector.learn(verdict, accepted=True)
        if p.policy.consecutive_bad:
            p.policy.on_good_step()
        if p.lr.multiplier < 1.0:
            p.lr.on_good_step()
        self.streak_start = None
        self.scaler_streak = 0
        if verdict.clipped:
            p.tally.clipped += 1
        if context.has_loss:
            p.desk.remember_good(context.calls, context.closure, verdict.loss)
        self._row(verdict, Action.CLIP.value if verdict.clipped else Action.NONE.value, "")
        p.rollback.on_good_step(verdict.step)
        if verdict.loss is not None:
            self._watch_level(verdict, verdict.loss)
            line = p.divergence.observe(verdict.loss)
            if line is not None:
                self.on_bad(verdict, StepContext(verdict.step, verdict.limits, context.has_loss), trigger="divergence",
                            evidence=[line])

    def on_scaler_overflow(self, verdict: Verdict) -> None:
        """GradScaler's own overflow skip: normal early in fp16 training, an event only if it persists."""
        p = self.parts
        p.detector.learn(verdict, accepted=False)
        self.scaler_streak += 1
        p.tally.skipped += 1
        self._row(verdict, Action.SKIP.value, "")
        patience = p.config.scaler_overflow_patience
        if self.scaler_streak < patience:
            return
        self.scaler_streak = 0
        scale = verdict.loss_scale if verdict.loss_scale is not None else math.nan
        diagnosis = Diagnosis(
            cause="backward_overflow", phase="backward", confidence=0.6,
            evidence=[f"GradScaler skipped {patience} steps in a row; loss scale is now {scale:.3g}"],
            fixes=["find the layer whose gradients overflow float16 (run with the 'forensic' preset)",
                   "train in bf16 instead of fp16", "lower the learning rate"],
        )
        self._emit(Event(step=verdict.step, trigger="nonfinite_grad", action=Action.SKIP.value, diagnosis=diagnosis,
                         loss=verdict.loss, grad_norm=verdict.grad_norm, lr=p.lr.current(), rank=p.rank))

    def forced_skip(self, step: int) -> bool:
        """After a rollback, ``skip_after_rollback`` steps are skipped unseen; True when this one is."""
        if self.forced_skips <= 0:
            return False
        self.forced_skips -= 1
        self.parts.tally.skipped += 1
        self.parts.lr.hold_next()
        self._row(Verdict(step=step, loss=None, grad_norm=math.nan), Action.SKIP.value, "")
        return True

    # ------------------------------------------------------------------ bad steps
    def on_bad(self, verdict: Verdict, context: StepContext, *, update_applied: bool = False,
               state_is_pre_step: bool = True, trigger: str | None = None, evidence: list[str] | None = None) -> None:
        p = self.parts
        trigger = trigger or verdict.trigger
        if self.streak_start is None:
            self.streak_start = verdict.step
        bad_rank = verdict.bad_rank
        case = self._case(verdict, context, trigger, update_applied, state_is_pre_step)
        funded = p.desk.fund(case)
        diagnosis, details = p.desk.diagnose(case, funded)
        if evidence:
            diagnosis.evidence = [*evidence, *diagnosis.evidence]
        suspect = False
        if trigger != "divergence" and not update_applied and diagnosis.cause not in DATA_CAUSES | STATE_CAUSES:
            suspect, line = p.desk.damaged_by_update(case, funded)
            if line:
                diagnosis.evidence.append(line)
            if suspect and p.lr.pinned is None:
                p.lr.blame(verdict.step, diagnosis)
        if trigger in ("loss_spike", "grad_spike") and diagnosis.cause in ("loss_spike", "gradient_explosion", "unknown"):
            self._early_divergence(verdict, trigger, diagnosis)
        jump = p.lr.jump(verdict.step) if trigger != "divergence" and p.lr.pinned is None else None
        shift = (jump is None and not update_applied and not suspect and trigger in ("loss_spike", "grad_spike")
                 and diagnosis.cause not in STATE_CAUSES and verdict.loss is not None and math.isfinite(verdict.loss))
        if not shift:
            self.release_held()
        elif self._steady([*(e.loss for e in self.held), verdict.loss]):
            self._accept_level_shift(verdict, diagnosis)
            return
        if jump is not None:
            p.lr.blame(verdict.step, diagnosis)
            decision = p.policy.learning_rate_spike(jump[0], can_rollback=p.rollback.can_restore())
            p.lr.pin(jump[2])
        else:
            decision = p.policy.decide(trigger, diagnosis.cause, can_rollback=p.rollback.can_restore(),
                                       update_applied=update_applied or suspect)
        if decision.lr_backoff:
            p.lr.back_off()
        if decision.drops_update and not update_applied:
            p.tally.skipped += 1
            p.lr.hold_next()
        if bad_rank is not None:
            details["rank_flags"] = [list(row) for row in verdict.ranks]
        event = Event(step=verdict.step, trigger=trigger, action=decision.action.value, diagnosis=diagnosis,
                      loss=verdict.rank_loss(bad_rank) if bad_rank is not None else verdict.loss,
                      grad_norm=verdict.grad_norm, lr=p.lr.current(), rank=bad_rank if bad_rank is not None else p.rank,
                      details={**details, "reason": decision.reason, "lr_multiplier": p.lr.multiplier})
        self._act(decision, verdict.step, event)
        if shift and decision.action is Action.SKIP:
            self.held.append(event)
        else:
            self.release_held()
            self._emit(event)
        self._row(verdict, decision.action.value, trigger)
        if decision.abort:
            self.abort(event, decision.reason)

    def _early_divergence(self, verdict: Verdict, trigger: str, diagnosis: Diagnosis) -> None:
        """A spike caught by the early-run rule (the statistics still warming up) is the run diverging from
        its start, not an odd batch: say so, with the growth measured."""
        stats = self.parts.detector.loss if trigger == "loss_spike" else self.parts.detector.grad
        value = verdict.loss if trigger == "loss_spike" else verdict.grad_norm
        if stats.warm or value is None or stats.first <= 0:
            return
        what = "loss" if trigger == "loss_spike" else "gradient norm"
        diagnosis.cause = "divergence" if trigger == "loss_spike" else "gradient_explosion"
        diagnosis.phase, diagnosis.confidence = "optimizer", max(diagnosis.confidence, 0.7)
        base = "its first value" if stats.early_min == 1 else f"the largest of its first {stats.early_min} values"
        diagnosis.evidence.insert(0, f"the {what} grew from {stats.first:.4g} ({base}) to {value:.4g} by step {verdict.step}, "
                                     f"{value / stats.first:.3g}x (the early-run limit is {stats.early_ratio:g}x): "
                                     "the run is diverging from its start")
        lr = self.parts.lr.current()
        now = f" (now {lr:.4g})" if lr is not None else ""
        diagnosis.fixes = [f"Lower the learning rate{now} or add a warm-up.",
                           "Clip gradients (`torch.nn.utils.clip_grad_norm_`) or use the `clip` preset.",
                           *diagnosis.fixes]

    def _steady(self, losses: list[float | None]) -> bool:
        """``rollback_after`` positive finite losses on one level (within 4x of each other, the last not 1.5x
        the first), seen by statistics that had warmed up on the old level, on a run whose smoothed loss was
        not already climbing: an explosion is not a new normal."""
        values = [v for v in losses if v is not None and math.isfinite(v) and v > 0]
        if len(values) < len(losses) or len(values) < self.parts.config.rollback_after:
            return False
        calm = not self.parts.divergence.climbing()  # a loss already climbing before the spikes is no new normal
        return (self.parts.detector.loss.warm and calm and max(values) <= 4.0 * min(values)
                and values[-1] <= 1.5 * values[0])

    def _accept_level_shift(self, verdict: Verdict, diagnosis: Diagnosis) -> None:
        """The loss moved to a new steady level: accept it (one event, action none) and re-baseline."""
        p = self.parts
        held, self.held = self.held, []
        first = held[0].step if held else verdict.step
        before = p.detector.loss.mean
        diagnosis.cause, diagnosis.phase, diagnosis.confidence = "level_shift", "loss", max(diagnosis.confidence, 0.6)
        diagnosis.evidence.insert(0, f"the loss moved from about {before:.4g} to {verdict.loss:.4g} at step {first} and "
                                     f"stayed there, finite and not growing, for {len(held) + 1} steps: accepted as the "
                                     "new normal level; the spike statistics start afresh on it")
        p.tally.skipped += 1
        p.lr.hold_next()
        p.policy.on_good_step()
        p.detector.rebaseline()
        p.divergence.rebaseline()
        self.level.rebaseline()
        self.streak_start = None
        steps = [e.step for e in held] + [verdict.step]
        event = Event(step=first, trigger=held[0].trigger if held else "loss_spike", action=Action.NONE.value,
                      diagnosis=diagnosis, loss=verdict.loss, grad_norm=verdict.grad_norm, lr=p.lr.current(),
                      rank=p.rank, details={"reason": f"the updates of steps {steps} were held back while the new "
                                            "level persisted; training continues on it", "held_steps": steps})
        self._emit(event)
        self._row(verdict, Action.SKIP.value, event.trigger)

    def _watch_level(self, verdict: Verdict, loss: float) -> None:
        """Record a level shift the spike test let through (see :mod:`nanguard.actions.level`): the updates
        went through, so the event says so (action none) and only the statistics start afresh."""
        p = self.parts
        shift = self.level.observe(verdict.step, loss, warm=p.detector.loss.warm)
        if shift is None or p.lr.jump(shift.step) is not None:  # a loss jump right after an LR jump is no data switch
            return
        diagnosis = Diagnosis(cause="level_shift", phase="loss", confidence=0.6, fixes=fixes_for("level_shift", step=shift.step))
        diagnosis.evidence.append(
            f"the loss moved from about {shift.before:.4g} (mean of the {BEFORE} steps before) to {shift.after:.4g} at "
            f"step {shift.step}: each of {shift.steps} steps in a row was over {RATIO:g}x the highest loss of those "
            f"{BEFORE}, finite and not growing. Accepted as the new normal level (no update was skipped); the spike "
            "statistics start afresh on it")
        p.detector.rebaseline()
        p.divergence.rebaseline()
        steps = list(range(shift.step, verdict.step + 1))
        self._emit(Event(step=shift.step, trigger="loss_spike", action=Action.NONE.value, diagnosis=diagnosis,
                         loss=loss, grad_norm=verdict.grad_norm, lr=p.lr.current(), rank=p.rank,
                         details={"reason": f"the loss stayed on its new level for {shift.steps} steps; training "
                                  "continues on it", "level_steps": steps, "level_before": shift.before}))

    def release_held(self) -> None:
        """Write the spike events held back for a level shift that did not come."""
        held, self.held = self.held, []
        for event in held:
            self._emit(event)

    def _case(self, verdict: Verdict, context: StepContext, trigger: str, update_applied: bool,
              state_is_pre_step: bool) -> Case:
        replayable = trigger != "divergence" and not update_applied
        capture, batch, renamed = (step_capture(context.calls, context.closure) if replayable else (None, {}, {}))
        return Case(step=verdict.step, trigger=trigger, loss=verdict.loss, grad_norm=verdict.grad_norm,
                    lr=self.parts.lr.current(), capture=capture, batch=batch, renamed=renamed,
                    update_applied=update_applied, state_is_pre_step=state_is_pre_step, bad_rank=verdict.bad_rank,
                    lockstep=context.lockstep and trigger != "divergence")

    def _act(self, decision: Decision, step: int, event: Event) -> None:
        p = self.parts
        if decision.rollback:
            snap = p.rollback.restore(step, self.streak_start, decision.before)
            event.details["rolled_back_to_step"] = snap.step if snap is not None else None
            if snap is not None and "detector" in snap.extra:
                p.detector.load_state_dict(snap.extra["detector"])
            p.tally.rollbacks += 1
            self.level.rebaseline()
            p.policy.after_rollback()
            self.forced_skips = p.config.skip_after_rollback
        elif decision.action is Action.SKIP:
            repaired = p.rollback.repair_buffers()
            if repaired:
                event.details["repaired_buffers"] = repaired
                event.diagnosis.evidence.append(f"the bad forward had written NaN/Inf into {', '.join(repaired[:4])}; "
                                                "restored from the newest snapshot")

    def abort(self, event: Event, reason: str) -> None:
        """Write the emergency checkpoint, close the records, raise :class:`TrainingAborted` (always that:
        a checkpoint that could not be written, on a full disk, is named in the message and chained)."""
        p = self.parts
        self.aborted = True
        saved: tuple[str, int] | None = None
        failure: CheckpointError | None = None
        try:
            target = p.records.checkpoint_path() if p.records.writer else None
            saved = p.rollback.emergency_checkpoint(target, reason) if target is not None else None
        except CheckpointError as exc:
            failure = exc
        d = event.diagnosis
        place = d.module or d.tensor
        message = (f"nanguard stopped the run at step {event.step}: {reason}. Last cause: {d.cause}"
                   + (f" ({place})" if place else "")
                   + (f". Emergency checkpoint of step {saved[1]}: {saved[0]}" if saved else "")
                   + (f". No emergency checkpoint: {failure}" if failure else "")
                   + f". Events: {p.records.events_path}")
        self.close("aborted")  # the records never raise (nanguard.records)
        raise TrainingAborted(message, checkpoint=saved[0] if saved else None) from failure

    # ------------------------------------------------------------------ a step that raised
    def on_exception(self, step: int, exc: BaseException, calls: list[ForwardCall]) -> Event:
        """The step raised (``Target 101 is out of bounds``): diagnose it from the batch and the error."""
        batch = tensors_from_traceback(exc)
        _, recorded, _ = step_capture(calls, rename=False)
        for name, value in recorded.items():
            batch.setdefault(name, value)
        case = Case(step=step, trigger="exception", loss=None, grad_norm=None,
                    capture=StepCapture(rerun=None, batch=batch), batch=batch, exception=exc)
        details: dict[str, Any] = {"exception": f"{type(exc).__name__}: {exc}"}
        try:
            diagnosis, found = self.parts.desk.diagnose(case, funded=False)
            details.update(found)
        except Exception as inner:  # keep the user's own error in front
            diagnosis = Diagnosis(cause="unknown", evidence=[f"the step raised {type(exc).__name__}: {exc}"])
            details["forensics_error"] = repr(inner)
        event = Event(step=step, trigger="exception", action=Action.ABORT.value, diagnosis=diagnosis,
                      rank=self.parts.rank, details=details)
        self._emit(event)
        return event

    # ------------------------------------------------------------------ records
    def _emit(self, event: Event) -> None:
        self.parts.events.append(event)
        self.parts.records.on_event(event)

    def _row(self, verdict: Verdict, action: str, trigger: str) -> None:
        p = self.parts
        if not p.records.writer or (action == Action.NONE.value and verdict.step % p.config.history_every):
            return
        t = p.tally
        p.records.on_step({
            "step": verdict.step, "time": p.records.elapsed(), "loss": verdict.loss, "grad_norm": verdict.grad_norm,
            "lr": p.lr.current(), "lr_multiplier": p.lr.multiplier, "loss_scale": verdict.loss_scale or None,
            "action": action, "trigger": trigger, "skipped_total": t.skipped, "rollbacks_total": t.rollbacks,
            "clipped_total": t.clipped,
        })

    def state_dict(self) -> dict[str, Any]:
        return {"streak_start": self.streak_start, "scaler_streak": self.scaler_streak, "forced_skips": self.forced_skips,
                "level": self.level.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        start = state.get("streak_start")
        self.streak_start = int(start) if start is not None else None
        self.scaler_streak = int(state.get("scaler_streak", 0))
        self.forced_skips = int(state.get("forced_skips", 0))
        self.level.load_state_dict(state.get("level", {}))


__all__ = ["Parts", "Responder", "StepContext"]
