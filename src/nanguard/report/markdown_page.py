"""The Markdown report: the same content as the HTML page, charts as PNG files next to it.

Strings from the run are made inert with :func:`md_esc`: HTML special characters become entities
and Markdown punctuation is backslash-escaped, so a module called ``<script>`` or ``a_b|c`` renders
as its literal name on GitHub and in any CommonMark viewer.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from nanguard.report.charts import Chart
from nanguard.report.content import ReportContent
from nanguard.report.load import EventRecord
from nanguard.report.text import action_phrase, cause_phrase, format_number, steps_phrase, trigger_phrase

MARKER = "<!-- nanguard report -->"
MAX_FIXES = 6
_MD_PUNCTUATION = re.compile(r"([\\`*_\[\]|~])")


def md_esc(value: Any) -> str:
    text = " ".join(("" if value is None else str(value)).split())
    return _MD_PUNCTUATION.sub(r"\\\1", html.escape(text, quote=False))


def _code(value: str | None) -> str:
    return "—" if value is None else f"<code>{md_esc(value)}</code>"


def _image(chart: Chart, image_dir: str) -> str:
    return f"![{md_esc(chart.alt)}]({quote(f'{image_dir}/{chart.name}.png')})"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [_row(header), _row(["---"] * len(header)), *(_row(r) for r in rows)]


def _where(event: EventRecord) -> str:
    return ", ".join(f"{label} {_code(value)}" for label, value in
                     (("module", event.module), ("op", event.op), ("tensor", event.tensor)) if value is not None)


def _what(event: EventRecord) -> str:
    return md_esc(trigger_phrase(event.trigger, event.loss, event.grad_norm))


def _overview(content: ReportContent) -> list[str]:
    ov, run = content.overview, content.run
    counts = ov.action_counts
    steps = "—" if ov.first_step is None else f"{ov.first_step}–{ov.last_step}"
    lines = [f"**{md_esc(ov.headline)}**", ""]
    lines += _table(
        ["run ended", "events", "steps", "skipped", "rollbacks", "clipped", "LR backoffs", "final loss"],
        [[md_esc(ov.outcome.state), str(len(run.events)), steps, *(str(counts.get(a, 0)) for a in
          ("skip", "rollback", "clip", "lr_backoff")), md_esc(format_number(ov.outcome.loss))]],
    )
    lines += ["", "## What went wrong", ""]
    if not run.events:
        lines.append("Nothing: no step needed the guard.")
    for index, event in enumerate(run.events, start=1):
        where = _where(event)
        lines.append(f"{index}. **Step {event.step}**: {_what(event)} → {md_esc(action_phrase(event.action))} — "
                     f"cause **{md_esc(cause_phrase(event.cause))}** ({_code(event.cause)}, {md_esc(event.phase)} "
                     f"phase){'; ' + where if where else ''}")
    if ov.top_fixes:
        lines += ["", "## What to do", ""]
        lines += [f"{i}. {md_esc(fix)} ({steps_phrase(steps)})"
                  for i, (fix, steps) in enumerate(ov.top_fixes[:MAX_FIXES], start=1)]
    return lines


def _event_section(index: int, event: EventRecord, charts: list[Chart], image_dir: str) -> list[str]:
    reproduced = {True: "yes", False: "no (a replay was finite)", None: "not checked"}
    confidence = "—" if event.confidence is None else f"{event.confidence:.0%}"
    lines = [
        "",
        f"### #{index} · Step {event.step} — {_what(event)} ({md_esc(action_phrase(event.action))})",
        "",
        f"**Cause:** {md_esc(cause_phrase(event.cause))} ({_code(event.cause)}), in the **{md_esc(event.phase)}** phase",
        "",
        f"- Module: {_code(event.module)}",
        f"- Op: {_code(event.op)}",
        f"- Tensor: {_code(event.tensor)}",
        f"- Confidence: {confidence}; reproduced: {reproduced[event.reproducible]}",
        f"- Loss: {md_esc(format_number(event.loss))}; grad norm: {md_esc(format_number(event.grad_norm))}; "
        f"LR: {md_esc(format_number(event.lr))}",
    ]
    if event.evidence:
        lines += ["", "**Evidence**", "", *(f"- {md_esc(line)}" for line in event.evidence)]
    if event.fixes:
        lines += ["", "**Fixes**", "", *(f"{i}. {md_esc(fix)}" for i, fix in enumerate(event.fixes, start=1))]
    for chart in charts:
        lines += ["", _image(chart, image_dir)]
    return lines


def _summary(summary: Mapping[str, Any] | None) -> list[str]:
    if not summary:
        return []
    rows = [[md_esc(key), md_esc(json.dumps(value, default=str) if isinstance(value, (dict, list))
                                 else format_number(value) if isinstance(value, float) else value)]
            for key, value in summary.items()]
    return ["", "## Run summary", "", *_table(["key", "value"], rows)]


def render_markdown(content: ReportContent, image_dir: str) -> str:
    """``image_dir`` is the charts folder relative to the Markdown file, e.g. ``report_files``."""
    run = content.run
    lines = [MARKER, f"# nanguard run report: {md_esc(run.run_dir)}", "", *_overview(content)]
    curve_charts = [chart for chart in content.charts if chart.event_index is None]
    if curve_charts or content.plot_note:
        lines += ["", "## Training curves"]
        if content.plot_note:
            lines += ["", f"> {md_esc(content.plot_note)}"]
        for chart in curve_charts:
            lines += ["", f"### {md_esc(chart.title)}", "", _image(chart, image_dir)]
    lines += ["", "## Events", ""]
    if not run.events:
        lines.append("No events were recorded.")
    else:
        lines += _table(
            ["#", "step", "trigger", "action", "cause", "phase", "module", "op", "tensor"],
            [[str(i), str(e.step), md_esc(e.trigger), md_esc(e.action), md_esc(e.cause), md_esc(e.phase),
              _code(e.module), _code(e.op), _code(e.tensor)] for i, e in enumerate(run.events, start=1)],
        )
        for index, event in enumerate(run.events, start=1):
            charts = [chart for chart in content.charts if chart.event_index == index]
            lines += _event_section(index, event, charts, image_dir)
    lines += _summary(run.summary)
    return "\n".join(lines) + "\n"
