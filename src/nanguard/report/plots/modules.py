"""Per-module activation and gradient magnitudes at an event, against the largest value the dtype holds.

A bar that reaches the red line is a module that overflowed (or nearly did): the chart answers
"which layer blew up, and by how much headroom" at a glance.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from nanguard.report.load import ModuleStat
from nanguard.report.plots.style import LITERAL, NONFINITE_COLOR, figure, shorten, to_png

MAX_MODULES = 30

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

    Non-finite ones and the diagnosed module always stay; the rest are ranked by magnitude.
    """
    if len(stats) <= limit:
        return list(stats)
    must = [i for i, s in enumerate(stats) if s.nonfinite or s.module == highlight]
    rest = sorted((i for i in range(len(stats)) if i not in set(must)), key=lambda i: -_magnitude(stats[i]))
    keep = set(must[:limit]) | set(rest[: max(0, limit - len(must))])
    return [stats[i] for i in sorted(keep)]


def format_limit(value: float) -> str:
    """65504 reads as "65,504" (the number people know); huge limits in scientific notation."""
    return f"{value:,.0f}" if value < 1e6 else f"{value:.3g}"


def plot_module_magnitudes(stats: Sequence[ModuleStat], highlight: str | None = None) -> bytes | None:
    """Horizontal bars per module on a log axis; ``None`` when no module has a magnitude or a flag.

    The axis ends a little past the smallest dtype limit (or the largest value, if beyond it): a
    float32 limit of 3.4e38 would otherwise squash a float16 story into the left edge. Limits past
    the axis end are named at the right edge instead of drawn.
    """
    chosen = select_modules(stats, highlight)
    if not chosen or not any(s.nonfinite or _magnitude(s) > 0 for s in chosen):
        return None
    limits: dict[str, float] = {}
    for stat in chosen:
        name, limit = normalise_dtype(stat.dtype), dtype_limit(stat.dtype)
        if name and limit:
            limits[name] = limit
    values = [v for s in chosen for v in (s.act_absmax, s.grad_absmax) if v is not None and math.isfinite(v) and v > 0]
    top = max([*values, min(limits.values(), default=1.0), 1.0]) * 30
    bottom = min([*values, 1.0]) / 10
    height = 1.2 + 0.42 * len(chosen)
    with figure(11.5, height) as fig:
        ax = fig.subplots()
        for row, stat in enumerate(chosen):
            y = len(chosen) - 1 - row
            for offset, value, color in ((0.2, stat.act_absmax, ACT_COLOR), (-0.2, stat.grad_absmax, GRAD_COLOR)):
                if value is not None and math.isfinite(value) and value > 0:
                    ax.barh(y + offset, value - bottom, height=0.38, left=bottom, color=color, zorder=3)
                    ax.annotate(f"{value:.3g}", (value, y + offset), xytext=(3, 0), textcoords="offset points",
                                va="center", fontsize=7, color="#495057")
            if stat.nonfinite:
                ax.barh(y, top, height=0.8, left=bottom, facecolor="none", edgecolor=NONFINITE_COLOR,
                        hatch="///", linewidth=0, zorder=2)
                ax.annotate("non-finite", (bottom, y), xytext=(6, 0), textcoords="offset points", va="center",
                            fontsize=8, fontweight="bold", color=NONFINITE_COLOR, zorder=4,
                            bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "edgecolor": "none"})
        off_scale = []
        for name, value in sorted(limits.items(), key=lambda item: item[1]):
            if value > top:
                off_scale.append(f"{name} max {format_limit(value)}")
                continue
            ax.axvline(value, color=NONFINITE_COLOR, linestyle="--", linewidth=1.4, zorder=4)
            ax.annotate(f"{name} max {format_limit(value)}", (value, 1.0), xycoords=ax.get_xaxis_transform(),
                        xytext=(0, 3), textcoords="offset points", ha="center", va="bottom", fontsize=8,
                        color=NONFINITE_COLOR, fontweight="bold", annotation_clip=False, **LITERAL)
        if off_scale:
            ax.annotate(f"beyond the right edge: {', '.join(off_scale)}", (0.0, 1.0), xycoords="axes fraction",
                        xytext=(0, 3), textcoords="offset points", ha="left", va="bottom", fontsize=8,
                        color="#868e96", annotation_clip=False, **LITERAL)
        ax.set_xscale("log")
        ax.set_xlim(bottom, top)
        ax.set_ylim(-0.7, len(chosen) - 0.3)
        ax.set_yticks(range(len(chosen)))
        labels = [f"{shorten(s.module or '(root)')}  [{normalise_dtype(s.dtype) or '?'}]" for s in reversed(chosen)]
        ax.set_yticklabels(labels, fontsize=8, **LITERAL)
        for tick, stat in zip(ax.get_yticklabels(), reversed(chosen), strict=True):
            if stat.module == highlight or stat.nonfinite:
                tick.set_color(NONFINITE_COLOR)
                tick.set_fontweight("bold")
        ax.grid(axis="y", visible=False)
        ax.set_xlabel("largest |value| at the event (log scale)")
        from matplotlib.patches import Patch

        ax.legend(handles=[Patch(color=ACT_COLOR, label="activation |max|"),
                           Patch(color=GRAD_COLOR, label="gradient |max|")],
                  loc="lower right", fontsize=8, frameon=True)
        return to_png(fig)
