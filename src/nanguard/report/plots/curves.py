"""Loss and gradient norm against step, with every event and guard action marked where it happened.

Events are drawn by signature: a strip above the curves has one lane per problem (A, B, ... as the
report's cards are lettered) with a tick at each of its steps, so thirty repeats of one fault read as
one row of ticks, not thirty labels fighting for room. Values the axis cannot show usefully — NaN/Inf,
and a few finite spikes many orders above the rest — are pinned to the top edge and labelled with
their value, so the curve keeps its shape and the spike keeps its number. No two labels overlap: each
is measured where it will be drawn, and one that would collide is left out.
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
    keep_apart,
    outlier_ceiling,
    set_margins,
    to_png,
)
from nanguard.report.signature import EventGroup, group_events
from nanguard.report.text import action_phrase, format_number

MAX_LANES = 8
"""Problems beyond this many share the last lane ("others"): the strip stays a strip."""
LANE_HEIGHT_IN = 0.26
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


_SHORT_TRIGGER = {"nonfinite_loss": "loss", "nonfinite_grad": "gradient", "nonfinite_weights": "weights",
                  "nonfinite_input": "input", "loss_spike": "loss spike", "grad_spike": "grad spike",
                  "exception": "exception", "stalled": "stalled"}
CHAR_WIDTH_IN = 0.075


def lane_label(group: EventGroup) -> str:
    """"A  NaN loss ×30": the letter of the problem's card, what was seen, how often."""
    event = group.first
    what = _SHORT_TRIGGER.get(event.trigger, event.trigger.replace("_", " "))
    if event.trigger.startswith("nonfinite"):
        value = event.loss if event.trigger == "nonfinite_loss" else event.grad_norm
        prefix = format_number(value).lstrip("+") if value is not None and not math.isfinite(value) else "non-finite"
        what = f"{prefix} {what}"
    count = f" ×{len(group.events)}" if len(group.events) > 1 else ""
    return f"{group.label}  {what}{count}"


def lanes(groups: Sequence[EventGroup]) -> list[tuple[str, list[EventRecord]]]:
    """(label, events) per lane: one per problem, the ones past :data:`MAX_LANES` merged into the last."""
    if len(groups) <= MAX_LANES:
        return [(lane_label(group), list(group.events)) for group in groups]
    shown = [(lane_label(group), list(group.events)) for group in groups[: MAX_LANES - 1]]
    rest = groups[MAX_LANES - 1 :]
    merged = [event for group in rest for event in group.events]
    return [*shown, (f"{rest[0].label}–{rest[-1].label}  {len(rest)} more ×{len(merged)}", merged)]


def _pin(ax: Any, points: Sequence[tuple[int, float]], marker: str, color: str) -> list[Any]:
    """Markers on the top edge (x in data, y in axes coordinates); returns their value labels."""
    if not points:
        return []
    ax.scatter([s for s, _ in points], [0.97] * len(points), transform=ax.get_xaxis_transform(), marker=marker,
               s=70, color=color, zorder=6, clip_on=False)
    if len(points) > MAX_PINNED_LABELS:
        return []
    return [ax.annotate(format_number(value), (step, 0.97), xycoords=ax.get_xaxis_transform(), xytext=(7, -3),
                        textcoords="offset points", color=color, fontsize=8, fontweight="bold", va="top")
            for step, value in points]


def _draw_series(ax: Any, series: Series, color: str, label: str) -> tuple[SplitSeries, list[Any]]:
    split = split_series(series)
    if split.drawn:
        xs, ys = zip(*split.drawn, strict=True)
        ax.plot(xs, ys, color=color, linewidth=1.3, marker="o" if len(xs) < 40 else None, markersize=3)
        apply_scale(ax, ys)
    labels = _pin(ax, split.nonfinite, "X", NONFINITE_COLOR) + _pin(ax, split.above, "^", PINNED_COLOR)
    ax.set_ylabel(label, fontweight="bold")
    return split, labels


def _mark_history_actions(ax: Any, history: Sequence[HistoryRow], event_steps: set[int]) -> None:
    """Actions without an event (a clip, a skip the guard did not diagnose) as ticks on the bottom edge."""
    for action, color in ACTION_COLORS.items():
        steps = [row.step for row in history if row.action == action and row.step not in event_steps]
        if action != "none" and steps:
            ax.scatter(steps, [0.03] * len(steps), transform=ax.get_xaxis_transform(), marker="|",
                       s=160, linewidths=2, color=color, zorder=5, clip_on=False)


MAX_MARKS = 1500
"""Event marks per action and lane: more than the plot has pixel columns would draw the same picture slower."""


def thin_steps(steps: Sequence[int], limit: int = MAX_MARKS) -> list[int]:
    """Sorted distinct steps, at most about ``limit``: one per bucket of ``span / limit`` steps (first kept)."""
    distinct = sorted(set(steps))
    if len(distinct) <= limit:
        return distinct
    width = (distinct[-1] - distinct[0]) / limit
    kept, edge = [], -math.inf
    for step in distinct:
        if step >= edge:
            kept.append(step)
            edge = step + width
    return kept


def _event_lines(axes: Sequence[Any], events: Sequence[EventRecord]) -> None:
    """A faint line at every event step through both panels, coloured by action: one collection per action."""
    for action, color in ACTION_COLORS.items():
        steps = thin_steps([event.step for event in events if event.action == action])
        for ax in axes:
            if steps:
                ax.vlines(steps, 0, 1, transform=ax.get_xaxis_transform(), colors=color, linestyles="--",
                          linewidth=1.0, alpha=0.55, zorder=3)


def _draw_lanes(ax: Any, rows: Sequence[tuple[str, list[EventRecord]]]) -> None:
    """One lane per problem, top to bottom in order of first appearance, a tick per event."""
    count = len(rows)
    for lane, (_, events) in enumerate(rows):
        y = count - 1 - lane
        for action, color in ACTION_COLORS.items():
            steps = thin_steps([event.step for event in events if event.action == action])
            if steps:
                ax.scatter(steps, [y] * len(steps), marker="|", s=110, linewidths=2, color=color, zorder=4)
    ax.set_ylim(-0.6, count - 0.4)
    ax.set_yticks(range(count))
    ax.set_yticklabels([label for label, _ in reversed(rows)], fontsize=8, **LITERAL)
    ax.grid(axis="y", visible=False)
    ax.tick_params(axis="y", length=0)
    ax.set_title("events by problem (letters as in the cards below)", fontsize=9, fontweight="normal", loc="left",
                 color="#495057")


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


def draw_training_curves(fig: Any, history: Sequence[HistoryRow], events: Sequence[EventRecord],
                         groups: Sequence[EventGroup]) -> bool:
    """Draw into ``fig``: the event lanes (when there are events), loss, gradient norm; False if nothing to draw."""
    loss, grad = series_from(history, events, "loss"), series_from(history, events, "grad_norm")
    if not loss.steps:
        return False
    rows = lanes(groups)
    lane_in = LANE_HEIGHT_IN * len(rows) + 0.1 if rows else 0.0
    panels = [2.6, 2.6] if not rows else [lane_in, 2.6, 2.6]
    axes = fig.subplots(len(panels), 1, sharex=True, gridspec_kw={"height_ratios": panels})
    ax_loss, ax_grad = axes[-2], axes[-1]
    (loss_split, loss_labels), (grad_split, grad_labels) = (_draw_series(ax_loss, loss, LOSS_COLOR, "loss"),
                                                            _draw_series(ax_grad, grad, GRAD_COLOR, "gradient norm"))
    ax_grad.set_xlabel("optimizer step")
    event_steps = {event.step for event in events}
    for ax in (ax_loss, ax_grad):
        _mark_history_actions(ax, history, event_steps)
    _event_lines((ax_loss, ax_grad), events)
    if rows:
        _draw_lanes(axes[0], rows)
    actions = [a for a in ACTION_COLORS if a != "none" and (
        any(row.action == a for row in history) or any(event.action == a for event in events))]
    _legend(fig, actions, bool(loss_split.nonfinite or grad_split.nonfinite), bool(loss_split.above or grad_split.above))
    longest = max((len(label) for label, _ in rows), default=0)
    top = 0.45 if rows else 0.2
    set_margins(fig, left=max(1.0, 0.45 + CHAR_WIDTH_IN * longest), right=0.8, top=top, bottom=1.0, hspace=0.12)
    keep_apart(loss_labels, fig)
    keep_apart(grad_labels, fig)
    return True


def figure_height(groups: Sequence[EventGroup]) -> float:
    rows = min(len(groups), MAX_LANES)
    return 6.1 + (LANE_HEIGHT_IN * rows + 0.55 if rows else 0.0)


def plot_training_curves(history: Sequence[HistoryRow], events: Sequence[EventRecord],
                         groups: Sequence[EventGroup] | None = None) -> bytes | None:
    """Event lanes over two panels sharing the step axis; ``None`` when there is nothing to draw."""
    groups = group_events(events) if groups is None else groups
    with figure(11.5, figure_height(groups)) as fig:
        if not draw_training_curves(fig, history, events, groups):
            return None
        return to_png(fig)
