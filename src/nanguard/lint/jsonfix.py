"""JSON configs fixed as minimal text edits at the spans of the changed values.

Everything else, number spelling and inline arrays included, stays byte-identical; a new key is
inserted after its anchor with the file's own indentation and separator.
"""

from __future__ import annotations

import json
import re
from typing import Any

from nanguard.lint.findings import Finding, KeyPath
from nanguard.lint.jsonspans import JsonSpans, ObjectSpan, index_json
from nanguard.lint.textedit import format_number


def fix_json_text(text: str, findings: list[Finding]) -> str:
    """The JSON ``text`` with every planned fix applied as minimal text edits."""
    spans = index_json(text)
    unit = _indent_unit(text, spans)
    edits: list[tuple[int, int, str]] = []
    pending: dict[tuple[KeyPath, str], tuple[ObjectSpan, Any, str | None]] = {}
    for finding in findings:
        if finding.key_path in spans.values:
            start, end = spans.values[finding.key_path]
            edits.append((start, end, _json_value_text(finding.fix, text[start:end], unit, "")))
            continue
        ancestor, obj = _deepest_object(spans, finding.key_path[:-1])
        missing = finding.key_path[len(ancestor) :]
        nested: Any = finding.fix
        for part in reversed(missing[1:]):
            nested = {part: nested}
        slot = (ancestor, str(missing[0]))
        if slot in pending:
            _merge(pending[slot][1], nested)
        else:
            pending[slot] = (obj, nested, finding.insert_after if len(missing) == 1 else None)
    for (_, key), (obj, value, after) in pending.items():
        edits.append(_json_insertion(text, obj, key, value, after, unit))
    # Back to front, so earlier offsets stay valid; at one position the later-planned edit goes first,
    # which leaves the edits in plan order in the text.
    order = sorted(range(len(edits)), key=lambda i: (edits[i][0], edits[i][1], i), reverse=True)
    for index in order:
        start, end, replacement = edits[index]
        text = text[:start] + replacement + text[end:]
    return text


def _merge(target: Any, extra: Any) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target.setdefault(key, value)


def _deepest_object(spans: JsonSpans, path: KeyPath) -> tuple[KeyPath, ObjectSpan]:
    for depth in range(len(path), -1, -1):
        if path[:depth] in spans.objects:
            return path[:depth], spans.objects[path[:depth]]
    raise ValueError("a JSON config without a top-level object cannot be fixed")


def _indent_unit(text: str, spans: JsonSpans) -> str | None:
    """The file's indentation step ('  ', '    ', a tab), or None for a single-line document."""
    root = spans.objects.get(())
    if root is None or not root.members:
        return "  "
    return _line_indent(text, root.members[0].key_start)


def _line_indent(text: str, position: int) -> str | None:
    line_start = text.rfind("\n", 0, position) + 1
    prefix = text[line_start:position]
    if line_start == 0 or prefix.strip():
        return None
    return prefix


def _json_insertion(
    text: str, obj: ObjectSpan, key: str, value: Any, after: str | None, unit: str | None
) -> tuple[int, int, str]:
    names = [member.key for member in obj.members]
    if not obj.members:
        return obj.start + 1, obj.start + 1, f"{json.dumps(key)}: {_json_value_text(value, None, None, '')}"
    anchor = obj.members[names.index(after)] if after in names else obj.members[-1]
    separator = text[anchor.key_end : anchor.value_start]
    indent = _line_indent(text, anchor.key_start)
    member_unit = unit if indent is not None else None
    value_text = _json_value_text(value, None, member_unit, indent or "")
    lead = f",\n{indent}" if indent is not None else ", "
    return anchor.value_end, anchor.value_end, f"{lead}{json.dumps(key)}{separator}{value_text}"


_JSON_NUMBER = re.compile(r'^"?-?\d+(\.\d+)?([eE][-+]?\d+)?"?$')


def _json_value_text(value: Any, old: str | None, unit: str | None, indent: str) -> str:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (int, float)):
        style = None if old is None or not _JSON_NUMBER.match(old) else "e" in old.lower()
        if old is not None and old.startswith('"'):
            return json.dumps(format_number(value, scientific=style))
        if style is False and float(value).is_integer() and "." not in old:  # type: ignore[operator]
            return str(int(value))
        return format_number(value, scientific=style)
    if unit is None:
        return json.dumps(value, separators=(", ", ": "))
    return json.dumps(value, indent=unit).replace("\n", "\n" + indent)
