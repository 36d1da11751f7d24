"""From verdicts to limits: the running statistics that say what a normal step looks like.

The detector owns every statistic the guard keeps about the run: robust running statistics of the loss
and of the gradient norm (spike limits and the adaptive clip), the recent accepted values (evidence for
a diagnosis), and the abs-max of each float batch field (input-scale evidence). They are plain host
floats, updated from verdicts the host has read back, so the device never does statistics work: a step
costs the same few comparisons against host-side limits whatever the detector knows.

The statistics (:class:`RunningStats`) are an exponential moving mean and variance (alpha 0.97 by
default, as ZClip uses) that

* warm up as a cumulative average, so the first steps of a run are not judged against nothing;
* learn only from accepted steps, with values clipped to ``mean + clip_z * std``, so a spike that got
  through cannot inflate the scale it is judged against;
* call a value a spike only when it is ``z`` robust deviations above the mean *and* ``ratio`` times the
  mean *and* ``peak_ratio`` times a slowly decaying peak of accepted values: the z-score alone fires on
  a plateau's tiny variance, the mean ratio on the heavy tail of small-batch gradient norms; the peak
  ("far above anything seen lately") keeps a noisy run or a warm-up's fast loss drop quiet;
* during the warm-up, apply the early-run rule instead: a value ``early_ratio`` times the largest of the
  first ``early_min`` accepted values is a spike (see :class:`~nanguard.config.SpikeConfig`), so a run that
  explodes from its first step is not learned as normal. Losses whose first values are not all positive
  (a contrastive or RL objective) have no early limit: "many-fold" means nothing for them.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

from nanguard.config import GuardConfig, SpikeConfig
from nanguard.step.verdict import FLOAT32_MAX, Limits, Verdict

HISTORY = 256
SCALE_HISTORY = 64


@dataclass
class RunningStats:
    """Robust running statistics of one signal, in host floats."""

    alpha: float
    warmup: int
    clip_z: float
    peak_ratio: float = 3.0
    peak_decay: float = 0.995
    mean: float = 0.0
    var: float = 0.0
    count: int = 0
    peak: float = 0.0
    early_min: int = 3
    early_ratio: float = 0.0  # 0: no early-run rule
    first: float = 0.0  # the largest of the first ``early_min`` values; <= 0: no early limit

    @property
    def warm(self) -> bool:
        return self.count >= self.warmup

    def std(self) -> float:
        # A floor relative to the mean keeps a perfectly flat series from turning 1e-7 noise into z=100.
        return math.sqrt(self.var) + 1e-3 * abs(self.mean) + 1e-12

    def spike_limit(self, z: float, ratio: float) -> float:
        """The value above which ``x`` is a spike (the early-run limit, or ``inf``, while warming up)."""
        if not self.warm:
            return self.early_limit()
        limit = max(self.mean + z * self.std(), self.mean + (ratio - 1.0) * (abs(self.mean) + 1e-12))
        return max(limit, self.peak_ratio * self.peak) if self.peak_ratio > 0 else limit

    def early_limit(self) -> float:
        if self.early_ratio <= 0 or self.count < self.early_min or self.first <= 0:
            return math.inf
        return self.early_ratio * self.first

    def is_spike(self, x: float, z: float, ratio: float) -> bool:
        return math.isfinite(x) and x > self.spike_limit(z, ratio)

    def clip_value(self) -> float:
        return self.mean + self.clip_z * self.std() if self.warm else math.inf

    def update(self, x: float) -> None:
        """Learn from an accepted value (non-finite values are ignored)."""
        if not math.isfinite(x):
            return
        clipped = min(x, self.clip_value()) if self.warm else x
        a = min(self.count / (self.count + 1.0), self.alpha)
        delta = clipped - self.mean
        self.mean += (1.0 - a) * delta
        self.var = a * (self.var + (1.0 - a) * delta * delta)
        if self.count < self.early_min:
            # A non-positive early value disables the early rule for good (first < 0 stays below 0).
            self.first = -1.0 if x <= 0 or self.first < 0 else max(self.first, x)
        self.count += 1
        # The peak follows |x| (losses can be negative) and forgets slowly, so old highs stop counting.
        self.peak = max(self.peak * self.peak_decay, abs(x))

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "var": self.var, "count": self.count, "peak": self.peak, "first": self.first}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean, self.var = float(state["mean"]), float(state["var"])
        self.count, self.peak = int(state["count"]), float(state["peak"])
        self.first = float(state.get("first", 0.0))

    def summary(self) -> dict[str, float]:
        return {"mean": self.mean, "std": self.std(), "count": float(self.count), "peak": self.peak}


def _stats(spikes: SpikeConfig, early_ratio: float, peak_decay: float) -> RunningStats:
    return RunningStats(alpha=spikes.ema_alpha, warmup=spikes.warmup_steps, clip_z=spikes.clip_z,
                        peak_ratio=spikes.peak_ratio, peak_decay=peak_decay,
                        early_min=spikes.early_min_steps, early_ratio=early_ratio)


class Detector:
    """Owns the run's statistics; turns them into the :class:`Limits` a step is judged by."""

    def __init__(self, config: GuardConfig) -> None:
        self.config = config
        self.loss = _stats(config.spikes, config.spikes.early_loss_ratio, config.spikes.loss_peak_decay)
        self.grad = _stats(config.spikes, config.spikes.early_grad_ratio, config.spikes.peak_decay)
        self.loss_history: deque[float] = deque(maxlen=max(HISTORY, config.divergence_window))
        self.grad_history: deque[float] = deque(maxlen=HISTORY)
        # Per batch field: (step, abs-max) of recent batches; a step's own batch is left out when judging it.
        self.batch_scales: dict[str, deque[tuple[int, float]]] = {}
        self._limits: Limits | None = None  # computed once per change of the statistics

    def limits(self) -> Limits:
        """The limits in force for the next step."""
        if self._limits is None:
            self._limits = self._compute_limits()
        return self._limits

    def _compute_limits(self) -> Limits:
        spikes = self.config.spikes
        loss_limit = grad_limit = clip = math.inf
        if spikes.enabled:
            loss_limit = self.loss.spike_limit(spikes.skip_z, spikes.loss_ratio)
            grad_limit = self.grad.spike_limit(spikes.skip_z, spikes.grad_ratio)
            if spikes.adaptive_clip:
                clip = self.grad.clip_value()
        if self.config.clip_grad_norm is not None:
            clip = min(clip, self.config.clip_grad_norm)
        return Limits.of(loss_limit, grad_limit, clip)

    def learn(self, verdict: Verdict, *, accepted: bool) -> None:
        """Fold one step's values into the statistics. Only accepted steps teach the spike statistics;
        the gradient statistics never learn from a GradScaler overflow."""
        if not accepted:
            return
        self._limits = None
        if verdict.loss is not None:
            self.loss.update(verdict.loss)
            self.loss_history.append(verdict.loss)
        if not verdict.scaler_overflow:
            self.grad.update(verdict.grad_norm)
        self.grad_history.append(verdict.grad_norm)

    def rebaseline(self) -> None:
        """Forget the spike statistics (a new normal level was accepted): they warm up again on it."""
        spikes = self.config.spikes
        self.loss = _stats(spikes, spikes.early_loss_ratio, spikes.loss_peak_decay)
        self.grad = _stats(spikes, spikes.early_grad_ratio, spikes.peak_decay)
        self._limits = None

    def note_batch_scale(self, step: int, scales: dict[str, float]) -> None:
        for name, value in scales.items():
            self.batch_scales.setdefault(name, deque(maxlen=SCALE_HISTORY)).append((step, value))

    def batch_scale_history(self, before: int, renamed: dict[str, str] | None = None) -> dict[str, list[float]]:
        """Per batch field, the abs-maxima of batches before step ``before`` (named as the user names them)."""
        renamed = renamed or {}
        return {renamed.get(k, k): [v for s, v in pairs if s < before] for k, pairs in self.batch_scales.items()}

    def summary(self) -> dict[str, float]:
        """The spike statistics for an event's evidence."""
        loss, grad = self.loss.summary(), self.grad.summary()
        return {"loss_mean": loss["mean"], "loss_std": loss["std"], "loss_peak": loss["peak"], "grad_mean": grad["mean"],
                "grad_std": grad["std"], "grad_peak": grad["peak"], "warm_steps": loss["count"]}

    def loss_z(self, loss: float | None) -> float:
        """How many deviations ``loss`` is above the running mean (0 while warming up)."""
        if loss is None or not self.loss.warm:
            return 0.0
        return (loss - self.loss.mean) / self.loss.std() if math.isfinite(loss) else math.inf

    def grad_z(self, norm: float) -> float:
        if not self.grad.warm:
            return 0.0
        return (norm - self.grad.mean) / self.grad.std() if math.isfinite(norm) else math.inf

    def state_dict(self) -> dict[str, Any]:
        return {"loss": self.loss.state_dict(), "grad": self.grad.state_dict(),
                "loss_history": list(self.loss_history), "grad_history": list(self.grad_history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._limits = None
        self.loss.load_state_dict(state["loss"])
        self.grad.load_state_dict(state["grad"])
        self.loss_history.clear()
        self.loss_history.extend(float(v) for v in state.get("loss_history", []))
        self.grad_history.clear()
        self.grad_history.extend(float(v) for v in state.get("grad_history", []))


__all__ = ["FLOAT32_MAX", "Detector", "RunningStats"]
