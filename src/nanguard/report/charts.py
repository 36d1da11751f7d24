"""Which charts a run gets, drawn once and shared by the HTML page (inline) and Markdown (files)."""

from __future__ import annotations

from dataclasses import dataclass

from nanguard.errors import MissingExtraError
from nanguard.report.load import RunData
from nanguard.report.text import trigger_phrase


@dataclass(frozen=True)
class Chart:
    """One PNG; ``event_index`` (1-based, as in the events table) ties a chart to an event card."""

    name: str
    title: str
    alt: str
    png: bytes
    event_index: int | None = None


def build_charts(run: RunData) -> tuple[list[Chart], str | None]:
    """Draw every chart the run has data for; without matplotlib, no charts and a note saying why."""
    try:
        from nanguard.report.plots.curves import plot_training_curves
        from nanguard.report.plots.lr import plot_lr_multiplier
        from nanguard.report.plots.modules import plot_module_magnitudes
        from nanguard.report.plots.style import load_matplotlib

        load_matplotlib()
    except MissingExtraError as exc:
        return [], f"Plots are not included: {exc}."
    charts = []
    curves = plot_training_curves(run.history, run.events)
    if curves is not None:
        charts.append(Chart("curves", "Loss and gradient norm",
                            "Loss and gradient norm against step, events marked", curves))
    lr = plot_lr_multiplier(run.history, run.events)
    if lr is not None:
        charts.append(Chart("lr_multiplier", "LR multiplier", "Learning-rate multiplier against step", lr))
    for index, event in enumerate(run.events, start=1):
        if not event.module_stats:
            continue
        png = plot_module_magnitudes(event.module_stats, highlight=event.module)
        if png is not None:
            what = trigger_phrase(event.trigger, event.loss, event.grad_norm)
            charts.append(Chart(f"event{index}_modules", f"Module magnitudes at step {event.step}",
                                f"Per-module activation and gradient magnitudes at step {event.step} ({what})",
                                png, event_index=index))
    return charts, None
