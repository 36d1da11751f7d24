"""Findings as a table for people and as JSON for tools."""

from __future__ import annotations

import json
import math
import textwrap
from typing import Any

from nanguard.lint.findings import RULES, Finding, json_safe

_WIDTH = 100


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
        lines.append(f"{where}  {finding.severity}  {finding.rule}")
        lines.append(f"    {finding.path} = {_show(finding.value) if finding.exists else '(not set)'}")
        fix = f"{_show(finding.fix)}" if finding.fixable else "(needs a manual change)"
        lines.append(f"    fix: {fix}")
        lines.extend(textwrap.wrap(finding.message, _WIDTH, initial_indent="    ", subsequent_indent="    "))
        lines.append("")
    fixable = sum(1 for f in findings if f.fixable)
    lines.append(f"{fixable} of {len(findings)} can be fixed automatically with --fix.")
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
    parts = [f"{n} {severity}{'s' if n != 1 else ''}" for severity, n in counts.items()]
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
