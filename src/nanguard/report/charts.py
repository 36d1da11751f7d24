"""Which charts a run gets, drawn once and shared by the HTML page (inline) and Markdown (files)."""

from __future__ import annotations

from dataclasses import dataclass, field

from nanguard.errors import MissingExtraError
from nanguard.report.load import RunData
from nanguard.report.text import trigger_phrase

MAX_MODULE_CHARTS = 3
"""Per-module charts are drawn for the first few events that have module stats: those tell the story
(later events are usually its consequences), and each chart costs a few hundred milliseconds."""
MODULE_CHART_OMITTED = ("Module chart omitted (only the first {limit} events get one): "
                        "see details.module_stats in events.jsonl.")


@dataclass(frozen=True)
class Chart:
    """One PNG; ``event_index`` (1-based, as in the events table) ties a chart to an event card."""

    name: str
    title: str
    alt: str
    png: bytes
    event_index: int | None = None
    caption: str | None = None


@dataclass(frozen=True)
class ChartSet:
    """The drawn charts; ``note`` says why there are none; ``omitted`` are events whose chart was capped."""

    charts: list[Chart] = field(default_factory=list)
    note: str | None = None
    omitted: frozenset[int] = frozenset()


def build_charts(run: RunData) -> ChartSet:
    """Draw every chart the run has data for; without matplotlib, no charts and a note saying why."""
    try:
        from nanguard.report.plots.curves import plot_training_curves
        from nanguard.report.plots.lr import plot_lr_multiplier
        from nanguard.report.plots.modules import MAX_MODULES, plot_module_magnitudes
        from nanguard.report.plots.style import load_matplotlib

        load_matplotlib()
    except MissingExtraError as exc:
        return ChartSet(note=f"Plots are not included: {exc}.")
    charts = []
    curves = plot_training_curves(run.history, run.events)
    if curves is not None:
        charts.append(Chart("curves", "Loss and gradient norm",
                            "Loss and gradient norm against step, events marked", curves))
    lr = plot_lr_multiplier(run.history, run.events)
    if lr is not None:
        charts.append(Chart("lr_multiplier", "LR multiplier", "Learning-rate multiplier against step", lr))
    with_stats = [(index, event) for index, event in enumerate(run.events, start=1) if event.module_stats]
    for index, event in with_stats[:MAX_MODULE_CHARTS]:
        png = plot_module_magnitudes(event.module_stats, highlight=event.module)
        if png is None:
            continue
        what = trigger_phrase(event.trigger, event.loss, event.grad_norm)
        total = len(event.module_stats)
        caption = (f"{MAX_MODULES} of {total} modules: the diagnosed one, those that saw NaN/Inf, then the largest."
                   if total > MAX_MODULES else None)
        charts.append(Chart(f"event{index}_modules", f"Largest value per module at step {event.step}",
                            f"Per-module activation and gradient magnitudes at step {event.step} ({what})",
                            png, event_index=index, caption=caption))
    omitted = frozenset(index for index, _ in with_stats[MAX_MODULE_CHARTS:])
    return ChartSet(charts, None, omitted)
