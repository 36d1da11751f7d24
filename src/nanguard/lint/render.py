"""Findings as a table for people and as JSON for tools, and what ``--fix`` changed."""

from __future__ import annotations

import json
import math
import textwrap
from typing import TYPE_CHECKING, Any

from nanguard.lint.findings import RULES, Finding, json_safe

if TYPE_CHECKING:
    from nanguard.lint.api import FixResult

_WIDTH = 100


def problems(findings: list[Finding]) -> list[Finding]:
    """Errors and warnings: what makes ``nanguard lint`` exit 1 (info findings are questions and notes)."""
    return [finding for finding in findings if finding.severity != "info"]


def findings_json(findings: list[Finding]) -> str:
    """``{"findings": [{rule, path, value, message, fix, severity, line}, ...]}``, strict JSON."""
    return json.dumps({"findings": [f.to_dict() for f in findings]}, indent=2, allow_nan=False)


def findings_table(findings: list[Finding], source: str, shape: str) -> str:
    """One block per finding: ``LOCATION  SEVERITY  RULE`` then the path, value, fix and message."""
    if not findings:
        return f"{source}: no findings ({shape} config)"
    lines = [f"{source}: {_count(findings)} ({shape} config)", ""]
    for finding in findings:
        where = f"{source}:{finding.line}" if finding.line is not None else source
        label = "info (a question, not a failure)" if finding.severity == "info" else finding.severity
        lines.append(f"{where}  {label}  {finding.rule}")
        lines.append(f"    {finding.path} = {_show(finding.value) if finding.exists else '(not set)'}")
        if finding.severity != "info" or finding.fixable:
            fix = f"{_show(finding.fix)}" if finding.fixable else "(needs a manual change)"
            lines.append(f"    fix: {fix}")
        lines.extend(textwrap.wrap(finding.message, _WIDTH, initial_indent="    ", subsequent_indent="    "))
        lines.append("")
    fixable = sum(1 for f in findings if f.fixable)
    if problems(findings) or fixable:
        lines.append(f"{fixable} of {len(problems(findings))} problems can be fixed automatically with --fix.")
    else:
        lines.append("No errors or warnings; the questions above do not fail the check.")
    return "\n".join(lines).rstrip()


def changes_text(result: FixResult) -> str:
    """Every value ``--fix`` wrote (old -> new, with the line and rule), then what it could not fix."""
    if result.output_path is None:
        if result.refused:
            return _refused_lines(result, "nothing written: no fix could be applied safely")
        return "nothing to fix automatically" if problems(result.findings) else "nothing to fix"
    count = len(result.changes)
    lines = [f"wrote {result.output_path}: {count} value{'s' if count != 1 else ''} changed"]
    for change in sorted(result.changes, key=lambda c: c.line if c.line is not None else 10**9):
        where = f"line {change.line}" if change.line is not None else "       "
        what = f"{change.old} -> {change.new}" if change.old is not None else f"added {change.new}"
        lines.append(f"  {where:<9} {change.finding.path}: {what}  ({change.finding.rule})")
    if result.refused:
        return "\n".join(lines) + "\n" + _refused_lines(result, "")
    left = len(result.problems_left)
    if left:
        lines.append(f"{left} finding{'s' if left != 1 else ''} left need a manual change")
    return "\n".join(lines)


def _refused_lines(result: FixResult, head: str) -> str:
    lines = [head] if head else []
    for finding in result.refused:
        lines.append(
            f"  not changed: {finding.path} ({finding.rule}): the fix could not be written without "
            f"changing something else; set it to {_show(finding.fix)} by hand"
        )
    return "\n".join(lines)


def rules_table() -> str:
    """Every rule with its default severity and documented thresholds (``--list-rules``)."""
    blocks = []
    for rule in RULES.values():
        blocks.append(f"{rule.id} ({rule.severity}): {rule.summary}")
        blocks.extend(textwrap.wrap(rule.doc, _WIDTH, initial_indent="    ", subsequent_indent="    "))
        blocks.append("")
    return "\n".join(blocks).rstrip()


def _count(findings: list[Finding]) -> str:
    counts: dict[str, int] = {}
    for finding in findings:
        counts[finding.severity] = counts.get(finding.severity, 0) + 1
    names = {"error": "error", "warning": "warning", "info": "note"}
    parts = [f"{n} {names[severity]}{'s' if n != 1 else ''}" for severity, n in counts.items()]
    return ", ".join(parts)


def _show(value: Any) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    safe = json_safe(value)
    if isinstance(safe, (dict, list)):
        return json.dumps(safe, separators=(", ", ": "))
    if isinstance(safe, str):
        return repr(safe)
    return json.dumps(safe)
