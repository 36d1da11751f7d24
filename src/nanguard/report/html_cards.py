"""The events part of the HTML page: a table of problems, one card per problem, a compact table of events.

A problem is a signature (:mod:`nanguard.report.signature`): its card explains its first event in
full and lists the other steps it happened at. The page stays small however long the run: cards stop
at :data:`~nanguard.report.charts.MAX_CARDS` problems and the events table at :data:`MAX_EVENT_ROWS`
rows, each limit said on the page with where the rest is.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from nanguard.report.charts import CARD_LIMIT_NOTE, MAX_CARDS, Chart
from nanguard.report.html_common import (
    action_class,
    badge,
    code_or_dash,
    esc,
    esc_text,
    img,
    module_html,
    where_html,
)
from nanguard.report.load import EventRecord
from nanguard.report.overview import steps_range
from nanguard.report.signature import EventGroup
from nanguard.report.text import cause_phrase, format_number, format_time, plural, trigger_phrase

MAX_EVENT_ROWS = 500
MAX_PROBLEM_ROWS = 300
MAX_LISTED_STEPS = 60


def _confidence(value: float | None) -> str:
    if value is None:
        return "—"
    pct = max(0.0, min(1.0, value)) * 100 if math.isfinite(value) else 0.0
    return f'<span class="meter"><i style="width:{pct:.0f}%"></i></span>{pct:.0f}%'


def _letter(group: EventGroup, link: bool = True) -> str:
    if link:
        return f'<a class="letter" href="#problem-{group.label}">{group.label}</a>'
    return f'<span class="letter">{group.label}</span>'


def _badges(group: EventGroup) -> str:
    return " ".join(badge(action, count) for action, count in group.action_counts().items())


def problems_table(groups: Sequence[EventGroup]) -> str:
    """One row per problem: letter, how often, where in the run, what was done, cause and place."""
    rows = []
    for group in groups[:MAX_PROBLEM_ROWS]:
        first, steps = group.first, group.steps
        span = str(steps[0]) if len(steps) == 1 else f"{min(steps)}–{max(steps)}"
        rows.append(
            f"<tr><td>{_letter(group, group.number <= MAX_CARDS)}</td><td class='num'>{len(group.events)}</td>"
            f"<td class='num'>{span}</td><td>{_badges(group)}</td><td>{esc(first.cause)}</td>"
            f"<td>{esc(first.phase)}</td><td class='where'>{where_html(first) or '—'}</td></tr>"
        )
    head = "".join(f"<th>{name}</th>" for name in ("problem", "events", "steps", "actions", "cause", "phase", "where"))
    more = (f'<p class="more">… and {len(groups) - MAX_PROBLEM_ROWS} more problems: '
            "<code>nanguard events DIR --short</code> lists every event.</p>" if len(groups) > MAX_PROBLEM_ROWS else "")
    return f'<table id="problems-table"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>{more}'


def _facts(event: EventRecord) -> str:
    reproduced = {True: "yes, a replay showed it again", False: "no, a replay was finite", None: "not checked"}
    facts = [
        ("Confidence", _confidence(event.confidence)),
        ("Reproduced", reproduced[event.reproducible]),
        ("Loss", esc(format_number(event.loss))),
        ("Grad norm", esc(format_number(event.grad_norm))),
        ("LR", esc(format_number(event.lr))),
    ]
    if event.lr_multiplier is not None:
        facts.append(("LR multiplier", esc(format_number(event.lr_multiplier))))
    if event.rank:
        facts.append(("Rank", str(event.rank)))
    if event.time:
        facts.append(("Time", esc(format_time(event.time))))
    return '<dl class="where">' + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts) + "</dl>"


def _other_steps(group: EventGroup) -> str:
    rest = group.events[1:]
    if not rest:
        return ""
    shown = ", ".join(f"{event.step}" + ("" if event.action == group.first.action else f" ({esc(event.action)})")
                      for event in rest[:MAX_LISTED_STEPS])
    more = f" and {len(rest) - MAX_LISTED_STEPS} more" if len(rest) > MAX_LISTED_STEPS else ""
    return (f"<h4>Also at {plural(len(rest), 'other step')}</h4>"
            f'<p class="steps">{shown}{more} — the same cause and place; the details above are from step '
            f"{group.first.step}.</p>")


def _lists(event: EventRecord) -> list[str]:
    parts = []
    if event.evidence:
        parts.append(f"<h4>Evidence (step {event.step})</h4><ul class=\"evidence\">"
                     + "".join(f"<li>{esc_text(line)}</li>" for line in event.evidence) + "</ul>")
    if event.contributing:
        items = "".join(f"<li><code>{esc(item.cause)}</code> ({esc(cause_phrase(item.cause))})"
                        + (f": {esc_text(item.evidence[0])}" if item.evidence else "") + "</li>"
                        for item in event.contributing)
        parts.append(f'<h4>What made it worse</h4><ul class="evidence">{items}</ul>')
    if event.fixes:
        parts.append('<h4>Fixes</h4><ol class="fixes">' + "".join(f"<li>{esc_text(fix)}</li>" for fix in event.fixes)
                     + "</ol>")
    return parts


def card(group: EventGroup, charts: Sequence[Chart]) -> str:
    event = group.first
    what = trigger_phrase(event.trigger, event.loss, event.grad_norm)
    count = f" — {plural(len(group.events), 'event')}, {steps_range(group.steps)}" if len(group.events) > 1 else \
        f" — step {event.step}"
    parts = [
        f'<article class="card c{action_class(event.action)[1:]}" id="problem-{group.label}">',
        f'<div class="card-head">{_letter(group, link=False)}<h3>{esc(what)}{esc(count)}</h3>{_badges(group)}</div>',
        f"<p class='cause'><b>Cause:</b> {esc(cause_phrase(event.cause))} <code>{esc(event.cause)}</code>, "
        f"in the <b>{esc(event.phase)}</b> phase</p>",
        f"<p class='where'><b>Where:</b> {where_html(event) or 'not located to a module, op or tensor'}</p>",
        _facts(event),
    ]
    if event.same_as_step is not None:
        parts.append(f'<p class="note">This diagnosis was carried over from step {event.same_as_step} '
                     "(same signature); this step was not replayed.</p>")
    parts += _lists(event)
    parts.append(_other_steps(group))
    for chart in charts:
        caption = f'<p class="count">{esc(chart.caption)}</p>' if chart.caption else ""
        parts.append(f"<h4>{esc(chart.title)}</h4>{img(chart)}{caption}")
    if event.extra_details:
        parts.append(f"<details><summary>Other details (step {event.step})</summary>"
                     f"<pre>{esc(_json(event.extra_details))}</pre></details>")
    parts.append("</article>")
    return "".join(parts)


def _json(value: Any) -> str:
    return json.dumps(value, indent=2, default=str, ensure_ascii=False)


def cards(groups: Sequence[EventGroup], charts: Sequence[Chart]) -> str:
    body = "".join(card(group, [c for c in charts if c.group == group.number]) for group in groups[:MAX_CARDS])
    if len(groups) > MAX_CARDS:
        note = CARD_LIMIT_NOTE.format(shown=MAX_CARDS, total=len(groups), rest=len(groups) - MAX_CARDS)
        body += f'<p class="note">{esc_text(note)}</p>'
    return body


def events_table(events: Sequence[EventRecord], group_of: dict[int, EventGroup]) -> str:
    """Every event, one compact row each, up to :data:`MAX_EVENT_ROWS` (the rest: a line saying where)."""
    rows = []
    for index, event in enumerate(events[:MAX_EVENT_ROWS], start=1):
        group = group_of[index]
        cells = [
            f'<td class="num">{index}</td>',
            f'<td class="num">{event.step}</td>',
            f"<td>{_letter(group, group.number <= MAX_CARDS)}</td>",
            f"<td>{esc(event.trigger)}</td>",
            f"<td>{badge(event.action)}</td>",
            f"<td>{esc(event.cause)}</td>",
            f"<td>{esc(event.phase)}</td>",
            f"<td>{module_html(event.module)}</td>",
            f"<td>{code_or_dash(event.op)}</td>",
            f"<td>{code_or_dash(event.tensor)}</td>",
        ]
        rows.append(f"<tr>{''.join(cells)}</tr>")
    head = "".join(f"<th>{name}</th>" for name in
                   ("#", "step", "problem", "trigger", "action", "cause", "phase", "module", "op", "tensor"))
    more = ""
    if len(events) > MAX_EVENT_ROWS:
        more = (f'<p class="more">The first {MAX_EVENT_ROWS} of {len(events)} events are listed; '
                "<code>nanguard events DIR --short</code> prints every one.</p>")
    return f'<table id="events-table"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>{more}'
