"""Loss and gradient norm against step, with every event and guard action marked where it happened.

Values the axis cannot show usefully — NaN/Inf, and a few finite spikes many orders above the rest —
are pinned to the top edge and labelled with their value, so the curve keeps its shape and the
spike keeps its number.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from nanguard.report.load import EventRecord, HistoryRow
from nanguard.report.plots.style import (
    ACTION_COLORS,
    GRAD_COLOR,
    LITERAL,
    LOSS_COLOR,
    NONFINITE_COLOR,
    apply_scale,
    figure,
    outlier_ceiling,
    set_margins,
    to_png,
)
from nanguard.report.text import action_phrase, format_number

LABEL_LEVELS = 3
"""Event labels above the plot are staggered over this many rows so neighbours do not overlap."""
MIN_LABEL_GAP = 0.2
"""Two labels on one row need at least this fraction of the axis width between them."""
MAX_PINNED_LABELS = 6
MAX_DRAWN_POINTS = 8000
"""Longer runs are thinned to each bucket's lowest and highest point: the same picture, drawn fast."""
PINNED_COLOR = "#862e9c"


@dataclass(frozen=True)
class Series:
    steps: tuple[int, ...]
    values: tuple[float | None, ...]


@dataclass(frozen=True)
class SplitSeries:
    """A series split into what is drawn as a curve and what is pinned to the top edge."""

    drawn: tuple[tuple[int, float], ...]
    nonfinite: tuple[tuple[int, float], ...]
    above: tuple[tuple[int, float], ...]


def series_from(history: Sequence[HistoryRow], events: Sequence[EventRecord], key: str) -> Series:
    """The curve from history; when there is no history, the values the events carry."""
    source: Sequence[Any] = history if history else sorted(events, key=lambda event: event.step)
    return Series(tuple(item.step for item in source), tuple(getattr(item, key) for item in source))


def thin(points: Sequence[tuple[int, float]], limit: int = MAX_DRAWN_POINTS) -> tuple[tuple[int, float], ...]:
    """Keep the extremes of each bucket, in step order, so no spike disappears from a long curve."""
    if len(points) <= limit:
        return tuple(points)
    size = math.ceil(2 * len(points) / limit)
    kept: list[tuple[int, float]] = []
    for start in range(0, len(points), size):
        bucket = points[start : start + size]
        low, high = min(bucket, key=lambda p: p[1]), max(bucket, key=lambda p: p[1])
        kept += sorted({low, high})
    return tuple(kept)


def split_series(series: Series) -> SplitSeries:
    points = [(s, v) for s, v in zip(series.steps, series.values, strict=True) if v is not None]
    ceiling = outlier_ceiling(v for _, v in points)
    finite = [(s, v) for s, v in points if math.isfinite(v)]
    return SplitSeries(
        drawn=thin([(s, v) for s, v in finite if ceiling is None or v <= ceiling]),
        nonfinite=tuple((s, v) for s, v in points if not math.isfinite(v)),
        above=tuple((s, v) for s, v in finite if ceiling is not None and v > ceiling),
    )


def stagger_labels(positions: Sequence[float], levels: int = LABEL_LEVELS, gap: float = MIN_LABEL_GAP) -> list[int | None]:
    """Give each label (x in axis fraction, sorted) the lowest row where it clears the previous one.

    ``None`` means no row is free: that event keeps its line on the plot but loses its text label.
    """
    last_on_level: list[float | None] = [None] * levels
    rows: list[int | None] = []
    for x in positions:
        row = next((lvl for lvl, last in enumerate(last_on_level) if last is None or x - last >= gap), None)
        if row is not None:
            last_on_level[row] = x
        rows.append(row)
    return rows


_SHORT_TRIGGER = {"nonfinite_loss": "loss", "nonfinite_grad": "gradient", "nonfinite_weights": "weights",
                  "nonfinite_input": "input", "loss_spike": "loss spike", "grad_spike": "grad spike"}


def event_label(index: int, event: EventRecord) -> str:
    """"#1 step 120 / NaN loss → skipped"."""
    what = _SHORT_TRIGGER.get(event.trigger, event.trigger.replace("_", " "))
    if event.trigger.startswith("nonfinite"):
        value = event.loss if event.trigger == "nonfinite_loss" else event.grad_norm
        prefix = format_number(value).lstrip("+") if value is not None and not math.isfinite(value) else "non-finite"
        what = f"{prefix} {what}"
    return f"#{index} step {event.step}\n{what} → {action_phrase(event.action)}"


def _pin(ax: Any, points: Sequence[tuple[int, float]], marker: str, color: str) -> None:
    """Markers on the top edge (x in data, y in axes coordinates), labelled with their values."""
    if not points:
        return
    ax.scatter([s for s, _ in points], [0.97] * len(points), transform=ax.get_xaxis_transform(), marker=marker,
               s=70, color=color, zorder=6, clip_on=False)
    if len(points) <= MAX_PINNED_LABELS:
        for step, value in points:
            ax.annotate(format_number(value), (step, 0.97), xycoords=ax.get_xaxis_transform(), xytext=(7, -3),
                        textcoords="offset points", color=color, fontsize=8, fontweight="bold", va="top")


def _draw_series(ax: Any, series: Series, color: str, label: str) -> SplitSeries:
    split = split_series(series)
    if split.drawn:
        xs, ys = zip(*split.drawn, strict=True)
        ax.plot(xs, ys, color=color, linewidth=1.3, marker="o" if len(xs) < 40 else None, markersize=3)
        apply_scale(ax, ys)
    _pin(ax, split.nonfinite, "X", NONFINITE_COLOR)
    _pin(ax, split.above, "^", PINNED_COLOR)
    ax.set_ylabel(label, fontweight="bold")
    return split


def _mark_history_actions(ax: Any, history: Sequence[HistoryRow], event_steps: set[int]) -> None:
    """Actions without an event (a clip, a skip the guard did not diagnose) as ticks on the bottom edge."""
    for action, color in ACTION_COLORS.items():
        steps = [row.step for row in history if row.action == action and row.step not in event_steps]
        if action != "none" and steps:
            ax.scatter(steps, [0.03] * len(steps), transform=ax.get_xaxis_transform(), marker="|",
                       s=160, linewidths=2, color=color, zorder=5, clip_on=False)


def _mark_events(axes: Sequence[Any], events: Sequence[EventRecord]) -> None:
    ordered = sorted(enumerate(events, start=1), key=lambda item: item[1].step)
    for ax in axes:
        for _, event in ordered:
            ax.axvline(event.step, color=ACTION_COLORS.get(event.action, "#495057"), linestyle="--",
                       linewidth=1.2, alpha=0.85, zorder=3)
    top = axes[0]
    lo, hi = top.get_xlim()
    span = (hi - lo) or 1.0
    rows = stagger_labels([(event.step - lo) / span for _, event in ordered])
    for (index, event), row in zip(ordered, rows, strict=True):
        if row is None:
            continue
        color = ACTION_COLORS.get(event.action, "#495057")
        top.annotate(event_label(index, event), (event.step, 1.0), xycoords=top.get_xaxis_transform(),
                     xytext=(0, 8 + 28 * row), textcoords="offset points", ha="center", va="bottom",
                     fontsize=8, color=color, fontweight="bold", annotation_clip=False,
                     bbox={"boxstyle": "round,pad=0.25", "facecolor": "white", "edgecolor": color, "linewidth": 0.8},
                     **LITERAL)


def _legend(fig: Any, actions: Sequence[str], any_nonfinite: bool, any_above: bool) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=ACTION_COLORS[a], linestyle="--", label=action_phrase(a)) for a in actions]
    if any_nonfinite:
        handles.append(Line2D([], [], color=NONFINITE_COLOR, marker="X", linestyle="", label="NaN/Inf (top edge)"))
    if any_above:
        handles.append(Line2D([], [], color=PINNED_COLOR, marker="^", linestyle="",
                              label="far above the axis (top edge, value shown)"))
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 7), fontsize=9,
                   bbox_to_anchor=(0.5, 0.0))


def plot_training_curves(history: Sequence[HistoryRow], events: Sequence[EventRecord]) -> bytes | None:
    """Two panels sharing the step axis; ``None`` when there is nothing to draw."""
    loss, grad = series_from(history, events, "loss"), series_from(history, events, "grad_norm")
    if not loss.steps:
        return None
    label_room = 0.35 + LABEL_LEVELS * 0.4 if events else 0.2
    with figure(11.5, 5.9 + label_room) as fig:
        ax_loss, ax_grad = fig.subplots(2, 1, sharex=True)
        splits = [_draw_series(ax_loss, loss, LOSS_COLOR, "loss"),
                  _draw_series(ax_grad, grad, GRAD_COLOR, "gradient norm")]
        ax_grad.set_xlabel("optimizer step")
        event_steps = {event.step for event in events}
        for ax in (ax_loss, ax_grad):
            _mark_history_actions(ax, history, event_steps)
        if events:
            _mark_events((ax_loss, ax_grad), events)
        actions = [a for a in ACTION_COLORS if a != "none" and (
            any(row.action == a for row in history) or any(event.action == a for event in events))]
        _legend(fig, actions, any(s.nonfinite for s in splits), any(s.above for s in splits))
        set_margins(fig, left=1.0, right=0.8, top=label_room, bottom=1.0, hspace=0.12)
        return to_png(fig)
