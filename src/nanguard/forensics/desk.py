"""What the guard talks to when a step went wrong: a diagnosis within budget, the same on every rank.

The desk holds the forensics budget (``forensics_max_events`` events are investigated with replays;
later ones, or all of them with ``forensics=False``, get the replay-free triage). Everything a funded
event replays counts against that one unit, the re-run of the previous batch included: nothing replays
when forensics is off.

Under torch.distributed the rank that saw the fault diagnoses and every rank receives its answer (the
policy depends on the cause, so all ranks must act on the same one); under FSDP, where every forward is a
collective, nothing is replayed and every rank runs the triage together. Replays run isolated: no
collective, no loss accounting, no recording.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from nanguard import distributed as dist_utils
from nanguard.config import GuardConfig
from nanguard.events import Diagnosis
from nanguard.forensics import watch as recording
from nanguard.forensics.capture import ForwardCall, step_capture
from nanguard.forensics.investigate import investigate
from nanguard.forensics.request import InvestigationRequest, StepCapture
from nanguard.forensics.triage import Signals, quick_diagnosis
from nanguard.state import SavedState, Subjects
from nanguard.step.detector import Detector
from nanguard.step.lockstep import decide_together
from nanguard.step.losses import BOOK


@dataclass
class Case:
    """One bad step as the desk needs to see it."""

    step: int
    trigger: str
    loss: float | None
    grad_norm: float | None
    lr: float | None = None
    capture: StepCapture | None = None
    batch: dict[str, Any] = field(default_factory=dict)
    renamed: dict[str, str] = field(default_factory=dict)
    update_applied: bool = False
    state_is_pre_step: bool = True
    exception: BaseException | None = None
    bad_rank: int | None = None
    lockstep: bool = False  # every rank is deciding this step together (collectives are allowed)
    triage: Diagnosis | None = None  # the replay-free diagnosis, computed once per case (see Desk.triage)
    same_as: int | None = None  # the investigated step whose signature this case has (set by Desk.fund)


Signature = tuple[str, str, str | None, str | None]


class Desk:
    """The forensics budget and the diagnosis of bad steps (see the module docstring)."""

    def __init__(self, config: GuardConfig, subjects: Subjects, detector: Detector,
                 wrappers: Sequence[torch.nn.Module] = ()) -> None:
        self.config = config
        self.subjects = subjects
        self.detector = detector
        self.wrappers = list(wrappers)
        self.investigations = 0
        self._diagnosed: dict[Signature, tuple[int, Diagnosis]] = {}  # triage signature -> investigated step
        self._good: tuple[list[ForwardCall], StepCapture | None, float] | None = None  # the last good batch

    # ------------------------------------------------------------------ budget
    def fund(self, case: Case) -> bool:
        """Spend one unit of the budget on ``case`` if there is one (same answer on every rank).

        A spike is investigated only when it reaches ``spikes.alarm_z``; a milder one is skipped with the
        triage's diagnosis, and the budget is kept for the events that need a replay.
        """
        if not self.config.forensics or case.trigger == "divergence":
            return False
        known = self._known(case)
        if known is not None:
            case.same_as = known
            return False
        if self.investigations >= self.config.forensics_max_events:
            return False
        if case.trigger in ("loss_spike", "grad_spike") and self._spike_z(case) < self.config.spikes.alarm_z:
            return False
        self.investigations += 1
        return True

    def triage(self, case: Case) -> Diagnosis:
        """The replay-free diagnosis of ``case`` (cheap: the batch, the state and the trigger), once per case."""
        if case.triage is None:
            signals = Signals(trigger=case.trigger, loss=case.loss, grad_norm=case.grad_norm, batch=case.batch,
                              batch_scale_history=self.detector.batch_scale_history(before=case.step,
                                                                                    renamed=case.renamed),
                              spike_stats=self.detector.summary(), update_made_weights_nonfinite=case.update_applied)
            case.triage = quick_diagnosis(signals, self.subjects.models, self.subjects.optimizer)
        return case.triage

    def _signature(self, case: Case) -> Signature:
        """What an event looks like before any replay: its trigger and where the triage places it."""
        quick = self.triage(case)
        return case.trigger, quick.cause, quick.tensor, quick.module

    def _known(self, case: Case) -> int | None:
        """The investigated step whose signature ``case`` has, if any (never across ranks: batches differ)."""
        if case.exception is not None or dist_utils.is_distributed() or not self._diagnosed:
            return None
        found = self._diagnosed.get(self._signature(case))
        return found[0] if found is not None else None

    def _remember(self, case: Case, diagnosis: Diagnosis) -> None:
        """An investigated diagnosis that later events with the same signature carry (``same_as_step``)."""
        if diagnosis.cause == "unknown" or case.exception is not None or dist_utils.is_distributed():
            return
        self._diagnosed.setdefault(self._signature(case), (case.step, copy.deepcopy(diagnosis)))

    def _carried(self, case: Case, step: int) -> Diagnosis:
        """The diagnosis of investigated ``step``, for ``case`` with the same signature: nothing was replayed."""
        original = self._diagnosed[self._signature(case)][1]
        carried = copy.deepcopy(original)
        quick = self.triage(case)
        facts = [f"this step: {line}" for line in quick.evidence[:2]] if quick.cause != "unknown" else []
        carried.evidence = [
            f"same signature as step {step} (trigger {case.trigger}, same triage facts): its diagnosis is carried "
            "over; this step was not replayed",
            *facts,
            *(f"step {step}: {line}" for line in original.evidence[:4]),
        ]
        carried.reproducible = None
        carried.same_as_step = step
        return carried

    def _spike_z(self, case: Case) -> float:
        if case.trigger == "loss_spike":
            return self.detector.loss_z(case.loss)
        return self.detector.grad_z(case.grad_norm if case.grad_norm is not None else math.nan)

    def remember_good(self, calls: list[ForwardCall], closure: StepCapture | None, loss: float | None) -> None:
        """The last step that went well: what the previous-batch check re-runs (references only)."""
        if loss is not None:
            self._good = (calls, closure, loss)

    @contextlib.contextmanager
    def replay_scope(self) -> Iterator[None]:
        """A re-run on this rank alone: no DDP collective, no loss accounting, no recording."""
        with dist_utils.isolated_replay([*self.subjects.models, *self.wrappers]), BOOK.paused(), recording.paused():
            yield

    # ------------------------------------------------------------------ diagnosis
    def diagnose(self, case: Case, funded: bool) -> tuple[Diagnosis, dict[str, Any]]:
        if not (case.lockstep and dist_utils.is_distributed()):
            return self._diagnose_here(case, funded)
        sharded = dist_utils.uses_sharded_parameters(self.subjects.models)

        def here() -> tuple[Diagnosis, dict[str, Any]]:
            # Under FSDP every forward all-gathers parameters: no rank may replay alone, so no replay at all.
            diagnosis, details = self._diagnose_here(case, funded and not sharded)
            return diagnosis, {**details, "diagnosed_on_rank": dist_utils.rank()}

        def fallback() -> tuple[Diagnosis, dict[str, Any]]:
            return Diagnosis(cause="unknown", evidence=["the diagnosis failed on the rank that saw the fault"]), {}

        diagnosis, details = decide_together(case.bad_rank, here, fallback, all_ranks=sharded)
        return diagnosis, dict(details)

    def _diagnose_here(self, case: Case, replay: bool) -> tuple[Diagnosis, dict[str, Any]]:
        history = self.detector.batch_scale_history(before=case.step, renamed=case.renamed)
        if not replay and case.same_as is not None:
            return self._carried(case, case.same_as), {"same_as_step": case.same_as}
        if replay or case.exception is not None:
            try:
                request = self._request(case, history, replay)
                started = time.perf_counter()
                with self.replay_scope():
                    result = investigate(request)
                details = dict(result.details)
                details.setdefault("seconds", time.perf_counter() - started)
                if replay:
                    self._remember(case, result.diagnosis)
                return result.diagnosis, details
            except Exception as exc:  # forensics must never take the run down
                warnings.warn(f"nanguard: forensics failed at step {case.step}: {exc!r}", stacklevel=2)
        return self.triage(case), {}

    def _request(self, case: Case, history: dict[str, list[float]], replay: bool) -> InvestigationRequest:
        capture = case.capture if replay else StepCapture(rerun=None, batch=case.batch)
        return InvestigationRequest(
            step=case.step, trigger=case.trigger, models=self.subjects.models, optimizer=self.subjects.optimizer,
            capture=capture, loss=case.loss, grad_norm=case.grad_norm, lr=case.lr,
            state_is_pre_step=case.state_is_pre_step, update_made_weights_nonfinite=case.update_applied,
            scaler=self.subjects.scaler, loss_history=list(self.detector.loss_history),
            grad_norm_history=list(self.detector.grad_history), batch_scale_history=history,
            spike_stats=self.detector.summary(), exception=case.exception,
        )

    # ------------------------------------------------------------------ the previous batch
    def damaged_by_update(self, case: Case, funded: bool) -> tuple[bool, str | None]:
        """Is the state to blame rather than this batch? Re-run the last good batch on the current weights.

        If that batch, fine one step ago, now gives a non-finite or far larger loss, the last update damaged
        the weights (a learning-rate spike does this): skipping cannot help, rolling back can. Runs only
        for a funded event, as part of its investigation.
        """
        if not funded or self._good is None or dist_utils.uses_sharded_parameters(self.subjects.models):
            return False, None
        if not (case.lockstep and dist_utils.is_distributed()):
            return self._rerun_good()
        answer = decide_together(case.bad_rank, self._rerun_good, lambda: (False, None))
        return bool(answer[0]), answer[1]

    def _rerun_good(self) -> tuple[bool, str | None]:
        assert self._good is not None
        calls, closure, then = self._good
        capture, _, _ = step_capture(calls, closure, rename=False)
        if capture is None or capture.rerun is None:
            return False, None
        saved = SavedState.capture(self.subjects, scoped=True)
        try:
            with self.replay_scope():
                now = _loss_of(capture)
                if now is None and capture.recorded is not None:  # a closure that re-runs nothing (Lightning)
                    saved.restore()
                    now = _loss_of(capture.recorded)
            if now is None:  # no loss came back: nothing was re-run, so nothing is known
                return False, None
            now_value = float(now.detach().float().sum())
        except Exception:  # a replay that cannot run proves nothing either way
            return False, None
        finally:
            saved.restore()
        std = self.detector.loss.std()
        damaged = not math.isfinite(now_value) or (
            then > 0 and now_value > self.config.spikes.loss_ratio * then and now_value - then > 3 * std)
        verdict = "so the weights were damaged by the last update" if damaged else "so this batch, not the weights, is the problem"
        return damaged, f"the previous batch's loss was {then:.4g} one step ago and is {now_value:.4g} on the current weights, {verdict}"

    def state_dict(self) -> dict[str, Any]:
        return {"investigations": self.investigations}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.investigations = int(state.get("investigations", 0))


def _loss_of(capture: StepCapture) -> torch.Tensor | None:
    """Re-run ``capture`` from its RNG state; the loss tensor it returns, if any."""
    if capture.rerun is None:
        return None
    if capture.rng_state is not None:
        capture.rng_state.restore()
    now = capture.rerun()
    return now if isinstance(now, torch.Tensor) else None


__all__ = ["Case", "Desk"]
