"""Per-module activation and gradient magnitudes at an event, against the largest value the dtype holds.

A bar that reaches the red line is a module that overflowed (or nearly did): the chart answers
"which layer blew up, and by how much headroom" at a glance.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from nanguard.report.load import ModuleStat
from nanguard.report.plots.style import (
    LITERAL,
    NONFINITE_COLOR,
    figure,
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


def _magnitude(stat: ModuleStat) -> float:
    values = [v for v in (stat.act_absmax, stat.grad_absmax) if v is not None and math.isfinite(v)]
    return max(values, default=0.0)


def select_modules(stats: Sequence[ModuleStat], highlight: str | None, limit: int = MAX_MODULES) -> list[ModuleStat]:
    """Keep the modules worth a bar, in their recorded (execution) order.

    The diagnosed module always stays; then the non-finite ones (most NaN/Inf outputs first), then
    the largest magnitudes.
    """
    if len(stats) <= limit:
        return list(stats)
    order = sorted(range(len(stats)), key=lambda i: (stats[i].module != highlight, -stats[i].nonfinite,
                                                     -_magnitude(stats[i])))
    return [stats[i] for i in sorted(order[:limit])]


def format_limit(value: float) -> str:
    """65504 reads as "65,504" (the number people know); huge limits in scientific notation."""
    return f"{value:,.0f}" if value < 1e6 else f"{value:.3g}"


def _positive(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and value > 0


def _label(stat: ModuleStat, highlight: str | None) -> str:
    name = shorten(module_name(stat.module) or "")
    marker = "▶ " if stat.module == highlight else ""
    return f"{marker}{name}  [{normalise_dtype(stat.dtype) or '?'}]"


def plot_module_magnitudes(stats: Sequence[ModuleStat], highlight: str | None = None) -> bytes | None:
    """Horizontal bars per module on a log axis; ``None`` when no module has a magnitude or a flag.

    Modules that saw NaN/Inf get a shaded row and a count in the right margin, so their finite bars
    and values stay readable. A dtype limit near the data is a red line; one far beyond it is named
    under the axis instead of stretching it.
    """
    chosen = select_modules(stats, highlight)
    if not chosen or not any(s.nonfinite or _magnitude(s) > 0 for s in chosen):
        return None
    values = [v for s in chosen for v in (s.act_absmax, s.grad_absmax) if v is not None and _positive(v)]
    largest, smallest = max(values, default=1.0), min(values, default=1.0)
    limits: dict[str, float] = {}
    for stat in chosen:
        name, limit = normalise_dtype(stat.dtype), dtype_limit(stat.dtype)
        if name and limit:
            limits[name] = limit
    drawn_limits = {name: value for name, value in limits.items() if value <= largest * LIMIT_SHOWN_WITHIN}
    far_limits = {name: value for name, value in limits.items() if name not in drawn_limits}
    top = max([largest, *drawn_limits.values()]) * 4
    bottom = min(smallest, largest / 10) / 4
    rows = len(chosen)
    labels = [_label(s, highlight) for s in reversed(chosen)]
    left = 0.35 + CHAR_WIDTH_IN * max(len(label) for label in labels)
    right = 1.7 if any(s.nonfinite for s in chosen) else 0.5
    axes_width = 7.0
    with figure(left + axes_width + right, 1.3 + ROW_HEIGHT_IN * rows) as fig:
        ax = fig.subplots()
        set_margins(fig, left=left, right=right, top=0.45, bottom=0.85)
        for row, stat in enumerate(chosen):
            y = rows - 1 - row
            if stat.nonfinite:
                ax.axhspan(y - 0.5, y + 0.5, color=NONFINITE_COLOR, alpha=0.08, linewidth=0, zorder=1)
                ax.annotate(f"NaN/Inf in {stat.nonfinite} output{'s' if stat.nonfinite != 1 else ''}", (1.0, y),
                            xycoords=("axes fraction", "data"), xytext=(6, 0), textcoords="offset points",
                            va="center", fontsize=8, color=NONFINITE_COLOR, annotation_clip=False)
            for offset, value, color in ((0.19, stat.act_absmax, ACT_COLOR), (-0.19, stat.grad_absmax, GRAD_COLOR)):
                if value is not None and _positive(value):
                    ax.barh(y + offset, value - bottom, height=0.36, left=bottom, color=color, zorder=3)
                    ax.annotate(f"{value:.3g}", (value, y + offset), xytext=(3, 0), textcoords="offset points",
                                va="center", fontsize=7, color="#343a40", zorder=5)
        for name, value in drawn_limits.items():
            ax.axvline(value, color=NONFINITE_COLOR, linestyle="--", linewidth=1.4, zorder=4)
            ax.annotate(f"{name} max {format_limit(value)}", (value, 1.0), xycoords=ax.get_xaxis_transform(),
                        xytext=(-3, 3), textcoords="offset points", ha="right", va="bottom", fontsize=8,
                        color=NONFINITE_COLOR, fontweight="bold", annotation_clip=False, **LITERAL)
        xlabel = "largest |value| per module at this step (log scale)"
        if far_limits:
            named = ", ".join(f"{name} max {format_limit(value)}" for name, value in sorted(far_limits.items()))
            xlabel += f"\n{named}: far beyond the right edge (these values are nowhere near it)"
        ax.set_xlabel(xlabel, **LITERAL)
        ax.set_xscale("log")
        plain_log_ticks(ax.xaxis)
        ax.set_xlim(bottom, top)
        ax.set_ylim(-0.5, rows - 0.5)
        ax.set_yticks(range(rows))
        ax.set_yticklabels(labels, fontsize=8, **LITERAL)
        for tick, stat in zip(ax.get_yticklabels(), reversed(chosen), strict=True):
            if stat.nonfinite:
                tick.set_color(NONFINITE_COLOR)
            if stat.module == highlight:
                tick.set_fontweight("bold")
        ax.grid(axis="y", visible=False)
        from matplotlib.patches import Patch

        handles = [Patch(color=color, label=label) for color, label, key in
                   ((ACT_COLOR, "activation |max|", "act_absmax"), (GRAD_COLOR, "gradient |max|", "grad_absmax"))
                   if any(_positive(getattr(s, key)) for s in chosen)]
        if any(s.nonfinite for s in chosen):
            handles.append(Patch(color=NONFINITE_COLOR, alpha=0.15, label="saw NaN/Inf"))
        if highlight is not None and any(s.module == highlight for s in chosen):
            handles.append(Patch(color="none", label="▶ diagnosed module"))
        ax.legend(handles=handles, loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=len(handles), fontsize=8,
                  borderaxespad=0.3, handlelength=1.2)
        return to_png(fig)
