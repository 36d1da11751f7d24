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


def drawn_texts(fig) -> list:
    """Every text the renderer draws: tick labels of the ticks in view, annotations, titles, legends."""
    texts = list(fig.texts)
    for legend in fig.legends:
        texts += legend.get_texts()
    for ax in fig.axes:
        texts += [*ax.texts, ax.xaxis.label, ax.yaxis.label, ax.title, ax._left_title, ax._right_title]
        if ax.get_legend() is not None:
            texts += ax.get_legend().get_texts()
        for axis in (ax.xaxis, ax.yaxis):
            texts += [tick.label1 for tick in axis._update_ticks() if tick.label1.get_visible()]
    return [text for text in texts if text.get_visible() and text.get_text().strip()]


def overlapping_labels(fig) -> list[tuple[str, str]]:
    """Pairs of drawn texts whose boxes intersect by more than half a pixel each way."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in drawn_texts(fig)]
    overlaps = []
    for i, (a, box_a) in enumerate(boxes):
        for b, box_b in boxes[i + 1:]:
            common = box_a.intersection(box_a, box_b)
            if common is not None and common.width > 0.5 and common.height > 0.5:
                overlaps.append((a, b))
    return overlaps


def test_thirty_events_draw_lanes_not_thirty_labels_and_no_label_overlaps(repeated_run_dir) -> None:
    """30 similar events drew 30 red lines with overlapping labels on the loss plot."""
    from nanguard.report.load import load_run
    from nanguard.report.plots.curves import draw_training_curves, figure_height
    from nanguard.report.signature import group_events

    run = load_run(repeated_run_dir)
    groups = group_events(run.events)
    with figure(11.5, figure_height(groups)) as fig:
        assert draw_training_curves(fig, run.history, run.events, groups)
        lanes_ax = fig.axes[0]
        assert [t.get_text() for t in lanes_ax.get_yticklabels()] == [
            "C  loss spike ×3", "B  NaN loss ×3", "A  NaN loss ×24"]
        texts = [t.get_text() for t in fig.texts + [t for ax in fig.axes for t in ax.texts]]
        assert not any("step 20" in text for text in texts)  # no per-event label
        assert overlapping_labels(fig) == []


def test_lr_cut_labels_never_overlap(repeated_run_dir) -> None:
    """The LR-multiplier labels →0.25, →0.13, →0.063 overlapped: the close ones are measured and left out."""
    from nanguard.report.load import load_run
    from nanguard.report.plots.lr import draw_lr_multiplier

    run = load_run(repeated_run_dir)
    with figure(11.5, 2.6) as fig:
        hidden = draw_lr_multiplier(fig, run.history, run.events)
        shown = [t.get_text() for t in fig.axes[0].texts if t.get_visible()]
        assert overlapping_labels(fig) == []
    assert hidden is not None and hidden >= 1 and shown[0] == "→ 0.25" and len(shown) + hidden == 3


def test_lr_cut_labels_are_all_shown_when_there_is_room() -> None:
    from nanguard.report.load import HistoryRow
    from nanguard.report.plots.lr import draw_lr_multiplier

    history = [HistoryRow(step=s, lr_multiplier=0.5 if 100 <= s < 300 else (0.25 if s >= 300 else 1.0))
               for s in range(400)]
    with figure(11.5, 2.6) as fig:
        assert draw_lr_multiplier(fig, history, []) == 0
        assert [t.get_text() for t in fig.axes[0].texts] == ["→ 0.5", "→ 0.25"]


def test_module_chart_marks_the_birth_and_greys_what_only_received_it() -> None:
    """Every module was red at a NaN step, upstream ones included; forward and backward were one count."""
    from nanguard.report.plots.modules import (
        _is_grey,
        counts_text,
        draw_module_magnitudes,
        figure_size,
        is_birth,
    )

    stats = [ModuleStat("blocks.0.ln1", "float32", 4.4, 0.1, 2, forward_nonfinite=0, backward_nonfinite=2,
                        role="upstream"),
             ModuleStat("blocks.0.attn", "float32", 35.9, None, 3, forward_nonfinite=1, backward_nonfinite=2,
                        role="birth"),
             ModuleStat("head", "float32", None, None, 5, forward_nonfinite=4, backward_nonfinite=1, role="downstream"),
             ModuleStat("mlp", "float16", 3e4, 1e3, 0, forward_nonfinite=0, backward_nonfinite=0, role="clean"),
             ModuleStat("norm", "bfloat16", 3e4, 1e3, 0, forward_nonfinite=0, backward_nonfinite=0, role="clean")]
    assert [counts_text(s, None) for s in stats] == ["bwd 2", "born here · fwd 1 · bwd 2", "fwd 4 · bwd 1", "", ""]
    assert [is_birth(s, "head") for s in stats] == [False, True, False, False, False]  # the record's role wins
    assert [_is_grey(s, None) for s in stats] == [False, False, True, False, False]
    with figure(*figure_size(stats, "blocks.0.attn")[:2]) as fig:
        draw_module_magnitudes(fig, stats, "blocks.0.attn")
        assert "float16 max 65,504" in [t.get_text() for t in fig.axes[0].texts]
        ticks = fig.axes[0].get_yticklabels()
        labels = {t.get_text(): t.get_color() for t in ticks}
        assert labels["▶ blocks.0.attn  [float32]"] == "#c92a2a"
        assert labels["head  [float32]"] == "#868e96" and labels["blocks.0.ln1  [float32]"] != "#868e96"
        assert overlapping_labels(fig) == []


def test_module_chart_of_an_old_record_marks_only_the_diagnosed_module() -> None:
    from nanguard.report.plots.modules import _is_grey, counts_text

    old = [ModuleStat("a", "float32", 1.0, None, 3), ModuleStat("b", "float32", 2.0, None, 1)]
    assert [counts_text(s, "b") for s in old] == ["NaN/Inf in 3 outputs", "diagnosed · NaN/Inf in 1 output"]
    assert [_is_grey(s, "b") for s in old] == [True, False]


def test_the_overlap_check_sees_two_labels_on_one_spot() -> None:
    from nanguard.report.plots.style import keep_apart

    with figure(4, 3) as fig:
        ax = fig.subplots()
        a = ax.annotate("→ 0.13", (0.5, 0.5))
        b = ax.annotate("→ 0.063", (0.52, 0.5))
        assert overlapping_labels(fig) == [("→ 0.13", "→ 0.063")]
        assert keep_apart([a, b], fig) == 1 and not b.get_visible()
        assert overlapping_labels(fig) == []
