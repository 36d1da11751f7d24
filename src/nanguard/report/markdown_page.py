"""The Markdown report: the same content as the HTML page, charts as PNG files next to it.

Strings from the run are made inert: HTML special characters become entities and the Markdown
punctuation that would change the text (emphasis, links, table pipes, a leading ``#`` or list
marker) is backslash-escaped, so a module called ``<script>`` or ``a|b`` renders as its literal name
on GitHub and in any CommonMark viewer. Names are escaped whole (:func:`md_literal`); prose keeps its
`backtick` code spans (:func:`md_esc`), which is how fixes and evidence write names and commands.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from nanguard.report.charts import MAX_MODULE_CHARTS, MODULE_CHART_OMITTED, Chart
from nanguard.report.content import ReportContent
from nanguard.report.load import EventRecord
from nanguard.report.text import (
    LR_BACKOFFS_LABEL,
    ROOT_MODULE,
    action_phrase,
    cause_phrase,
    format_number,
    split_code_spans,
    steps_phrase,
    summary_value,
    trigger_phrase,
)

MARKER = "<!-- nanguard report -->"
MAX_FIXES = 6
_MD_PUNCTUATION = re.compile(r"([\\`*\[\]|~])")
_WORD_EDGE_UNDERSCORE = re.compile(r"(?<![0-9A-Za-z])_|_(?![0-9A-Za-z])")
"""``loss_mask`` cannot start emphasis (CommonMark ignores intraword ``_``); ``_x_`` can."""
_LIST_NUMBER = re.compile(r"\d{1,9}(?=[.)](\s|$))")
_BLOCK_MARKER = re.compile(r"(#{1,6}|[-+])(?=\s|$)")


def _one_line(value: Any) -> str:
    return " ".join(("" if value is None else str(value)).split())


def _inline_literal(text: str) -> str:
    text = _MD_PUNCTUATION.sub(r"\\\1", html.escape(text, quote=False))
    return _WORD_EDGE_UNDERSCORE.sub(r"\\_", text)


def _protect_start(text: str) -> str:
    """A leading "# ", "- ", "+ " or "1. " would start a heading or a list inside a list item."""
    number = _LIST_NUMBER.match(text)
    if number:
        return f"{text[: number.end()]}\\{text[number.end():]}"
    return f"\\{text}" if _BLOCK_MARKER.match(text) else text


def md_literal(value: Any) -> str:
    """Text shown exactly as written, backticks included: for names, values, paths."""
    return _protect_start(_inline_literal(_one_line(value)))


def _code_span(code: str, table: bool) -> str:
    if "<" in code or ">" in code:  # a code span would show entities literally: fall back to HTML
        return f"<code>{_inline_literal(code)}</code>"
    fence = "`" * (max((len(run) for run in re.findall(r"`+", code)), default=0) + 1)
    padded = f" {code} " if code.startswith("`") or code.endswith("`") else code
    return fence + (padded.replace("|", "\\|") if table else padded) + fence


def md_esc(value: Any, *, table: bool = False) -> str:
    """Prose from the run: escaped like :func:`md_literal`, but `code spans` stay code spans.

    ``table`` escapes pipes inside code spans too (GFM splits cells on them even there).
    """
    parts = split_code_spans(_one_line(value))
    return _protect_start("".join(_code_span(part, table) if i % 2 else _inline_literal(part)
                                  for i, part in enumerate(parts)))


def _code(value: str | None) -> str:
    if value is None:
        return "—"
    return ROOT_MODULE if value == "" else f"<code>{md_literal(value)}</code>"


def _image(chart: Chart, image_dir: str) -> str:
    return f"![{md_literal(chart.alt)}]({quote(f'{image_dir}/{chart.name}.png')})"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [_row(header), _row(["---"] * len(header)), *(_row(r) for r in rows)]


def _where(event: EventRecord) -> str:
    return ", ".join(ROOT_MODULE if label == "module" and value == "" else f"{label} {_code(value)}"
                     for label, value in (("module", event.module), ("op", event.op), ("tensor", event.tensor))
                     if value is not None)


def _what(event: EventRecord) -> str:
    return md_esc(trigger_phrase(event.trigger, event.loss, event.grad_norm))


def _overview(content: ReportContent) -> list[str]:
    ov, run = content.overview, content.run
    counts = ov.action_counts
    steps = "—" if ov.first_step is None else f"{ov.first_step}–{ov.last_step}"
    lines = [f"**{md_esc(ov.headline)}**", ""]
    lines += _table(
        ["run ended", "events", "steps", "skipped", "rollbacks", "clipped", LR_BACKOFFS_LABEL, "final loss"],
        [[md_literal(ov.outcome.state), str(len(run.events)), steps,
          *(str(counts.get(a, 0)) for a in ("skip", "rollback", "clip")), str(ov.lr_backoffs),
          md_literal(format_number(ov.outcome.loss))]],
    )
    lines += ["", "## What went wrong", ""]
    if not run.events:
        lines.append("Nothing: no step needed the guard.")
    for index, event in enumerate(run.events, start=1):
        where = _where(event)
        lines.append(f"{index}. **Step {event.step}**: **{_what(event)}** → {md_esc(action_phrase(event.action))}<br>"
                     f"Cause: {md_esc(cause_phrase(event.cause))} ({_code(event.cause)}, {md_esc(event.phase)} "
                     f"phase){' · Where: ' + where if where else ''}")
    if ov.top_fixes:
        lines += ["", "## What to do", ""]
        lines += [f"{i}. {md_esc(fix)} ({steps_phrase(steps)})"
                  for i, (fix, steps) in enumerate(ov.top_fixes[:MAX_FIXES], start=1)]
    return lines


def _event_section(index: int, event: EventRecord, charts: list[Chart], image_dir: str,
                   chart_omitted: bool = False) -> list[str]:
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
        f"- Loss: {md_literal(format_number(event.loss))}; grad norm: {md_literal(format_number(event.grad_norm))}; "
        f"LR: {md_literal(format_number(event.lr))}"
        + (f"; LR multiplier after: {md_literal(format_number(event.lr_multiplier))}"
           if event.lr_multiplier is not None else ""),
    ]
    if event.evidence:
        lines += ["", "**Evidence**", "", *(f"- {md_esc(line)}" for line in event.evidence)]
    if event.fixes:
        lines += ["", "**Fixes**", "", *(f"{i}. {md_esc(fix)}" for i, fix in enumerate(event.fixes, start=1))]
    for chart in charts:
        lines += ["", f"**{md_literal(chart.title)}**", "", _image(chart, image_dir)]
        if chart.caption:
            lines += ["", f"*{md_literal(chart.caption)}*"]
    if chart_omitted:
        lines += ["", f"*{md_literal(MODULE_CHART_OMITTED.format(limit=MAX_MODULE_CHARTS))}*"]
    return lines


def _summary(summary: Mapping[str, Any] | None) -> list[str]:
    if not summary:
        return []
    rows = [[md_literal(key), md_literal(summary_value(value))]
            for key, value in summary.items()]
    return ["", "## Run summary", "", *_table(["key", "value"], rows)]


def render_markdown(content: ReportContent, image_dir: str) -> str:
    """``image_dir`` is the charts folder relative to the Markdown file, e.g. ``report_files``."""
    run = content.run
    lines = [MARKER, f"# nanguard run report: {md_literal(run.run_dir)}", "", *_overview(content)]
    curve_charts = [chart for chart in content.charts if chart.event_index is None]
    if curve_charts or content.plot_note:
        lines += ["", "## Training curves"]
        if content.plot_note:
            lines += ["", f"> {md_esc(content.plot_note)}"]
        for chart in curve_charts:
            lines += ["", f"### {md_literal(chart.title)}", "", _image(chart, image_dir)]
    lines += ["", "## Events", ""]
    if not run.events:
        lines.append("No events were recorded.")
    else:
        lines += _table(
            ["#", "step", "trigger", "action", "cause", "phase", "module", "op", "tensor"],
            [[str(i), str(e.step), md_literal(e.trigger), md_literal(e.action), md_literal(e.cause), md_literal(e.phase),
              _code(e.module), _code(e.op), _code(e.tensor)] for i, e in enumerate(run.events, start=1)],
        )
        for index, event in enumerate(run.events, start=1):
            charts = [chart for chart in content.charts if chart.event_index == index]
            lines += _event_section(index, event, charts, image_dir, index in content.module_charts_omitted)
    lines += _summary(run.summary)
    return "\n".join(lines) + "\n"
