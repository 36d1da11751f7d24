"""Divergence: the loss climbing slowly over many steps, which no single step's spike test sees.

The watch keeps the accepted losses of the last ``divergence_window`` steps as running prefix sums, so
each step costs O(1): the window is cut into four quarters, and the run diverges when the quarter means
rise one after the other and the latest is ``divergence_ratio`` times the best smoothed loss of the run.
After it fires it waits a full window before it can fire again.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from nanguard.config import GuardConfig


class DivergenceWatch:
    def __init__(self, config: GuardConfig) -> None:
        self.window = config.divergence_window
        self.ratio = config.divergence_ratio
        self.best = math.inf
        self.cooldown = 0
        self._total = 0.0
        self._prefix: deque[float] = deque(maxlen=self.window + 1)
        self._prefix.append(0.0)

    def observe(self, loss: float) -> str | None:
        """Feed one accepted loss; returns the evidence line when the run is diverging, else None."""
        if not math.isfinite(loss):
            return None
        self._total += loss
        self._prefix.append(self._total)
        if len(self._prefix) == self._prefix.maxlen and self._prefix[0] > 1e12 * max(1.0, abs(loss)):
            self._rebase()
        if self.cooldown > 0:
            self.cooldown -= 1
            return None
        if len(self._prefix) < self.window + 1:
            return None
        quarter = self.window // 4
        start = len(self._prefix) - 1 - 4 * quarter
        means = [(self._prefix[start + (i + 1) * quarter] - self._prefix[start + i * quarter]) / quarter for i in range(4)]
        if not all(map(math.isfinite, means)):
            return None
        self.best = min(self.best, *means)
        rising = means[0] < means[1] < means[2] < means[3]
        if not (self.best > 0 and rising and means[3] > self.ratio * self.best):
            return None
        line = (f"mean loss of the last {quarter} steps is {means[3]:.4g}, {means[3] / self.best:.2f}x the best "
                f"smoothed loss {self.best:.4g} of the run, and it rose in each of the last 4 quarters of {self.window} steps")
        self.cooldown = self.window
        self.best = math.inf
        return line

    def rebaseline(self) -> None:
        """Forget the loss history (a new normal level was accepted)."""
        self.best, self.cooldown, self._total = math.inf, 0, 0.0
        self._prefix.clear()
        self._prefix.append(0.0)

    def _rebase(self) -> None:
        """Keep the prefix sums small (they only ever need differences)."""
        base = self._prefix[0]
        values = [v - base for v in self._prefix]
        self._prefix.clear()
        self._prefix.extend(values)
        self._total -= base

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "cooldown": self.cooldown, "prefix": list(self._prefix), "total": self._total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = float(state.get("best", math.inf))
        self.cooldown = int(state.get("cooldown", 0))
        self._prefix.clear()
        self._prefix.extend(float(v) for v in state.get("prefix", [0.0]))
        self._total = float(state.get("total", 0.0))


__all__ = ["DivergenceWatch"]
