"""The self-contained HTML page: inline CSS, charts as base64 PNG, no script, no external resource.

Top to bottom: the verdict and its counts, what went wrong (one line per problem), what to do (each
fix once), the curves, the problems with their cards, every event in a compact table, the run
summary. Every count on the page comes from :class:`~nanguard.report.counts.RunCounts`; each carries
``data-count`` so a test (and a person) can check the header against the summary.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Mapping
from typing import Any

from nanguard.report.content import ReportContent
from nanguard.report.counts import COUNT_LABELS, SUMMARY_KEYS, RunCounts
from nanguard.report.html_cards import MAX_CARDS, cards, events_table, problems_table
from nanguard.report.html_common import CSS, esc, esc_text, img, where_html
from nanguard.report.overview import FixItem, group_phrase, more_fixes, steps_range
from nanguard.report.signature import group_of_index
from nanguard.report.text import LR_BACKOFFS_LABEL, cause_phrase, format_number, plural, summary_value

GENERATOR = "nanguard report"
MAX_FIXES = 8
MAX_FINDINGS = 12
OPEN_EVENTS = 20
"""Up to this many events the table of every event is open; a longer one is folded under the problems."""


def _tile(value: str, label: str, key: str | None = None) -> str:
    data = f' data-count="{key}"' if key else ""
    return f'<div class="tile"{data}><b>{value}</b><span>{label}</span></div>'


def _count_tiles(counts: RunCounts) -> list[str]:
    tiles = [_tile(str(counts.events), "events", "events")]
    if counts.events:
        tiles.append(_tile(str(counts.signatures), COUNT_LABELS["signatures"], "signatures"))
    for key in ("skipped", "rollbacks", "updates_not_applied", "clipped"):
        tiles.append(_tile(str(counts.value(key)), COUNT_LABELS[key], key))
    if counts.lr_backoffs:
        tiles.append(_tile(str(counts.lr_backoffs), COUNT_LABELS["lr_backoffs"], "lr_backoffs"))
    return tiles


def _header(content: ReportContent) -> str:
    ov = content.overview
    state = ov.outcome.state
    classes = f"verdict state-{esc(state)}" + (" with-events" if content.run.events else "")
    steps = "—" if ov.counts.steps is None else str(ov.counts.steps)
    tiles = [_tile(esc(state), "run ended"), _tile(steps, COUNT_LABELS["steps"], "steps"), *_count_tiles(ov.counts),
             _tile(str(ov.lr_backoffs), LR_BACKOFFS_LABEL)]
    last = ov.counts.last_loss
    tiles.append(_tile(esc(format_number(last.value if last else None)),
                       f"last training loss{f' (step {last.step})' if last else ''}"))
    if ov.final_lr_multiplier is not None and ov.lr_multiplier_varies:
        tiles.append(_tile(esc(format_number(ov.final_lr_multiplier)), "final LR multiplier"))
    return (
        f'<header class="{classes}">'
        f'<div class="kicker">nanguard run report · <code>{esc(content.run.run_dir)}</code></div>'
        f"<h1>{esc(ov.headline)}</h1>"
        f'<div class="tiles">{"".join(tiles)}</div></header>'
    )


def _findings(content: ReportContent) -> str:
    groups = content.overview.groups
    if not groups:
        return "<section><h2>What went wrong</h2><p>Nothing: no step needed the guard.</p></section>"
    items = []
    for group in groups[:MAX_FINDINGS]:
        first = group.first
        where = where_html(first)
        link = (f'<a class="letter" href="#problem-{group.label}">{group.label}</a>' if group.number <= MAX_CARDS
                else f'<span class="letter">{group.label}</span>')
        items.append(
            f"<li>{link} <b>{esc(group_phrase(group))}</b>"
            f'<div class="sub">Cause: {esc(cause_phrase(first.cause))} (<code>{esc(first.cause)}</code>, '
            f"{esc(first.phase)} phase){' · Where: ' + where if where else ''}</div></li>"
        )
    more = (f"<p class='count'>… and {len(groups) - MAX_FINDINGS} more problems in the problems table below.</p>"
            if len(groups) > MAX_FINDINGS else "")
    intro = f"<p class='count'>{plural(len(content.run.events), 'event')}, {plural(len(groups), 'distinct problem')}.</p>"
    return f'<section><h2>What went wrong</h2>{intro}<ol class="findings">{"".join(items)}</ol>{more}</section>'


def _fix_scope(item: FixItem) -> str:
    letters = ", ".join(group.label for group in item.groups)
    scope = f"{'problem' if len(item.groups) == 1 else 'problems'} {letters} · {steps_range(item.steps)}"
    if len(item.steps) > 3:
        scope += f", {plural(item.events, 'event')}"
    if item.numbers_from is not None:
        scope += f"; numbers from step {item.numbers_from}"
    return scope


def _todo(content: ReportContent) -> str:
    fixes = content.overview.fixes
    if not fixes:
        return ""
    items = "".join(f'<li>{esc_text(item.text)} <span class="count">({esc(_fix_scope(item))})</span></li>'
                    for item in fixes[:MAX_FIXES])
    more = f"<p class='count'>{esc(more_fixes(len(fixes) - MAX_FIXES))}</p>" if len(fixes) > MAX_FIXES else ""
    return f'<section class="todo"><h2>What to do</h2><ol>{items}</ol>{more}</section>'


def _charts_section(content: ReportContent) -> str:
    body = []
    if content.plot_note:
        body.append(f'<p class="note">{esc(content.plot_note)}</p>')
    for chart in content.charts:
        if chart.group is None:
            caption = f'<p class="count">{esc(chart.caption)}</p>' if chart.caption else ""
            body.append(f"<h3>{esc(chart.title)}</h3>{img(chart)}{caption}")
    if not body:
        return ""
    return f'<section><h2>Training curves</h2>{"".join(body)}</section>'


def _events_section(content: ReportContent) -> str:
    run, groups = content.run, content.overview.groups
    if not run.events:
        return "<section><h2>Events</h2><p>No events were recorded.</p></section>"
    return (f'<section id="problems"><h2>Problems</h2>{problems_table(groups)}{cards(groups, content.charts)}</section>'
            f'<section><h2>Every event</h2><details class="events"{" open" if len(run.events) <= OPEN_EVENTS else ""}>'
            f"<summary>{plural(len(run.events), 'event')}, one row each</summary>"
            f"{events_table(run.events, group_of_index(groups))}</details></section>")


def _json(value: Any) -> str:
    return json.dumps(value, indent=2, default=str, ensure_ascii=False)


def _is_flat_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, (str, int, float, bool)) for item in value)


def _summary_row(key: str, value: Any, counts: RunCounts) -> str:
    """A count is shown as the report counts it, under a name that says what it counts (see counts.py)."""
    field = SUMMARY_KEYS.get(key)
    if field is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
        ours = counts.value(field)
        differs = "" if ours == value else f" <span class='count'>(summary.json says {esc(summary_value(value))})</span>"
        return (f"<tr><th>{esc(COUNT_LABELS[field])} <span class='count'>({esc(key)})</span></th>"
                f'<td data-count="{field}">{ours}{differs}</td></tr>')
    shown = (f'<pre class="json">{esc(_json(value))}</pre>' if isinstance(value, (dict, list))
             and not _is_flat_list(value) else esc(summary_value(value)))
    return f"<tr><th>{esc(key)}</th><td>{shown}</td></tr>"


def _summary_section(summary: Mapping[str, Any] | None, counts: RunCounts) -> str:
    if not summary:
        return ""
    rows = "".join(_summary_row(key, value, counts) for key, value in summary.items())
    return f'<section><h2>Run summary</h2><table class="summary">{rows}</table></section>'


def render_html(content: ReportContent) -> str:
    run = content.run
    sources = ", ".join(name for name, present in (("events.jsonl", run.has_events_file),
                                                   ("history.csv", run.has_history_file),
                                                   ("summary.json", run.summary is not None)) if present)
    from nanguard import __version__

    generated = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f'<meta name="generator" content="{GENERATOR}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>nanguard report: {esc(run.run_dir.name or run.run_dir)}</title><style>{CSS}</style></head>"
        f"<body><main>{_header(content)}{_findings(content)}{_todo(content)}{_charts_section(content)}"
        f"{_events_section(content)}{_summary_section(run.summary, content.overview.counts)}"
        f"<footer>nanguard {esc(__version__)} · from {esc(sources)} · generated {generated}</footer>"
        "</main></body></html>\n"
    )

