"""The chart helpers: which modules get a bar, how a figure becomes a cropped PNG, tick and cut labels."""

from __future__ import annotations

import io

from PIL import Image

from nanguard.report.load import ModuleStat
from nanguard.report.plots.lr import cuts
from nanguard.report.plots.modules import MAX_MODULES, plot_module_magnitudes, select_modules
from nanguard.report.plots.style import DPI, figure, log_tick, to_png


def _size(png: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(png)) as image:
        return image.size


def test_select_modules_puts_the_diagnosed_then_non_finite_then_largest_first() -> None:
    stats = [ModuleStat(f"m{i}", "float32", float(i), None, 0) for i in range(40)]
    stats[2] = ModuleStat("few_nan", "float32", None, None, 1)
    stats[5] = ModuleStat("many_nan", "float32", None, None, 9)
    chosen = [s.module for s in select_modules(stats, highlight="m0", limit=5)]
    assert chosen == ["m0", "few_nan", "many_nan", "m38", "m39"]  # execution order kept
    assert len(select_modules(stats, None)) == MAX_MODULES


def test_to_png_crops_to_what_was_drawn() -> None:
    with figure(8.0, 4.0) as fig:
        ax = fig.subplots()
        ax.plot([0, 1], [0, 1])
        fig.subplots_adjust(left=0.4, right=0.6, top=0.6, bottom=0.4)  # a small axes in a wide blank canvas
        width, height = _size(to_png(fig))
    assert width < 0.5 * 8.0 * DPI and height < 0.8 * 4.0 * DPI


def test_to_png_keeps_a_label_drawn_outside_the_canvas() -> None:
    with figure(4.0, 3.0) as fig:
        ax = fig.subplots()
        ax.annotate("far right", (1.0, 0.5), xycoords="axes fraction", xytext=(300, 0), textcoords="offset points")
        width, _ = _size(to_png(fig))
    assert width > 4.0 * DPI  # the slower tight save grew the image to include the label


def test_module_chart_names_a_far_dtype_limit_instead_of_stretching_the_axis() -> None:
    stats = [ModuleStat("a", "float32", 10.0, 0.1, 0), ModuleStat("b", "float32", None, None, 4)]
    png = plot_module_magnitudes(stats, highlight="b")
    assert png is not None and _size(png)[1] < 3.5 * DPI
    assert plot_module_magnitudes([ModuleStat("a", "float16", None, None, 0)]) is None  # nothing to draw


def test_log_ticks_are_plain_numbers() -> None:
    assert [log_tick(v) for v in (1e-4, 0.01, 1.0, 1000.0, 1e5, 3e38)] == ["1e-4", "0.01", "1", "1000", "1e5", "3e38"]


def test_lr_cuts_skip_the_recovery_between_them() -> None:
    points = [(0, 1.0), (5, 0.5), (6, 0.505), (7, 0.51), (9, 0.255), (10, 0.2550000001)]
    assert cuts(points) == [(5, 0.5), (9, 0.255)]
