"""The guard's learning-rate multiplier over the run: where it backed off and how it recovered.

Each cut is labelled with the new multiplier ("→ 0.25") where the renderer has room for it; cuts too
close to a labelled one keep their step on the curve and lose only the text (the caption says how many).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

from nanguard.report.load import EventRecord, HistoryRow
from nanguard.report.plots.style import ACTION_COLORS, figure, keep_apart, set_margins, to_png


def cuts(points: Sequence[tuple[int, float]]) -> list[tuple[int, float]]:
    """The (step, new multiplier) of every step down; the slow recovery in between is not a cut."""
    return [(step, value) for (_, before), (step, value) in itertools.pairwise(points)
            if value < before and not math.isclose(value, before)]


def multiplier_points(history: Sequence[HistoryRow]) -> list[tuple[int, float]]:
    return [(row.step, row.lr_multiplier) for row in history
            if row.lr_multiplier is not None and math.isfinite(row.lr_multiplier)]


def draw_lr_multiplier(fig: Any, history: Sequence[HistoryRow], events: Sequence[EventRecord]) -> int | None:
    """Draw into ``fig``; returns how many cut labels had no room (``None``: nothing to draw)."""
    points = multiplier_points(history)
    if not points or all(math.isclose(value, 1.0) for _, value in points):
        return None
    steps, values = zip(*points, strict=True)
    ax = fig.subplots()
    ax.plot(steps, values, drawstyle="steps-post", color=ACTION_COLORS["lr_backoff"], linewidth=1.6)
    ax.fill_between(steps, values, step="post", color=ACTION_COLORS["lr_backoff"], alpha=0.12)
    ax.axhline(1.0, color="#868e96", linewidth=0.8, linestyle=":")
    for action in ("lr_backoff", "rollback"):
        marked = sorted({event.step for event in events if event.action == action})
        if marked:
            ax.vlines(marked, 0, 1, transform=ax.get_xaxis_transform(), colors=ACTION_COLORS[action],
                      linestyles="--", linewidth=1.0)
    ax.set_ylim(0, max(1.05, max(values) * 1.05))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("guard's LR multiplier")
    set_margins(fig, left=1.0, right=0.8, top=0.3, bottom=0.6)
    # Above the new level, right of the drop: clear of the curve, and never down into the step axis.
    labels = [ax.annotate(f"→ {value:.2g}", (step, value), xytext=(4, 3), textcoords="offset points", ha="left",
                          va="bottom", fontsize=8, fontweight="bold", color=ACTION_COLORS["lr_backoff"])
              for step, value in cuts(points)]
    return keep_apart(labels, fig)


def plot_lr_multiplier(history: Sequence[HistoryRow], events: Sequence[EventRecord]) -> tuple[bytes, int] | None:
    """A step curve of ``lr_multiplier`` and the number of unlabelled cuts; ``None`` when it never leaves 1."""
    with figure(11.5, 2.6) as fig:
        hidden = draw_lr_multiplier(fig, history, events)
        if hidden is None:
            return None
        return to_png(fig), hidden
