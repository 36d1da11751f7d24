"""Per-module activation and gradient magnitudes at an event, against the largest value the dtype holds.

A bar that reaches the red line is a module that overflowed (or nearly did): the chart answers
"which layer blew up, and by how much headroom" at a glance. Where the record says where the first
bad value was born (``role``), that module is marked, and what merely received the bad value
(downstream in the forward pass, or any module's gradient in the backward pass) is greyed, so the
eye goes to the one module that matters and not to every module the NaN later reached. NaN/Inf
counts are given per pass: "fwd 3" (op outputs in the forward pass), "bwd 2" (in the backward pass).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from nanguard.report.load import ModuleStat
from nanguard.report.plots.style import (
    LITERAL,
    NONFINITE_COLOR,
    figure,
    keep_apart,
    plain_log_ticks,
    set_margins,
    shorten,
    to_png,
)
from nanguard.report.text import module_name

MAX_MODULES = 16
"""Bars per chart: past this, a chart of a deep model is a wall nobody reads (and slow to draw)."""
LIMIT_SHOWN_WITHIN = 1e6
"""A dtype limit is drawn when it is within this factor of the largest value; farther, it is named
under the axis. float32's 3.4e38 next to activations near 10 would squash every bar into the left edge."""
ROW_HEIGHT_IN = 0.3
CHAR_WIDTH_IN = 0.075
"""A generous width of one 8-point character: room for the module names left of the axes."""

DTYPE_MAX = {
    "float16": 65504.0,
    "bfloat16": 3.3895313892515355e38,
    "float32": 3.4028234663852886e38,
    "float64": 1.7976931348623157e308,
    "float8_e4m3fn": 448.0,
    "float8_e4m3fnuz": 240.0,
    "float8_e5m2": 57344.0,
    "float8_e5m2fnuz": 57344.0,
}
_ALIASES = {"half": "float16", "fp16": "float16", "bf16": "bfloat16", "float": "float32",
            "fp32": "float32", "double": "float64", "fp64": "float64"}

ACT_COLOR = "#4263eb"
GRAD_COLOR = "#f08c00"


def normalise_dtype(dtype: str | None) -> str | None:
    """``torch.float16`` / ``half`` / ``fp16`` -> ``float16``."""
    if not dtype:
        return None
    name = re.sub(r"^(torch|numpy|np)\.", "", dtype.strip().lower())
    return _ALIASES.get(name, name)


def dtype_limit(dtype: str | None) -> float | None:
    """``torch.finfo(dtype).max``, from a table (no torch import) with torch as the fallback."""
    name = normalise_dtype(dtype)
    if name is None:
        return None
    if name in DTYPE_MAX:
        return DTYPE_MAX[name]
    try:
        import torch

        torch_dtype = getattr(torch, name, None)
        return float(torch.finfo(torch_dtype).max) if isinstance(torch_dtype, torch.dtype) else None
    except (ImportError, TypeError):
        return None


GREY = "#adb5bd"
DOWNSTREAM_TINT = "#e9ecef"


def _magnitude(stat: ModuleStat) -> float:
    values = [v for v in (stat.act_absmax, stat.grad_absmax) if v is not None and math.isfinite(v)]
    return max(values, default=0.0)


def is_birth(stat: ModuleStat, highlight: str | None) -> bool:
    """The module where the first bad value was born; older records only have the diagnosed module."""
    return stat.role == "birth" if stat.has_split else stat.module == highlight


def select_modules(stats: Sequence[ModuleStat], highlight: str | None, limit: int = MAX_MODULES) -> list[ModuleStat]:
    """Keep the modules worth a bar, in their recorded (execution) order.

    The birth (or the diagnosed module) always stays; then those with NaN/Inf in the forward pass,
    then any NaN/Inf (most first), then the largest magnitudes.
    """
    if len(stats) <= limit:
        return list(stats)
    order = sorted(range(len(stats)), key=lambda i: (not (is_birth(stats[i], highlight) or stats[i].module == highlight),
                                                     not (stats[i].forward_nonfinite or 0), -stats[i].nonfinite,
                                                     -_magnitude(stats[i])))
    return [stats[i] for i in sorted(order[:limit])]


def format_limit(value: float) -> str:
    """65504 reads as "65,504" (the number people know); huge limits in scientific notation."""
    return f"{value:,.0f}" if value < 1e6 else f"{value:.3g}"


def _positive(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and value > 0


def _label(stat: ModuleStat, highlight: str | None) -> str:
    name = shorten(module_name(stat.module) or "")
    marker = "▶ " if is_birth(stat, highlight) else ""
    return f"{marker}{name}  [{normalise_dtype(stat.dtype) or '?'}]"


def counts_text(stat: ModuleStat, highlight: str | None) -> str:
    """"born here · fwd 1", "fwd 3 · bwd 2", "NaN/Inf in 4 outputs" (older record), or "" when clean."""
    if not stat.has_split:
        text = f"NaN/Inf in {stat.nonfinite} output{'s' if stat.nonfinite != 1 else ''}" if stat.nonfinite else ""
    else:
        text = " · ".join(f"{name} {n}" for name, n in (("fwd", stat.forward_nonfinite), ("bwd", stat.backward_nonfinite))
                          if n)
    if is_birth(stat, highlight):
        mark = "born here" if stat.has_split else "diagnosed"
        return mark + (f" · {text}" if text else "")
    return text


def _is_grey(stat: ModuleStat, highlight: str | None) -> bool:
    """Greyed: it only received the bad value (downstream), or an older record cannot say where it stands."""
    if is_birth(stat, highlight):
        return False
    return stat.role == "downstream" or (not stat.has_split and stat.nonfinite > 0)


def _limits(chosen: Sequence[ModuleStat], largest: float) -> tuple[dict[str, float], dict[str, float]]:
    """dtype limits drawn as lines (near the data) and named under the axis (far beyond it)."""
    limits: dict[str, float] = {}
    for stat in chosen:
        name = normalise_dtype(stat.dtype)
        limit = stat.dtype_max if stat.dtype_max and math.isfinite(stat.dtype_max) else dtype_limit(stat.dtype)
        if name and limit:
            limits[name] = limit
    drawn = {name: value for name, value in limits.items() if value <= largest * LIMIT_SHOWN_WITHIN}
    return drawn, {name: value for name, value in limits.items() if name not in drawn}


def _draw_rows(ax: Any, chosen: Sequence[ModuleStat], highlight: str | None, bottom: float) -> None:
    rows = len(chosen)
    for row, stat in enumerate(chosen):
        y = rows - 1 - row
        grey, birth = _is_grey(stat, highlight), is_birth(stat, highlight)
        if birth or grey:
            ax.axhspan(y - 0.5, y + 0.5, color=NONFINITE_COLOR if birth else DOWNSTREAM_TINT,
                       alpha=0.10 if birth else 0.7, linewidth=0, zorder=1)
        text = counts_text(stat, highlight)
        if text:
            ax.annotate(text, (1.0, y), xycoords=("axes fraction", "data"), xytext=(6, 0), textcoords="offset points",
                        va="center", fontsize=8, color=NONFINITE_COLOR if birth else "#868e96", annotation_clip=False,
                        fontweight="bold" if birth else "normal")
        for offset, value, color in ((0.19, stat.act_absmax, ACT_COLOR), (-0.19, stat.grad_absmax, GRAD_COLOR)):
            if value is not None and _positive(value):
                ax.barh(y + offset, value - bottom, height=0.36, left=bottom, color=color, zorder=3,
                        alpha=0.35 if grey else 1.0)
                ax.annotate(f"{value:.3g}", (value, y + offset), xytext=(3, 0), textcoords="offset points",
                            va="center", fontsize=7, color="#868e96" if grey else "#343a40", zorder=5)


def _style_labels(ax: Any, chosen: Sequence[ModuleStat], highlight: str | None) -> None:
    rows = len(chosen)
    ax.set_ylim(-0.5, rows - 0.5)
    ax.set_yticks(range(rows))
    ax.set_yticklabels([_label(s, highlight) for s in reversed(chosen)], fontsize=8, **LITERAL)
    for tick, stat in zip(ax.get_yticklabels(), reversed(chosen), strict=True):
        if is_birth(stat, highlight):
            tick.set_color(NONFINITE_COLOR)
            tick.set_fontweight("bold")
        elif _is_grey(stat, highlight):
            tick.set_color("#868e96")
    ax.grid(axis="y", visible=False)


def _legend(fig: Any, chosen: Sequence[ModuleStat], highlight: str | None) -> None:
    """Under the axis label: the space above the bars belongs to the dtype limit's label."""
    from matplotlib.patches import Patch

    handles = [Patch(color=color, label=label) for color, label, key in
               ((ACT_COLOR, "activation |max|", "act_absmax"), (GRAD_COLOR, "gradient |max|", "grad_absmax"))
               if any(_positive(getattr(s, key)) for s in chosen)]
    split = any(s.has_split for s in chosen)
    if any(is_birth(s, highlight) for s in chosen):
        handles.append(Patch(color=NONFINITE_COLOR, alpha=0.2,
                             label="▶ first bad value born here" if split else "▶ diagnosed module"))
    if any(_is_grey(s, highlight) for s in chosen):
        handles.append(Patch(color=DOWNSTREAM_TINT, label="only received it (downstream)" if split
                             else "saw NaN/Inf (not located)"))
    fig.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 0.0), ncol=len(handles), fontsize=8,
               borderaxespad=0.3, handlelength=1.2)


def _extent(chosen: Sequence[ModuleStat]) -> tuple[float, float, dict[str, float], dict[str, float]]:
    """The log axis' (bottom, top) and the dtype limits drawn on it / named under it."""
    values = [v for s in chosen for v in (s.act_absmax, s.grad_absmax) if v is not None and _positive(v)]
    largest, smallest = max(values, default=1.0), min(values, default=1.0)
    drawn_limits, far_limits = _limits(chosen, largest)
    return min(smallest, largest / 10) / 4, max([largest, *drawn_limits.values()]) * 4, drawn_limits, far_limits


def figure_size(chosen: Sequence[ModuleStat], highlight: str | None) -> tuple[float, float, float, float]:
    """(width, height, left margin, right margin) in inches: room for the names and the NaN/Inf counts."""
    left = 0.35 + CHAR_WIDTH_IN * max(len(_label(s, highlight)) for s in chosen)
    right = 0.5 + CHAR_WIDTH_IN * max((len(counts_text(s, highlight)) for s in chosen), default=0)
    return left + 7.0 + right, 1.5 + ROW_HEIGHT_IN * len(chosen), left, right


def draw_module_magnitudes(fig: Any, chosen: Sequence[ModuleStat], highlight: str | None) -> None:
    bottom, top, drawn_limits, far_limits = _extent(chosen)
    _, _, left, right = figure_size(chosen, highlight)
    ax = fig.subplots()
    set_margins(fig, left=left, right=right, top=0.35, bottom=1.05)
    _draw_rows(ax, chosen, highlight, bottom)
    xlabel = "largest |value| per module at this step (log scale)"
    if far_limits:
        named = ", ".join(f"{name} max {format_limit(value)}" for name, value in sorted(far_limits.items()))
        xlabel += f"\n{named}: far beyond the right edge (these values are nowhere near it)"
    ax.set_xlabel(xlabel, **LITERAL)
    ax.set_xscale("log")
    plain_log_ticks(ax.xaxis)
    ax.set_xlim(bottom, top)
    _style_labels(ax, chosen, highlight)
    _legend(fig, chosen, highlight)
    limit_labels = []
    for name, value in drawn_limits.items():
        ax.axvline(value, color=NONFINITE_COLOR, linestyle="--", linewidth=1.4, zorder=4)
        limit_labels.append(ax.annotate(
            f"{name} max {format_limit(value)}", (value, 1.0), xycoords=ax.get_xaxis_transform(), xytext=(-3, 3),
            textcoords="offset points", ha="right", va="bottom", fontsize=8, color=NONFINITE_COLOR,
            fontweight="bold", annotation_clip=False, **LITERAL))
    if keep_apart(limit_labels, fig):
        hidden = [label.get_text() for label in limit_labels if not label.get_visible()]
        ax.set_xlabel(f"{xlabel}\n{', '.join(hidden)}: the dashed red line", **LITERAL)


def plot_module_magnitudes(stats: Sequence[ModuleStat], highlight: str | None = None) -> bytes | None:
    """Horizontal bars per module on a log axis; ``None`` when no module has a magnitude or a NaN/Inf count.

    ``highlight`` is the diagnosed module: it stands for the birth in records that do not say where
    each module stands. A dtype limit near the data is a red line; one far beyond it is named under
    the axis instead of stretching it.
    """
    chosen = select_modules(stats, highlight)
    if not chosen or not any(s.nonfinite or _magnitude(s) > 0 for s in chosen):
        return None
    width, height, _, _ = figure_size(chosen, highlight)
    with figure(width, height) as fig:
        draw_module_magnitudes(fig, chosen, highlight)
        return to_png(fig)
