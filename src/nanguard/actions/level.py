"""Level shifts the spike test lets through: the loss settling on a new, higher level in one jump.

The spike test judges a step against the running mean and deviation of the loss. A warm-up's steady
loss drop inflates that deviation (the mean lags the falling loss), so a data or task switch soon after
it (nanoGPT reading a second corpus at iteration 60: loss 1.7 -> 6.3, spike limit 7.1) is accepted as an
ordinary step and goes unrecorded. This watch looks at the accepted losses themselves instead of their
statistics, and calls a level shift when

* each of the last ``PERSIST`` losses is more than ``RATIO`` times the highest of the ``BEFORE`` losses
  before them (a jump above everything seen lately, not a noisy step);
* they are not growing: the last is at most ``GROWTH`` times the first. An exponential rise fast enough
  to pass the jump test (over ``RATIO``x per step) is over ``RATIO ** 2``x across two steps, so a divergence
  can never pass both;
* all losses are positive and finite (a contrastive or RL objective has no level to compare) and the
  spike statistics had warmed up before the jump.

Nothing is skipped: the updates went through as they would without the guard, so the run stays bit for
bit the unguarded one. The caller records one ``level_shift`` event (action ``none``) and re-baselines.
On the healthy-dynamics suite the largest ratio seen is 1.04 (a GAN's losses trading places); the
nanoGPT switch reaches 3.2.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any, NamedTuple

BEFORE = 16
PERSIST = 3
RATIO = 2.0
GROWTH = 1.5


class Shift(NamedTuple):
    """A level shift found: the step it began at, the level before (mean of the window) and after."""

    step: int
    before: float
    after: float
    steps: int


class LevelWatch:
    """The recent accepted losses, and the test for a persistent jump to a new level."""

    def __init__(self) -> None:
        self.recent: deque[tuple[int, float]] = deque(maxlen=BEFORE + PERSIST)

    def rebaseline(self) -> None:
        """Forget the history (a new level was accepted, or the weights were rolled back)."""
        self.recent.clear()

    def observe(self, step: int, loss: float, *, warm: bool) -> Shift | None:
        """Feed one accepted loss; returns the shift when the last ``PERSIST`` losses sit on a new level.
        ``warm``: the spike statistics have warmed up (a run's first fast drop is no level to compare)."""
        if not (warm and math.isfinite(loss) and loss > 0):
            self.recent.clear()
            return None
        self.recent.append((step, loss))
        if len(self.recent) < BEFORE + PERSIST:
            return None
        values = [v for _, v in self.recent]
        old, new = values[:BEFORE], values[BEFORE:]
        if min(new) <= RATIO * max(old) or new[-1] > GROWTH * new[0]:
            return None
        first = self.recent[BEFORE][0]
        self.recent.clear()
        return Shift(first, sum(old) / len(old), sum(new) / len(new), PERSIST)

    def state_dict(self) -> dict[str, Any]:
        return {"recent": [list(pair) for pair in self.recent]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.recent.clear()
        self.recent.extend((int(s), float(v)) for s, v in state.get("recent", []))


__all__ = ["LevelWatch", "Shift"]
