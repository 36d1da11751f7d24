"""Applying fixable findings while keeping the user's file as they wrote it.

YAML goes through ruamel.yaml's round-trip document, so comments, key order, quoting and flow style
survive; a comment block that followed the key a new key is inserted after stays below the new key.
JSON is edited as text at the spans of the changed values, so everything else, number spelling and
inline arrays included, is byte-identical. Plain mappings (the Python API) are deep-copied and edited.
"""

from __future__ import annotations

import copy
import io
import json
import math
import re
from collections.abc import Mapping, MutableMapping
from dataclasses import replace
from typing import Any

from nanguard.lint.findings import Finding, KeyPath
from nanguard.lint.jsonspans import JsonSpans, ObjectSpan, index_json


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


# --- numbers ----------------------------------------------------------------------------------------


def format_number(value: float | int, *, scientific: bool | None, yaml_1_1_safe: bool = False) -> str:
    """Spell ``value`` for a config file: in the style of the value it replaces when known.

    ``yaml_1_1_safe`` writes exponents as ``1.0e-6``, the one spelling PyYAML (YAML 1.1, which many
    training scripts read configs with) and YAML 1.2 readers both take as a float.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"not a number: {value!r}")
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        raise ValueError(f"refusing to write a non-finite number: {value!r}")
    if scientific is None:
        scientific = value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e4)
    if not scientific:
        return repr(float(value))
    mantissa, exponent = f"{value:.6e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    power = int(exponent)
    if yaml_1_1_safe:
        if "." not in mantissa:
            mantissa += ".0"
        return f"{mantissa}e{'-' if power < 0 else '+'}{abs(power)}"
    return f"{mantissa}e{power}"


# --- plain mappings ---------------------------------------------------------------------------------


def fix_mapping(data: Mapping[Any, Any], findings: list[Finding]) -> dict[Any, Any]:
    """A deep copy of ``data`` with every planned fix applied."""
    fixed = copy.deepcopy(dict(data))
    for finding in chain_insertions(planned(findings)):
        container = _container(fixed, finding.key_path[:-1], dict)
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


def _container(root: Any, path: KeyPath, new_mapping: type) -> Any:
    """The mapping at ``path``, creating missing (or null) mappings on the way."""
    node = root
    for part in path:
        child = node[part] if _has(node, part) else None
        if child is None and isinstance(node, MutableMapping):
            child = new_mapping()
            node[part] = child
        node = child
    return node


def _insert_plain(mapping: MutableMapping[Any, Any], key: Any, value: Any, after: str | None) -> None:
    items = list(mapping.items())
    position = _position(list(mapping), after)
    items.insert(position, (key, copy.deepcopy(value)))
    mapping.clear()
    mapping.update(items)


def _position(keys: list[Any], after: str | None) -> int:
    if after is not None and after in keys:
        return keys.index(after) + 1
    return len(keys)


def _string_style(old: str) -> bool | None:
    """A number written as a string ('1e-3') keeps its notation; a non-number ('-inf') gets the default."""
    try:
        number = float(old)
    except ValueError:
        return None
    return "e" in old.lower() if math.isfinite(number) else None


def _like(new: Any, old: Any) -> Any:
    """``new`` in the type of ``old``: a numeric string stays a string, an int stays an int."""
    if isinstance(new, (int, float)) and not isinstance(new, bool):
        if isinstance(old, str):
            return format_number(new, scientific=_string_style(old))
        if isinstance(old, int) and not isinstance(old, bool) and float(new).is_integer():
            return int(new)
    return new


# --- YAML -------------------------------------------------------------------------------------------


def fix_yaml_text(text: str, findings: list[Finding]) -> str:
    """The YAML ``text`` with every planned fix applied, comments and layout kept."""
    from ruamel.yaml.util import load_yaml_guess_indent

    from nanguard.lint.loading import yaml_round_trip

    yaml = yaml_round_trip()
    _, mapping_indent, dash_offset = load_yaml_guess_indent(text)
    yaml.indent(mapping=mapping_indent, sequence=mapping_indent, offset=dash_offset)
    yaml.explicit_start = _has_document_start(text)
    document = yaml.load(text)
    for finding in chain_insertions(planned(findings)):
        _apply_yaml(yaml, document, finding)
    out = io.StringIO()
    yaml.dump(document, out)
    return out.getvalue()


def _has_document_start(text: str) -> bool:
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            return stripped == "---" or stripped.startswith("--- ") or stripped.startswith("%")
    return False


def _apply_yaml(yaml: Any, document: Any, finding: Finding) -> None:
    from ruamel.yaml.comments import CommentedMap

    container = _container(document, finding.key_path[:-1], CommentedMap)
    key = finding.key_path[-1]
    if _has(container, key):
        container[key] = _yaml_value(yaml, finding.fix, container[key])
        return
    value = _yaml_value(yaml, finding.fix, None)
    position = _position(list(container), finding.insert_after)
    container.insert(position, key, value)
    if position > 0:
        _move_trailing_comment(container, list(container)[position - 1], key)


def _yaml_value(yaml: Any, new: Any, old: Any) -> Any:
    from ruamel.yaml.comments import CommentedMap
    from ruamel.yaml.scalarstring import ScalarString

    if isinstance(new, Mapping):
        return CommentedMap((k, _yaml_value(yaml, v, None)) for k, v in new.items())
    if isinstance(new, bool) or not isinstance(new, (int, float)):
        if isinstance(new, str) and isinstance(old, ScalarString):
            return type(old)(new)
        return new
    if isinstance(old, str):
        text = format_number(new, scientific=_string_style(old))
        return type(old)(text) if isinstance(old, ScalarString) else text
    if isinstance(old, int) and not isinstance(old, bool) and float(new).is_integer():
        return int(new)
    # Parsing the spelling gives a ruamel scalar that dumps exactly as spelled.
    return yaml.load(format_number(new, scientific=None, yaml_1_1_safe=True))


def _move_trailing_comment(mapping: Any, previous: Any, new_key: Any) -> None:
    """Keep the comment lines that followed ``previous`` (a next section's heading) below ``new_key``.

    ruamel attaches the lines after a key to that key; inserting right after it would otherwise put
    the new key under the heading of the section that follows. The end-of-line comment stays put.
    """
    entry = mapping.ca.items.get(previous)
    if not entry or len(entry) < 3 or entry[2] is None:
        return
    token = entry[2]
    head, newline, rest = token.value.partition("\n")
    if not newline or not rest:
        return
    moved = copy.copy(token)
    token.value = head + "\n"
    moved.value = "\n" + rest
    mapping.ca.items[new_key] = [None, None, moved, None]


# --- JSON -------------------------------------------------------------------------------------------


def fix_json_text(text: str, findings: list[Finding]) -> str:
    """The JSON ``text`` with every planned fix applied as minimal text edits."""
    spans = index_json(text)
    unit = _indent_unit(text, spans)
    edits: list[tuple[int, int, str]] = []
    pending: dict[tuple[KeyPath, str], tuple[ObjectSpan, Any, str | None]] = {}
    for finding in planned(findings):
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
