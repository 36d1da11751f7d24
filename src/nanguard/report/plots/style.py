"""Shared figure plumbing: the matplotlib import, house style, PNG encoding, axis-scale choice."""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from nanguard._optional import require

DPI = 100
ACTION_COLORS = {
    "skip": "#e8590c",
    "clip": "#e0a800",
    "rollback": "#7048e8",
    "lr_backoff": "#1c7ed6",
    "abort": "#c92a2a",
    "none": "#868e96",
}
NONFINITE_COLOR = "#c92a2a"
LOSS_COLOR = "#364fc7"
GRAD_COLOR = "#2b8a3e"

LITERAL = {"parse_math": False}
"""Keyword arguments for text that comes from the run: a "$" in a module name must not start mathtext."""

_STYLE = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.titleweight": "bold",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "legend.frameon": False,
}


def load_matplotlib() -> Any:
    """Import matplotlib or raise the error that names ``pip install 'nanguard[report]'``."""
    return require("matplotlib", extra="report", feature="the report's plots")


@contextmanager
def figure(width_in: float, height_in: float) -> Iterator[Any]:
    """A fresh ``Figure`` on the Agg canvas, under the house style; no pyplot global state is touched.

    The figure is white (not transparent) because :func:`to_png` crops its drawn pixels as they are.
    """
    matplotlib = load_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with matplotlib.rc_context(_STYLE):
        fig = Figure(figsize=(width_in, height_in), dpi=DPI, facecolor="white")
        FigureCanvasAgg(fig)
        yield fig


def set_margins(fig: Any, *, left: float, right: float, top: float, bottom: float, hspace: float | None = None) -> None:
    """Room around the axes in inches, so labels drawn outside them stay on the canvas (see :func:`to_png`)."""
    width, height = fig.get_size_inches()
    fig.subplots_adjust(left=left / width, right=1 - right / width, top=1 - top / height, bottom=bottom / height,
                        hspace=hspace)


PAD_IN = 0.15


def to_png(fig: Any) -> bytes:
    """PNG bytes of the figure cropped to what was drawn, plus a small pad.

    ``savefig(bbox_inches="tight")`` lays the figure out twice (once to measure, once to draw), which
    was most of a chart's cost. Here the figure is drawn once and its pixels are cropped to the
    drawn extent; charts leave room for their outside labels (:func:`set_margins`). If something
    still sticks out of the canvas, the slower tight save keeps it in the image.
    """
    import numpy as np
    from PIL import Image

    canvas = fig.canvas
    canvas.draw()
    box = fig.get_tightbbox(canvas.get_renderer())
    width, height = fig.get_size_inches()
    if box is None or box.x0 < 0 or box.y0 < 0 or box.x1 > width or box.y1 > height:
        return _tight_png(fig)
    dpi = fig.dpi
    pixels = np.asarray(canvas.buffer_rgba())
    rows, cols = pixels.shape[:2]
    left, right = max(0, int((box.x0 - PAD_IN) * dpi)), min(cols, int((box.x1 + PAD_IN) * dpi) + 1)
    top, bottom = max(0, int(rows - (box.y1 + PAD_IN) * dpi)), min(rows, int(rows - (box.y0 - PAD_IN) * dpi) + 1)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels[top:bottom, left:right, :3])).save(buffer, format="png")
    return buffer.getvalue()


def _tight_png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, facecolor="white", bbox_inches="tight", pad_inches=PAD_IN)
    return buffer.getvalue()


def choose_scale(values: Iterable[float]) -> tuple[str, float | None]:
    """Log when finite values span more than ~1.5 decades, so a spike does not flatten the rest.

    Returns ``(scale, linthresh)``; ``linthresh`` is set for "symlog", which is used when zeros or
    negative values rule out a plain log axis but the magnitudes still span decades.
    """
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "linear", None
    magnitudes = sorted(abs(v) for v in finite if v != 0)
    if not magnitudes or magnitudes[-1] / magnitudes[0] <= 30:
        return "linear", None
    if min(finite) > 0:
        return "log", None
    # Zeros or negatives: linear near zero, logarithmic beyond the typical (median) magnitude.
    return "symlog", magnitudes[len(magnitudes) // 2]


def apply_scale(ax: Any, values: Iterable[float], axis: str = "y") -> str:
    scale, linthresh = choose_scale(values)
    setter: Callable[..., Any] = ax.set_yscale if axis == "y" else ax.set_xscale
    if scale == "symlog":
        setter("symlog", linthresh=linthresh)
    else:
        setter(scale)
    if scale != "linear":
        plain_log_ticks(ax.yaxis if axis == "y" else ax.xaxis)
    return scale


def log_tick(value: float, _position: Any = None) -> str:
    """"0.01", "1", "1000", "1e6": what people read, without mathtext's "$10^{6}$" typesetting."""
    if value == 0:
        return "0"
    magnitude = abs(value)
    if 1e-3 <= magnitude < 1e5:
        return f"{value:g}"
    mantissa, exponent = f"{value:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def plain_log_ticks(axis: Any) -> None:
    """Decade ticks labelled as plain numbers, no minor ticks.

    Matplotlib's default log labels go through mathtext (a pyparsing grammar): it made most of the
    time of a chart, and the minor ticks most of its objects.
    """
    from matplotlib.ticker import FuncFormatter, NullLocator

    axis.set_major_formatter(FuncFormatter(log_tick))
    axis.set_minor_locator(NullLocator())


def shorten(text: str, limit: int = 44) -> str:
    """Keep both ends of a long module name: the end says which layer, the start which block."""
    if len(text) <= limit:
        return text
    keep = (limit - 1) // 2
    return f"{text[:keep]}…{text[-(limit - 1 - keep):]}"


OUTLIER_SPREADS = 50.0
"""A value is pinned above the axis when it exceeds the 90th percentile by this many 10–90 spreads.

The spread counts as at least half the median, so on a flat plateau a 4x spike is still drawn.
"""
MAX_OUTLIER_FRACTION = 0.02
"""More outliers than this and they are the data (a divergence), not spikes: draw them all."""


def outlier_ceiling(values: Iterable[float]) -> float | None:
    """The level above which a few extreme values are pinned to the top edge instead of plotted.

    One loss of 8.7e15 among values near 2 would otherwise set the axis and flatten the whole run
    into a line; pinned and labelled, it stays visible and the curve stays readable. ``None`` when
    no value needs pinning.
    """
    finite = sorted(v for v in values if math.isfinite(v))
    if len(finite) < 10:
        return None
    q10, q50, q90 = (finite[int(q * (len(finite) - 1))] for q in (0.1, 0.5, 0.9))
    spread = max(q90 - q10, 0.5 * abs(q50), 1e-12)
    ceiling = q90 + OUTLIER_SPREADS * spread
    above = sum(v > ceiling for v in finite)
    if above == 0 or above > MAX_OUTLIER_FRACTION * len(finite):
        return None
    return ceiling


def text_box(text: Any, renderer: Any, pad_px: float = 2.0) -> Any:
    """The pixel box a text artist covers, bounding box included, grown by ``pad_px``."""
    from matplotlib.transforms import Bbox

    box = text.get_window_extent(renderer)
    patch = text.get_bbox_patch()
    if patch is not None:
        patch_box = patch.get_window_extent(renderer)
        box = Bbox.union([box, patch_box])
    return Bbox.from_extents(box.x0 - pad_px, box.y0 - pad_px, box.x1 + pad_px, box.y1 + pad_px)


def keep_apart(texts: Sequence[Any], fig: Any, avoid: Sequence[Any] = ()) -> int:
    """Hide each text that would overlap one kept before it (or one of ``avoid``); returns how many were hidden.

    Labels are measured where the renderer will draw them, so "no two labels overlap" holds for the
    image people see, whatever the font, the figure size or how close the steps are.
    """
    renderer = fig.canvas.get_renderer()
    kept = [text_box(text, renderer) for text in avoid if text.get_visible() and text.get_text()]
    hidden = 0
    for text in texts:
        box = text_box(text, renderer)
        if any(box.overlaps(other) for other in kept):
            text.set_visible(False)
            hidden += 1
        else:
            kept.append(box)
    return hidden
