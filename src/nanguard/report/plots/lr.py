"""The guard's learning-rate multiplier over the run: where it backed off and how it recovered."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

from nanguard.report.load import EventRecord, HistoryRow
from nanguard.report.plots.style import ACTION_COLORS, figure, set_margins, to_png

MAX_CUT_LABELS = 12


def cuts(points: Sequence[tuple[int, float]]) -> list[tuple[int, float]]:
    """The (step, new multiplier) of every step down; the slow recovery in between is not a cut."""
    return [(step, value) for (_, before), (step, value) in itertools.pairwise(points)
            if value < before and not math.isclose(value, before)]


def plot_lr_multiplier(history: Sequence[HistoryRow], events: Sequence[EventRecord]) -> bytes | None:
    """A step curve of ``lr_multiplier``; ``None`` when it never leaves 1 (nothing to show)."""
    points = [(row.step, row.lr_multiplier) for row in history
              if row.lr_multiplier is not None and math.isfinite(row.lr_multiplier)]
    if not points or all(math.isclose(value, 1.0) for _, value in points):
        return None
    steps, values = zip(*points, strict=True)
    with figure(11.5, 2.6) as fig:
        ax = fig.subplots()
        ax.plot(steps, values, drawstyle="steps-post", color=ACTION_COLORS["lr_backoff"], linewidth=1.6)
        ax.fill_between(steps, values, step="post", color=ACTION_COLORS["lr_backoff"], alpha=0.12)
        ax.axhline(1.0, color="#868e96", linewidth=0.8, linestyle=":")
        for event in events:
            if event.action in ("lr_backoff", "rollback"):
                ax.axvline(event.step, color=ACTION_COLORS[event.action], linestyle="--", linewidth=1.0)
        for step, value in cuts(points)[:MAX_CUT_LABELS]:
            ax.annotate(f"→ {value:.2g}", (step, value), xytext=(4, -4), textcoords="offset points", ha="left",
                        va="top", fontsize=8, fontweight="bold", color=ACTION_COLORS["lr_backoff"])
        ax.set_ylim(0, max(1.05, max(values) * 1.05))
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("guard's LR multiplier")
        set_margins(fig, left=1.0, right=0.8, top=0.3, bottom=0.6)
        return to_png(fig)
