"""Which charts a run gets, drawn once and shared by the HTML page (inline) and Markdown (files)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from nanguard.errors import MissingExtraError
from nanguard.report.load import EventRecord, RunData
from nanguard.report.signature import EventGroup
from nanguard.report.text import plural, trigger_phrase

MAX_CARDS = 24
"""Problems (distinct signatures) explained in a card of their own, each with its module chart; a run
with more lists the rest in the problems table. A chart costs a few hundred milliseconds and ~50 KB."""
CARD_LIMIT_NOTE = ("{shown} of {total} distinct problems have a card and a module chart; the other {rest} are in "
                   "the problems table above, and every event is in events.jsonl (`nanguard events DIR`).")


@dataclass(frozen=True)
class Chart:
    """One PNG; ``group`` (1-based, as the cards are numbered) ties a chart to a problem's card."""

    name: str
    title: str
    alt: str
    png: bytes
    group: int | None = None
    caption: str | None = None


@dataclass(frozen=True)
class ChartSet:
    """The drawn charts; ``note`` says why there are none."""

    charts: list[Chart] = field(default_factory=list)
    note: str | None = None


def _module_event(group: EventGroup) -> EventRecord | None:
    """The event whose module stats the card shows: the one explained in full, else the first that has them."""
    return next((event for event in group.events if event.module_stats), None)


def module_caption(event: EventRecord, shown: int, first_step: int) -> str | None:
    """What the chart cannot say by itself: a cut list, a birth outside every module, an old record."""
    from nanguard.report.plots.modules import MAX_MODULES

    stats = event.module_stats
    notes = []
    if event.step != first_step:
        notes.append(f"Module values are from step {event.step}, the first of this problem's events that recorded them.")
    if len(stats) > shown:
        notes.append(f"{MAX_MODULES} of {len(stats)} modules: where the bad value was born, those that saw NaN/Inf "
                     "in the forward pass, then the rest by NaN/Inf count and size.")
    if any(stat.has_split for stat in stats):
        if any(stat.nonfinite for stat in stats):
            notes.append("fwd N / bwd N: op outputs holding NaN/Inf in the forward / backward pass (intended -inf "
                         "mask fills are not counted).")
        if not any(stat.role == "birth" for stat in stats) and any(stat.nonfinite for stat in stats):
            notes.append("No module is marked: the first bad value was born outside every module "
                         "(in the loss code or the optimizer); the modules only received it.")
    elif any(stat.nonfinite for stat in stats):
        notes.append("This record does not say which modules only received the bad value or split forward "
                     "from backward: modules that saw NaN/Inf are grey, the diagnosed one is marked.")
    return " ".join(notes) or None


def _module_chart(group: EventGroup) -> Chart | None:
    from nanguard.report.plots.modules import MAX_MODULES, plot_module_magnitudes

    event = _module_event(group)
    if event is None:
        return None
    png = plot_module_magnitudes(event.module_stats, highlight=group.first.module)
    if png is None:
        return None
    what = trigger_phrase(event.trigger, event.loss, event.grad_norm)
    return Chart(f"problem{group.label}_modules", f"Per module at step {event.step}",
                 f"Per-module activation and gradient magnitudes and NaN/Inf counts at step {event.step} ({what})",
                 png, group=group.number,
                 caption=module_caption(event, min(MAX_MODULES, len(event.module_stats)), group.first.step))


def build_charts(run: RunData, groups: Sequence[EventGroup]) -> ChartSet:
    """Draw every chart the run has data for; without matplotlib, no charts and a note saying why."""
    try:
        from nanguard.report.plots.curves import plot_training_curves
        from nanguard.report.plots.lr import plot_lr_multiplier
        from nanguard.report.plots.style import load_matplotlib

        load_matplotlib()
    except MissingExtraError as exc:
        return ChartSet(note=f"Plots are not included: {exc}.")
    charts = []
    curves = plot_training_curves(run.history, run.events, groups)
    if curves is not None:
        charts.append(Chart("curves", "Loss and gradient norm",
                            "Loss and gradient norm against step, events marked by problem", curves))
    lr = plot_lr_multiplier(run.history, run.events)
    if lr is not None:
        png, unlabelled = lr
        caption = (f"{plural(unlabelled, 'cut')} too close to a labelled one "
                   f"{'is' if unlabelled == 1 else 'are'} drawn without a label." if unlabelled else None)
        charts.append(Chart("lr_multiplier", "LR multiplier", "Learning-rate multiplier against step", png,
                            caption=caption))
    for group in groups[:MAX_CARDS]:
        chart = _module_chart(group)
        if chart is not None:
            charts.append(chart)
    return ChartSet(charts, None)
