"""Divergence: the loss climbing slowly over many steps, which no single step's spike test sees.

The watch smooths the accepted losses as the mean of the last ``m = max(5, divergence_window // 10)``
steps (running prefix sums, O(1) per step) and keeps the best smoothed loss of the run. The run diverges
when the smoothed loss is ``divergence_ratio`` times its best (twice, by default) and the rise is real:

* the last three blocks of ``m`` steps rose one after the other (a restart's bump that falls back is not
  a trend);
* the rise is significant against the loss's own noise: more than 4 standard errors of the block mean;
* and in absolute terms: more than 1e-3 of the loss's first smoothed value, so a loss heading to zero
  (1e-8 -> 6e-6) is not called diverging;
* all of that for ``m / 2`` steps in a row: a fast bump that levels off (a OneCycle schedule's peak) is
  not a trend.

A loss whose best is not positive (a contrastive or RL objective) is not judged by ratio. After it fires
it waits ``divergence_window`` steps before it can fire again.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from nanguard.config import GuardConfig

SIGNIFICANCE = 4.0
ABSOLUTE = 1e-3
PERSIST = 0.5  # the rise must hold for this many blocks' worth of steps in a row


class DivergenceWatch:
    def __init__(self, config: GuardConfig) -> None:
        self.window = config.divergence_window
        self.ratio = config.divergence_ratio
        self.m = max(5, self.window // 10)
        self.rebaseline()

    def rebaseline(self) -> None:
        """Forget the loss history (the start of a run, or a new normal level was accepted)."""
        self.best = math.inf
        self.low = math.inf  # the best smoothed loss since the start or the last level shift (never reset on firing)
        self.first = math.nan
        self.cooldown = 0
        self.seen = 0
        self.streak = 0  # consecutive steps the rise has held
        self._sums: deque[tuple[float, float]] = deque([(0.0, 0.0)], maxlen=3 * self.m + 1)

    def _block(self, back: int) -> tuple[float, float]:
        """Mean and variance of the ``back``-th block of ``m`` steps from the end (0: the latest)."""
        end, start = self._sums[-1 - back * self.m], self._sums[-1 - (back + 1) * self.m]
        mean = (end[0] - start[0]) / self.m
        return mean, max(0.0, (end[1] - start[1]) / self.m - mean * mean)

    def observe(self, loss: float) -> str | None:
        """Feed one accepted loss; returns the evidence line when the run is diverging, else None."""
        if not math.isfinite(loss):
            return None
        total, squares = self._sums[-1]
        if abs(total) > 1e12 * max(1.0, abs(loss)):  # keep the sums small: only differences matter
            base = self._sums[0]
            self._sums = deque(((t - base[0], q - base[1]) for t, q in self._sums), maxlen=self._sums.maxlen)
            total, squares = self._sums[-1]
        self._sums.append((total + loss, squares + loss * loss))
        self.seen += 1
        if self.seen < self.m:
            return None
        now, var = self._block(0)
        if math.isnan(self.first):
            self.first = abs(now)
        self.best = min(self.best, now)
        self.low = min(self.low, now)
        if self.cooldown > 0:
            self.cooldown -= 1
            return None
        if self.seen < 3 * self.m or not (self.best > 0 and now >= self.ratio * self.best):
            return None
        older, old = self._block(2)[0], self._block(1)[0]
        rise = now - self.best
        rising = older < old < now and rise > SIGNIFICANCE * math.sqrt(var / self.m) and rise > ABSOLUTE * self.first
        self.streak = self.streak + 1 if rising else 0
        if self.streak < PERSIST * self.m:
            return None
        line = (f"mean loss of the last {self.m} steps is {now:.4g}, {now / self.best:.2f}x the best smoothed loss "
                f"{self.best:.4g} of the run; it rose in each of the last 3 blocks of {self.m} steps, by more than "
                f"{SIGNIFICANCE:g} standard errors of its own noise")
        self.cooldown = self.window
        self.best = math.inf
        self.streak = 0
        return line

    def climbing(self) -> bool:
        """Has the smoothed loss risen to ``divergence_ratio`` times its lowest since the start (or the last
        level shift), significantly against its noise? (Never for losses <= 0, or while too little is known.)"""
        if self.seen < self.m or not (0 < self.low < math.inf):
            return False
        now, var = self._block(0)
        return now >= self.ratio * self.low and now - self.low > SIGNIFICANCE * math.sqrt(var / self.m)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "low": self.low, "first": self.first, "cooldown": self.cooldown, "seen": self.seen, "streak": self.streak,
                "sums": [list(v) for v in self._sums]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rebaseline()
        if "sums" not in state:  # a checkpoint of the 0.1 watch: start the history afresh
            return
        self.best = float(state.get("best", math.inf))
        self.low = float(state.get("low", math.inf))
        self.first = float(state.get("first", math.nan))
        self.cooldown = int(state.get("cooldown", 0))
        self.seen = int(state.get("seen", 0))
        self.streak = int(state.get("streak", 0))
        self._sums.clear()
        self._sums.extend((float(t), float(q)) for t, q in state["sums"])


__all__ = ["DivergenceWatch"]
