"""The self-contained HTML page: inline CSS, charts as base64 PNG, no script, no external resource.

Every string that came from the run (module names, evidence, fixes, tensor names, summary values)
goes through :func:`esc`; only numbers this module formats itself go in unescaped.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

from nanguard.report.charts import MAX_MODULE_CHARTS, MODULE_CHART_OMITTED, Chart
from nanguard.report.content import ReportContent
from nanguard.report.load import EventRecord
from nanguard.report.text import (
    LR_BACKOFFS_LABEL,
    ROOT_MODULE,
    action_phrase,
    cause_phrase,
    format_number,
    format_time,
    split_code_spans,
    steps_phrase,
    summary_value,
    trigger_phrase,
)

GENERATOR = "nanguard report"
MAX_FIXES = 6

_CSS = """
*{box-sizing:border-box}
body{margin:0;background:#f1f3f5;color:#212529;font:15px/1.5 -apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1180px;margin:0 auto;padding:24px}
code,pre{font:13px/1.45 "SFMono-Regular",Menlo,Consolas,"Liberation Mono",monospace}
code{background:#f1f3f5;border-radius:4px;padding:1px 5px;overflow-wrap:anywhere}
header.verdict{border-radius:10px;padding:20px 24px;color:#fff;margin-bottom:20px}
.state-finite{background:#2b8a3e}.state-non-finite,.state-aborted{background:#c92a2a}.state-unknown{background:#495057}
.state-finite.with-events{background:#e8590c}
.kicker{opacity:.9;font-size:13px;letter-spacing:.02em}
.kicker code{background:rgba(255,255,255,.18);color:#fff}
h1{font-size:23px;line-height:1.3;margin:6px 0 14px}
.tiles{display:flex;flex-wrap:wrap;gap:10px}
.tile{background:rgba(255,255,255,.16);border-radius:8px;padding:6px 12px;min-width:96px}
.tile b{display:block;font-size:19px}.tile span{font-size:12px;opacity:.92}
section{background:#fff;border-radius:10px;padding:18px 22px;margin-bottom:18px;box-shadow:0 1px 2px rgba(0,0,0,.06)}
h2{font-size:18px;margin:0 0 12px}
h3{font-size:16px;margin:0}
h4{font-size:13px;text-transform:uppercase;letter-spacing:.05em;color:#495057;margin:14px 0 4px}
ol.findings{padding-left:22px;margin:0}ol.findings li{margin:8px 0}
ol.findings .sub{color:#495057;font-size:14px}
section.todo{border-left:6px solid #1c7ed6}
section.todo ol{margin:0;padding-left:22px}section.todo li{margin:5px 0}
.count{color:#868e96;font-size:13px}
img.chart{display:block;max-width:100%;height:auto;margin:6px auto}
table{border-collapse:collapse;width:100%;font-size:14px}
th,td{text-align:left;padding:6px 8px;border-bottom:1px solid #dee2e6;vertical-align:top}
th{background:#f8f9fa;font-weight:600}
td.num{text-align:right;white-space:nowrap}
.badge{display:inline-block;border-radius:999px;padding:1px 10px;font-size:12px;font-weight:600;color:#fff;white-space:nowrap}
.a-skip{background:#e8590c}.a-clip{background:#e0a800;color:#212529}.a-rollback{background:#7048e8}
.a-lr_backoff{background:#1c7ed6}.a-abort{background:#c92a2a}.a-none,.a-other{background:#868e96}
article.card{border:1px solid #dee2e6;border-left:6px solid #868e96;border-radius:8px;padding:14px 18px;margin:14px 0}
article.c-skip{border-left-color:#e8590c}article.c-clip{border-left-color:#e0a800}
article.c-rollback{border-left-color:#7048e8}article.c-lr_backoff{border-left-color:#1c7ed6}
article.c-abort{border-left-color:#c92a2a}
.card-head{display:flex;gap:10px;align-items:center;flex-wrap:wrap}
p.cause{font-size:16px;margin:10px 0 6px}
dl.where{display:grid;grid-template-columns:max-content 1fr max-content 1fr;gap:3px 14px;margin:6px 0}
p.where{margin:4px 0 8px}
dl.where dt{color:#495057}dl.where dd{margin:0}
.root{font-style:italic;color:#495057}
.meter{display:inline-block;width:90px;height:8px;background:#e9ecef;border-radius:4px;vertical-align:middle;margin-right:6px}
.meter i{display:block;height:100%;background:#1c7ed6;border-radius:4px}
ol.fixes li{background:#e7f5ff;border-radius:6px;padding:4px 10px;margin:4px 0}
ul.evidence li{margin:2px 0}
.note{background:#fff3bf;border-radius:6px;padding:8px 12px}
details pre,pre.json{background:#f8f9fa;padding:10px;border-radius:6px;overflow:auto;white-space:pre-wrap;overflow-wrap:anywhere}
footer{color:#868e96;font-size:12px;text-align:center;padding:8px}
"""


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def esc_text(value: Any) -> str:
    """Escaped prose in which `backtick spans` (as fixes and evidence write names) become <code>."""
    parts = split_code_spans("" if value is None else str(value))
    return "".join(f"<code>{esc(part)}</code>" if i % 2 else esc(part) for i, part in enumerate(parts))


def _code_or_dash(value: str | None) -> str:
    return f"<code>{esc(value)}</code>" if value is not None else "—"


def _module(value: str | None) -> str:
    """The root module (``''``) in words, a named one as code, an unknown one as a dash."""
    if value == "":
        return f'<span class="root">{ROOT_MODULE}</span>'
    return _code_or_dash(value)


def _action_class(action: str) -> str:
    known = ("skip", "clip", "rollback", "lr_backoff", "abort", "none")
    return f"a-{action}" if action in known else "a-other"


def _badge(action: str) -> str:
    return f'<span class="badge {_action_class(action)}">{esc(action_phrase(action))}</span>'


def _img(chart: Chart) -> str:
    data = base64.b64encode(chart.png).decode("ascii")
    return f'<img class="chart" alt="{esc(chart.alt)}" src="data:image/png;base64,{data}">'


def _tile(value: str, label: str) -> str:
    return f'<div class="tile"><b>{value}</b><span>{label}</span></div>'


def _header(content: ReportContent) -> str:
    ov = content.overview
    state = ov.outcome.state
    classes = f"verdict state-{esc(state)}" + (" with-events" if content.run.events else "")
    counts = ov.action_counts
    steps = "—" if ov.first_step is None else f"{ov.first_step}–{ov.last_step}"
    tiles = [
        _tile(esc(state), "run ended"),
        _tile(str(len(content.run.events)), "events"),
        _tile(steps, "steps"),
        _tile(str(counts.get("skip", 0)), "skipped"),
        _tile(str(counts.get("rollback", 0)), "rollbacks"),
        _tile(str(counts.get("clip", 0)), "clipped"),
        _tile(str(ov.lr_backoffs), LR_BACKOFFS_LABEL),
        _tile(esc(format_number(ov.outcome.loss)), "final loss"),
    ]
    if ov.final_lr_multiplier is not None and ov.lr_multiplier_varies:
        tiles.append(_tile(esc(format_number(ov.final_lr_multiplier)), "final LR multiplier"))
    return (
        f'<header class="{classes}">'
        f'<div class="kicker">nanguard run report · <code>{esc(content.run.run_dir)}</code></div>'
        f"<h1>{esc(ov.headline)}</h1>"
        f'<div class="tiles">{"".join(tiles)}</div></header>'
    )


def _where(event: EventRecord) -> str:
    parts = [_module(event.module) if label == "module" and value == "" else f"{label} <code>{esc(value)}</code>"
             for label, value in (("module", event.module), ("op", event.op), ("tensor", event.tensor))
             if value is not None]
    return ", ".join(parts)


def _findings(content: ReportContent) -> str:
    events = content.run.events
    if not events:
        return "<section><h2>What went wrong</h2><p>Nothing: no step needed the guard.</p></section>"
    items = []
    for index, event in enumerate(events[:12], start=1):
        where = _where(event)
        items.append(
            f'<li><a href="#event-{index}"><b>Step {event.step}</b></a>: '
            f"<b>{esc(trigger_phrase(event.trigger, event.loss, event.grad_norm))}</b> → {_badge(event.action)}"
            f'<div class="sub">Cause: {esc(cause_phrase(event.cause))} (<code>{esc(event.cause)}</code>, '
            f"{esc(event.phase)} phase){' · Where: ' + where if where else ''}</div></li>"
        )
    more = f"<p class='count'>… and {len(events) - 12} more in the table below.</p>" if len(events) > 12 else ""
    return f'<section><h2>What went wrong</h2><ol class="findings">{"".join(items)}</ol>{more}</section>'


def _todo(content: ReportContent) -> str:
    fixes = content.overview.top_fixes
    if not fixes:
        return ""
    items = "".join(f'<li>{esc_text(fix)} <span class="count">({esc(steps_phrase(steps))})</span></li>'
                    for fix, steps in fixes[:MAX_FIXES])
    return f'<section class="todo"><h2>What to do</h2><ol>{items}</ol></section>'


def _charts_section(content: ReportContent) -> str:
    body = []
    if content.plot_note:
        body.append(f'<p class="note">{esc(content.plot_note)}</p>')
    for chart in content.charts:
        if chart.event_index is None:
            body.append(f"<h3>{esc(chart.title)}</h3>{_img(chart)}")
    if not body:
        return ""
    return f'<section><h2>Training curves</h2>{"".join(body)}</section>'


def _events_table(events: Iterable[EventRecord]) -> str:
    rows = []
    for index, event in enumerate(events, start=1):
        cells = [
            f'<td class="num"><a href="#event-{index}">{index}</a></td>',
            f'<td class="num">{event.step}</td>',
            f"<td>{esc(event.trigger)}</td>",
            f"<td>{_badge(event.action)}</td>",
            f"<td>{esc(event.cause)}</td>",
            f"<td>{esc(event.phase)}</td>",
            f"<td>{_module(event.module)}</td>",
            f"<td>{_code_or_dash(event.op)}</td>",
            f"<td>{_code_or_dash(event.tensor)}</td>",
        ]
        rows.append(f"<tr>{''.join(cells)}</tr>")
    head = "".join(f"<th>{name}</th>" for name in
                   ("#", "step", "trigger", "action", "cause", "phase", "module", "op", "tensor"))
    return f'<table id="events-table"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _confidence(value: float | None) -> str:
    if value is None:
        return "—"
    pct = max(0.0, min(1.0, value)) * 100 if math.isfinite(value) else 0.0
    return f'<span class="meter"><i style="width:{pct:.0f}%"></i></span>{pct:.0f}%'


def _card(index: int, event: EventRecord, charts: list[Chart], chart_omitted: bool = False) -> str:
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
    parts = [
        f'<article class="card c{_action_class(event.action)[1:]}" id="event-{index}">',
        f'<div class="card-head">{_badge(event.action)}<h3>#{index} · Step {event.step} — '
        f"{esc(trigger_phrase(event.trigger, event.loss, event.grad_norm))}</h3></div>",
        f"<p class='cause'><b>Cause:</b> {esc(cause_phrase(event.cause))} <code>{esc(event.cause)}</code>, "
        f"in the <b>{esc(event.phase)}</b> phase</p>",
        f"<p class='where'><b>Where:</b> {_where(event) or 'not located to a module, op or tensor'}</p>",
        '<dl class="where">' + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts) + "</dl>",
    ]
    if event.evidence:
        parts.append('<h4>Evidence</h4><ul class="evidence">'
                     + "".join(f"<li>{esc_text(line)}</li>" for line in event.evidence) + "</ul>")
    if event.fixes:
        parts.append('<h4>Fixes</h4><ol class="fixes">'
                     + "".join(f"<li>{esc_text(fix)}</li>" for fix in event.fixes) + "</ol>")
    for chart in charts:
        caption = f'<p class="count">{esc(chart.caption)}</p>' if chart.caption else ""
        parts.append(f"<h4>{esc(chart.title)}</h4>{_img(chart)}{caption}")
    if chart_omitted:
        parts.append(f'<p class="count">{esc(MODULE_CHART_OMITTED.format(limit=MAX_MODULE_CHARTS))}</p>')
    extra = event.extra_details
    if extra:
        parts.append(f"<details><summary>Other details</summary><pre>{esc(_json(extra))}</pre></details>")
    parts.append("</article>")
    return "".join(parts)


def _json(value: Any) -> str:
    return json.dumps(value, indent=2, default=str, ensure_ascii=False)


def _is_flat_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, (str, int, float, bool)) for item in value)


def _summary_section(summary: Mapping[str, Any] | None) -> str:
    if not summary:
        return ""
    rows = []
    for key, value in summary.items():
        shown = (f'<pre class="json">{esc(_json(value))}</pre>' if isinstance(value, (dict, list))
                 and not _is_flat_list(value) else esc(summary_value(value)))
        rows.append(f"<tr><th>{esc(key)}</th><td>{shown}</td></tr>")
    return f'<section><h2>Run summary</h2><table class="summary">{"".join(rows)}</table></section>'


def render_html(content: ReportContent) -> str:
    run = content.run
    events_body = (
        _events_table(run.events)
        + "".join(_card(i, e, [c for c in content.charts if c.event_index == i], i in content.module_charts_omitted)
                  for i, e in enumerate(run.events, 1))
        if run.events else "<p>No events were recorded.</p>"
    )
    sources = ", ".join(name for name, present in (("events.jsonl", run.has_events_file),
                                                   ("history.csv", run.has_history_file),
                                                   ("summary.json", run.summary is not None)) if present)
    from nanguard import __version__

    generated = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f'<meta name="generator" content="{GENERATOR}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>nanguard report: {esc(run.run_dir.name or run.run_dir)}</title><style>{_CSS}</style></head>"
        f"<body><main>{_header(content)}{_findings(content)}{_todo(content)}{_charts_section(content)}"
        f"<section><h2>Events</h2>{events_body}</section>{_summary_section(run.summary)}"
        f"<footer>nanguard {esc(__version__)} · from {esc(sources)} · generated {generated}</footer>"
        "</main></body></html>\n"
    )
