"""Applying fixable findings while keeping the user's file as they wrote it.

Every format is fixed by text edits: a changed value's characters are replaced, a new key is one
inserted line (or member), and every other byte stays as it was, comments and spellings included.
Each fix is applied on its own and the result parsed again; it is kept only when the re-parsed
config equals the original with exactly that one change (so a fix can never corrupt the file or
touch another setting). A fix that fails that check is reported as needing a manual change.
Plain mappings (the Python API) are deep-copied and edited.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from nanguard.errors import NanguardError
from nanguard.lint.findings import Finding, KeyPath
from nanguard.lint.jsonfix import fix_json_text
from nanguard.lint.loading import LoadedConfig, parse_text, plain
from nanguard.lint.pyconfig import PyExpr, python_literal
from nanguard.lint.textedit import Edit, apply_edits, comment_edit, format_number, number_text
from nanguard.lint.yamlspans import yaml_scalar


@dataclass(frozen=True)
class Change:
    """One edit written to the fixed file: where, what it was, what it became, and why."""

    finding: Finding
    old: str | None  # the old value as written; None for an inserted key
    new: str  # the new value as written
    line: int | None  # line in the fixed file


def planned(findings: list[Finding]) -> list[Finding]:
    """The fixable findings, one per key path (the first rule to claim a key wins)."""
    seen: set[KeyPath] = set()
    plan = []
    for finding in findings:
        if finding.fixable and finding.key_path not in seen:
            seen.add(finding.key_path)
            plan.append(finding)
    return plan


def chain_insertions(plan: list[Finding]) -> list[Finding]:
    """Keys inserted after the same key land in plan order: each goes after the one before it."""
    last: dict[tuple[KeyPath, str | None], str] = {}
    chained = []
    for finding in plan:
        if finding.exists:
            chained.append(finding)
            continue
        slot = (finding.key_path[:-1], finding.insert_after)
        if finding.insert_after is not None and slot in last:
            finding = replace(finding, insert_after=last[slot])
        last[slot] = str(finding.key_path[-1])
        chained.append(finding)
    return chained


# --- plain mappings ---------------------------------------------------------------------------------


def fix_mapping(data: Mapping[Any, Any], findings: list[Finding]) -> dict[Any, Any]:
    """A deep copy of ``data`` with every planned fix applied."""
    fixed = copy.deepcopy(dict(data))
    for finding in chain_insertions(planned(findings)):
        container = _container(fixed, finding.key_path[:-1])
        key = finding.key_path[-1]
        if _has(container, key):
            container[key] = _like(finding.fix, container[key])
        else:
            _insert_plain(container, key, finding.fix, finding.insert_after)
    return fixed


def _has(container: Any, key: Any) -> bool:
    if isinstance(container, list):
        return isinstance(key, int) and 0 <= key < len(container)
    return key in container


def _container(root: Any, path: KeyPath) -> Any:
    """The mapping at ``path``, creating missing (or null) mappings on the way."""
    node = root
    for part in path:
        child = node[part] if _has(node, part) else None
        if child is None and isinstance(node, MutableMapping):
            child = {}
            node[part] = child
        node = child
    return node


def _insert_plain(mapping: MutableMapping[Any, Any], key: Any, value: Any, after: str | None) -> None:
    items = list(mapping.items())
    keys = list(mapping)
    position = keys.index(after) + 1 if after is not None and after in keys else len(keys)
    items.insert(position, (key, copy.deepcopy(value)))
    mapping.clear()
    mapping.update(items)


def _string_style(old: str) -> bool | None:
    """A number written as a string ('1e-3') keeps its notation; a non-number ('-inf') gets the default."""
    try:
        number = float(old)
    except ValueError:
        return None
    return "e" in old.lower() if math.isfinite(number) else None


def _like(new: Any, old: Any) -> Any:
    """``new`` in the type of ``old``: a numeric string stays a string, an int stays an int."""
    if isinstance(new, int | float) and not isinstance(new, bool):
        if isinstance(old, str) and not isinstance(old, PyExpr):  # an expression is replaced by a number
            return format_number(new, scientific=_string_style(old))
        if isinstance(old, int) and not isinstance(old, bool) and float(new).is_integer():
            return int(new)
    return new


# --- text formats -----------------------------------------------------------------------------------


def fix_text(loaded: LoadedConfig, plan: list[Finding]) -> tuple[str, list[Change], list[Finding]]:
    """Apply ``plan`` to the text of ``loaded`` one fix at a time; (text, changes, refused findings)."""
    assert loaded.text is not None and loaded.path is not None
    text, current = loaded.text, loaded
    changes: list[Change] = []
    refused: list[Finding] = []
    for finding in chain_insertions(plan):
        try:
            result = _apply_one(current, finding)
        except (NanguardError, ValueError, TypeError, KeyError, IndexError):
            result = None
        if result is None:
            refused.append(finding)
            continue
        text, current, change = result
        changes.append(change)
    return text, changes, refused


def _apply_one(loaded: LoadedConfig, finding: Finding) -> tuple[str, LoadedConfig, Change] | None:
    """The text with one fix, its parse and the change; None when the fix cannot be made safely."""
    assert loaded.text is not None and loaded.path is not None
    text = loaded.text
    if loaded.fmt == "json":
        new_text = fix_json_text(text, [finding])
        old = _json_old_text(loaded, finding)
        new_value = _json_new_text(new_text, finding)
    else:
        edits, old, new_value = _edits(loaded, finding)
        if not edits:
            return None
        new_text = apply_edits(text, edits)
    reparsed = parse_text(new_text, loaded.path, loaded.fmt)
    expected = fix_mapping(plain(loaded.data), [finding])
    if not same(plain(reparsed.data), expected):
        return None
    change = Change(finding, old, new_value, reparsed.line_of(finding.key_path))
    return new_text, reparsed, change


def _edits(loaded: LoadedConfig, finding: Finding) -> tuple[list[Edit], str | None, str]:
    text = loaded.text
    assert text is not None
    span = _value_span(loaded, finding.key_path) if finding.exists else None
    if finding.exists:
        if span is None:
            return [], None, ""
        old = text[span[0] : span[1]]
        current = _current_value(loaded, finding.key_path)
        new = _scalar(loaded.fmt, _like(finding.fix, current), old or None)
        if new is None:
            return [], None, ""
        edits = [Edit(span[0], span[1], new if old else f" {new}")]  # ``key:`` with nothing after it
        note = comment_edit(text, span[1], old or "null")
        return ([*edits, note] if note else edits), (old or "null"), new
    new = _scalar(loaded.fmt, finding.fix, None)
    if new is None:
        return [], None, ""
    insertion = _insertion(loaded, finding, new)
    return ([insertion] if insertion else []), None, new


def _current_value(loaded: LoadedConfig, key_path: KeyPath) -> Any:
    node: Any = loaded.data
    for part in key_path:
        node = node[part]
    return plain(node) if not isinstance(node, Mapping | list) else None


def _value_span(loaded: LoadedConfig, key_path: KeyPath) -> tuple[int, int] | None:
    assert loaded.text is not None
    if loaded.fmt == "yaml":
        return loaded.yaml_text.value_span(key_path)
    if loaded.fmt == "toml" and loaded.toml_spans is not None:
        return loaded.toml_spans.values.get(tuple(str(p) for p in key_path))
    if loaded.fmt == "python" and loaded.py_spans is not None and len(key_path) == 1:
        return loaded.py_spans.values.get(str(key_path[0]))
    return None


def _scalar(fmt: str, value: Any, old: str | None) -> str | None:
    if isinstance(value, Mapping | list):
        return None
    if fmt == "yaml":
        return yaml_scalar(value, old)
    if fmt == "python":
        return python_literal(value, old)
    if fmt == "toml":
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, int | float):
            return number_text(value, old)
        if isinstance(value, str):
            return json.dumps(value) if (old or '"').strip()[:1] != "'" else f"'{value}'"
    return None


def _insertion(loaded: LoadedConfig, finding: Finding, value: str) -> Edit | None:
    assert loaded.text is not None
    container, key = finding.key_path[:-1], str(finding.key_path[-1])
    after = finding.insert_after
    if loaded.fmt == "yaml":
        return loaded.yaml_text.insertion(container, key, value, after)
    if loaded.fmt == "toml" and loaded.toml_spans is not None:
        spans = loaded.toml_spans
        table = tuple(str(p) for p in container)
        anchor = (*table, after) if after is not None else None
        at = spans.line_ends.get(anchor) if anchor is not None else None
        at = at if at is not None else spans.table_ends.get(table)
        if at is None:
            return None
        indent = spans.indents.get(anchor, "") if anchor is not None else ""
        lead = "" if at == 0 or loaded.text[at - 1] == "\n" else "\n"
        return Edit(at, at, f"{lead}{indent}{key} = {value}\n")
    if loaded.fmt == "python" and loaded.py_spans is not None and not container:
        ends = loaded.py_spans.statement_ends
        at = ends.get(after, len(loaded.text)) if after is not None else len(loaded.text)
        lead = "" if at == 0 or loaded.text[at - 1] == "\n" else "\n"
        return Edit(at, at, f"{lead}{key} = {value}\n")
    return None


def _json_old_text(loaded: LoadedConfig, finding: Finding) -> str | None:
    spans = loaded.json_spans
    if spans is None or not finding.exists or finding.key_path not in spans.values:
        return None
    start, end = spans.values[finding.key_path]
    assert loaded.text is not None
    return loaded.text[start:end]


def _json_new_text(new_text: str, finding: Finding) -> str:
    from nanguard.lint.jsonspans import index_json

    spans = index_json(new_text)
    start, end = spans.values.get(finding.key_path, (0, 0))
    return new_text[start:end]


def same(a: Any, b: Any) -> bool:
    """Equal as configs: the same keys in the same order, numbers equal (NaN equals NaN), same types."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
            return True
        return type(a) is type(b) and (a == b or math.isclose(a, b, rel_tol=1e-12))
    if isinstance(a, str) and isinstance(b, str):
        return a == b or _same_number_text(a, b)
    return bool(a == b)


def _same_number_text(a: str, b: str) -> bool:
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-12)
    except ValueError:
        return False


def output_path_problem(target: Path) -> str | None:
    """Why ``target`` cannot take the fixed config, or None."""
    if target.is_dir():
        return f"{target} is a directory; give a file name for --output (e.g. {target / 'train_fixed.yaml'})"
    parent = target.parent
    if not parent.exists():
        return f"the folder {parent} does not exist; create it or choose another --output"
    if not parent.is_dir():
        return f"{parent} is not a folder; choose another --output"
    return None
