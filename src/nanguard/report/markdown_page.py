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

from nanguard.report.charts import CARD_LIMIT_NOTE, MAX_CARDS, Chart
from nanguard.report.content import ReportContent
from nanguard.report.counts import COUNT_LABELS, SUMMARY_KEYS, RunCounts
from nanguard.report.html_cards import MAX_EVENT_ROWS, MAX_LISTED_STEPS, MAX_PROBLEM_ROWS
from nanguard.report.load import EventRecord
from nanguard.report.overview import FixItem, group_phrase, more_fixes, steps_range
from nanguard.report.signature import EventGroup, group_of_index
from nanguard.report.text import (
    LR_BACKOFFS_LABEL,
    ROOT_MODULE,
    action_phrase,
    cause_phrase,
    format_number,
    module_name,
    plural,
    split_code_spans,
    summary_value,
    trigger_phrase,
)

MARKER = "<!-- nanguard report -->"
MAX_FIXES = 8
MAX_FINDINGS = 12
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


def _module(value: str | None) -> str:
    """Like :func:`_code`, with the module's readable name (``0`` -> ``model[0]``)."""
    return _code(module_name(value) if value else value)


def _image(chart: Chart, image_dir: str) -> str:
    return f"![{md_literal(chart.alt)}]({quote(f'{image_dir}/{chart.name}.png')})"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [_row(header), _row(["---"] * len(header)), *(_row(r) for r in rows)]


def _where(event: EventRecord) -> str:
    return ", ".join(ROOT_MODULE if label == "module" and value == "" else
                     f"{label} {_module(value) if label == 'module' else _code(value)}"
                     for label, value in (("module", event.module), ("op", event.op), ("tensor", event.tensor))
                     if value is not None)


def _what(event: EventRecord) -> str:
    return md_esc(trigger_phrase(event.trigger, event.loss, event.grad_norm))


def _count_table(content: ReportContent) -> list[str]:
    ov = content.overview
    counts = ov.counts
    last = counts.last_loss
    cells = [("run ended", md_literal(ov.outcome.state)),
             (COUNT_LABELS["steps"], "—" if counts.steps is None else str(counts.steps)),
             (COUNT_LABELS["events"], str(counts.events)), (COUNT_LABELS["signatures"], str(counts.signatures)),
             *((COUNT_LABELS[key], str(counts.value(key))) for key in ("skipped", "rollbacks", "updates_not_applied",
                                                                       "clipped")),
             (LR_BACKOFFS_LABEL, str(ov.lr_backoffs)),
             (f"last training loss{f' (step {last.step})' if last else ''}",
              md_literal(format_number(last.value if last else None)))]
    return _table([name for name, _ in cells], [[value for _, value in cells]])


def _fix_scope(item: FixItem) -> str:
    letters = ", ".join(group.label for group in item.groups)
    scope = f"{'problem' if len(item.groups) == 1 else 'problems'} {letters} · {steps_range(item.steps)}"
    if len(item.steps) > 3:
        scope += f", {plural(item.events, 'event')}"
    if item.numbers_from is not None:
        scope += f"; numbers from step {item.numbers_from}"
    return scope


def _overview(content: ReportContent) -> list[str]:
    ov, run = content.overview, content.run
    lines = [f"**{md_esc(ov.headline)}**", "", *_count_table(content), "", "## What went wrong", ""]
    if not run.events:
        lines.append("Nothing: no step needed the guard.")
    else:
        lines += [f"{plural(len(run.events), 'event')}, {plural(len(ov.groups), 'distinct problem')}.", ""]
    for group in ov.groups[:MAX_FINDINGS]:
        first, where = group.first, _where(group.first)
        lines.append(f"{group.number}. **{group.label}** · **{md_esc(group_phrase(group))}**<br>"
                     f"Cause: {md_esc(cause_phrase(first.cause))} ({_code(first.cause)}, {md_esc(first.phase)} "
                     f"phase){' · Where: ' + where if where else ''}")
    if len(ov.groups) > MAX_FINDINGS:
        lines += ["", f"… and {len(ov.groups) - MAX_FINDINGS} more problems in the problems table below."]
    if ov.fixes:
        lines += ["", "## What to do", ""]
        lines += [f"{i}. {md_esc(item.text)} ({md_esc(_fix_scope(item))})"
                  for i, item in enumerate(ov.fixes[:MAX_FIXES], start=1)]
        if len(ov.fixes) > MAX_FIXES:
            lines += ["", md_esc(more_fixes(len(ov.fixes) - MAX_FIXES))]
    return lines


def _problem_section(group: EventGroup, charts: list[Chart], image_dir: str) -> list[str]:
    event = group.first
    reproduced = {True: "yes", False: "no (a replay was finite)", None: "not checked"}
    confidence = "—" if event.confidence is None else f"{event.confidence:.0%}"
    actions = ", ".join(f"{n} {action_phrase(a)}" for a, n in group.action_counts().items())
    lines = [
        "",
        f"### {group.label} · {_what(event)} — {md_esc(plural(len(group.events), 'event'))}, "
        f"{md_esc(steps_range(group.steps))} ({md_esc(actions)})",
        "",
        f"**Cause:** {md_esc(cause_phrase(event.cause))} ({_code(event.cause)}), in the **{md_esc(event.phase)}** phase",
        "",
        f"- Module: {_module(event.module)}",
        f"- Op: {_code(event.op)}",
        f"- Tensor: {_code(event.tensor)}",
        f"- Confidence: {confidence}; reproduced: {reproduced[event.reproducible]}",
        f"- Loss: {md_literal(format_number(event.loss))}; grad norm: {md_literal(format_number(event.grad_norm))}; "
        f"LR: {md_literal(format_number(event.lr))}"
        + (f"; LR multiplier after: {md_literal(format_number(event.lr_multiplier))}"
           if event.lr_multiplier is not None else ""),
    ]
    if event.same_as_step is not None:
        lines += ["", f"*This diagnosis was carried over from step {event.same_as_step} (same signature); "
                      "this step was not replayed.*"]
    if event.evidence:
        lines += ["", f"**Evidence (step {event.step})**", "", *(f"- {md_esc(line)}" for line in event.evidence)]
    if event.contributing:
        lines += ["", "**What made it worse**", "",
                  *(f"- {_code(item.cause)} ({md_esc(cause_phrase(item.cause))})"
                    + (f": {md_esc(item.evidence[0])}" if item.evidence else "") for item in event.contributing)]
    if event.fixes:
        lines += ["", "**Fixes**", "", *(f"{i}. {md_esc(fix)}" for i, fix in enumerate(event.fixes, start=1))]
    rest = group.events[1:]
    if rest:
        shown = ", ".join(str(e.step) for e in rest[:MAX_LISTED_STEPS])
        more = f" and {len(rest) - MAX_LISTED_STEPS} more" if len(rest) > MAX_LISTED_STEPS else ""
        lines += ["", f"**Also at {plural(len(rest), 'other step')}:** {shown}{more} (same cause and place; "
                      f"the details above are from step {event.step})"]
    for chart in charts:
        lines += ["", f"**{md_literal(chart.title)}**", "", _image(chart, image_dir)]
        if chart.caption:
            lines += ["", f"*{md_literal(chart.caption)}*"]
    return lines


def _problems(content: ReportContent, image_dir: str) -> list[str]:
    groups = content.overview.groups
    rows = []
    for group in groups[:MAX_PROBLEM_ROWS]:
        first, steps = group.first, group.steps
        span = str(steps[0]) if len(steps) == 1 else f"{min(steps)}–{max(steps)}"
        actions = ", ".join(f"{n} {action_phrase(a)}" for a, n in group.action_counts().items())
        rows.append([group.label, str(len(group.events)), span, md_literal(actions), md_literal(first.cause),
                     md_literal(first.phase), _where(first) or "—"])
    lines = ["", "## Problems", "", *_table(["problem", "events", "steps", "actions", "cause", "phase", "where"], rows)]
    if len(groups) > MAX_PROBLEM_ROWS:
        lines += ["", f"… and {len(groups) - MAX_PROBLEM_ROWS} more problems: `nanguard events DIR --short` lists "
                      "every event."]
    for group in groups[:MAX_CARDS]:
        lines += _problem_section(group, [c for c in content.charts if c.group == group.number], image_dir)
    if len(groups) > MAX_CARDS:
        lines += ["", md_esc(CARD_LIMIT_NOTE.format(shown=MAX_CARDS, total=len(groups), rest=len(groups) - MAX_CARDS))]
    return lines


def _every_event(content: ReportContent) -> list[str]:
    events = content.run.events
    group_of = group_of_index(content.overview.groups)
    rows = [[str(i), str(e.step), group_of[i].label, md_literal(e.trigger), md_literal(e.action), md_literal(e.cause),
             md_literal(e.phase), _module(e.module), _code(e.op), _code(e.tensor)]
            for i, e in enumerate(events[:MAX_EVENT_ROWS], start=1)]
    lines = ["", "## Every event", "",
             *_table(["#", "step", "problem", "trigger", "action", "cause", "phase", "module", "op", "tensor"], rows)]
    if len(events) > MAX_EVENT_ROWS:
        lines += ["", f"The first {MAX_EVENT_ROWS} of {len(events)} events are listed; `nanguard events DIR --short` "
                      "prints every one."]
    return lines


def _summary(summary: Mapping[str, Any] | None, counts: RunCounts) -> list[str]:
    if not summary:
        return []
    rows = []
    for key, value in summary.items():
        field = SUMMARY_KEYS.get(key)
        if field is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
            ours = counts.value(field)
            note = "" if ours == value else f" (summary.json says {md_literal(summary_value(value))})"
            rows.append([f"{md_literal(COUNT_LABELS[field])} ({md_literal(key)})", f"{ours}{note}"])
        else:
            rows.append([md_literal(key), md_literal(summary_value(value))])
    return ["", "## Run summary", "", *_table(["key", "value"], rows)]


def render_markdown(content: ReportContent, image_dir: str) -> str:
    """``image_dir`` is the charts folder relative to the Markdown file, e.g. ``report_files``."""
    run = content.run
    lines = [MARKER, f"# nanguard run report: {md_literal(run.run_dir)}", "", *_overview(content)]
    curve_charts = [chart for chart in content.charts if chart.group is None]
    if curve_charts or content.plot_note:
        lines += ["", "## Training curves"]
        if content.plot_note:
            lines += ["", f"> {md_esc(content.plot_note)}"]
        for chart in curve_charts:
            lines += ["", f"### {md_literal(chart.title)}", "", _image(chart, image_dir)]
            if chart.caption:
                lines += ["", f"*{md_literal(chart.caption)}*"]
    if not run.events:
        lines += ["", "## Events", "", "No events were recorded."]
    else:
        lines += _problems(content, image_dir) + _every_event(content)
    lines += _summary(run.summary, content.overview.counts)
    return "\n".join(lines) + "\n"
