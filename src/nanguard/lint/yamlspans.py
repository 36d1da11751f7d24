"""Where a value of a YAML document sits in its text, and where a new key can go.

ruamel.yaml's round-trip loader records the line and column of every key and value; the end of a
scalar, the end of a key's block and the style of its mapping (block or ``{flow}``) are read here
from the text. Fixes then replace only a value's characters or insert one line, so comments,
indentation, quoting and spellings such as ``False`` survive untouched, which a dump of the whole
document cannot promise (it re-indents, lower-cases booleans and flattens commented flow mappings).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from nanguard.lint.textedit import Edit, number_text

_PLAIN_SAFE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-/]*$")
_PLAIN_WORD = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-/]*$")
_YAML_WORDS = {"true", "false", "yes", "no", "on", "off", "null", "y", "n", "~"}
_PROPERTY = re.compile(r"^(?:[&!][^\s]*\s+)+")


class YamlText:
    """One YAML text and its parsed round-trip document, with offsets for lines and columns."""

    def __init__(self, text: str, document: Any) -> None:
        self.text = text
        self.document = document
        self.starts = [0]
        for index, char in enumerate(text):
            if char == "\n":
                self.starts.append(index + 1)

    def offset(self, line: int, column: int) -> int:
        """Character offset of a 0-based (line, column)."""
        return self.starts[line] + column if line < len(self.starts) else len(self.text)

    def node(self, key_path: tuple[Any, ...]) -> Any:
        node = self.document
        for part in key_path:
            node = node[part]
        return node

    # ----------------------------------------------------------------- values
    def value_span(self, key_path: tuple[Any, ...]) -> tuple[int, int] | None:
        """The characters of a scalar value written on one line; None for aliases, blocks, collections."""
        try:
            container = self.node(key_path[:-1])
        except (KeyError, IndexError, TypeError):
            return None
        key = key_path[-1]
        if container[key] is None and isinstance(container, Mapping):
            empty = self._empty_value(container, key)
            if empty is not None:
                return empty, empty
        position = _value_position(container, key)
        if position is None or isinstance(container[key], Mapping | list):
            return None
        start = self.offset(*position)
        line_end = self.text.find("\n", start)
        line_end = len(self.text) if line_end < 0 else line_end
        rest = self.text[start:line_end]
        prop = _PROPERTY.match(rest)
        if prop:
            start += prop.end()
            rest = rest[prop.end() :]
        length = _scalar_length(rest, flow=_is_flow(container))
        return None if length is None else (start, start + length)

    def _empty_value(self, container: Any, key: Any) -> int | None:
        """The offset just past ``key:`` when nothing follows it (``max_norm:``, a null written as nothing)."""
        try:
            line, column = container.lc.key(key)
        except (KeyError, TypeError, AttributeError):
            return None
        text = self._line(line)
        match = re.compile(r'(?:"(?:[^"\\]|\\.)*"|\'[^\']*\'|[^:#]+?)\s*:(?=\s|$)').match(text, column)
        if match is None:
            return None
        rest = text[match.end() :].strip()
        return self.offset(line, match.end()) if not rest or rest.startswith("#") else None

    # ----------------------------------------------------------------- insertion
    def insertion(self, container_path: tuple[Any, ...], key: str, value_text: str, after: str | None) -> Edit | None:
        """An edit adding ``key: value`` to the mapping at ``container_path``, after ``after`` when given."""
        try:
            container = self.node(container_path)
        except (KeyError, IndexError, TypeError):
            return None
        if not isinstance(container, Mapping) or not container or not hasattr(container, "lc"):
            return None
        keys = list(container)
        anchor = after if after in keys else keys[-1]
        if _is_flow(container):
            return self._flow_insertion(container, keys, anchor, key, value_text)
        return self._block_insertion(container, keys, anchor, key, value_text)

    def _key_text(self, container: Any, existing: Any, key: str) -> str:
        line, column = container.lc.key(existing)
        quote = self.text[self.offset(line, column)]
        if quote in "\"'":
            return f"{quote}{key}{quote}"
        return key if _PLAIN_SAFE.match(key) else json.dumps(key)

    def _block_insertion(self, container: Any, keys: list[Any], anchor: Any, key: str, value: str) -> Edit:
        line, column = container.lc.key(anchor)
        index = keys.index(anchor)
        limit = container.lc.key(keys[index + 1])[0] if index + 1 < len(keys) else len(self.starts)
        last = line
        for number in range(line + 1, limit):
            content = self._line(number)
            stripped = content.strip()
            if not stripped or stripped.startswith("#"):
                continue
            if len(content) - len(content.lstrip(" ")) <= column and not stripped.startswith("- "):
                break
            last = number
        at = self.starts[last + 1] if last + 1 < len(self.starts) else len(self.text)
        newline = "\r\n" if self._line(line).endswith("\r") else "\n"
        prefix = newline if at == len(self.text) and not self.text.endswith("\n") else ""
        text = f"{prefix}{' ' * column}{self._key_text(container, anchor, key)}: {value}{newline}"
        return Edit(at, at, text)

    def _flow_insertion(self, container: Any, keys: list[Any], anchor: Any, key: str, value: str) -> Edit:
        index = keys.index(anchor)
        before = keys[index + 1] if index + 1 < len(keys) else anchor
        line, column = container.lc.key(before)
        at = self.offset(line, column)
        head = self.text[self.starts[line] : at]
        member = f"{self._key_text(container, before, key)}: {value},"
        if head.strip() == "":
            return Edit(at, at, f"{member}\n{head}")
        return Edit(at, at, f"{member} ")

    def _line(self, number: int) -> str:
        start = self.starts[number]
        end = self.starts[number + 1] - 1 if number + 1 < len(self.starts) else len(self.text)
        return self.text[start:end]


def _value_position(container: Any, key: Any) -> tuple[int, int] | None:
    lc = getattr(container, "lc", None)
    if lc is None:
        return None
    try:
        if isinstance(container, list):
            line, column = lc.item(key)
            return int(line), int(column)
        position = lc.value(key)
    except (KeyError, IndexError, TypeError, AttributeError):
        return None
    return int(position[0]), int(position[1])


def _is_flow(container: Any) -> bool:
    fa = getattr(container, "fa", None)
    return bool(fa is not None and fa.flow_style())


def _scalar_length(rest: str, *, flow: bool) -> int | None:
    """Length of the scalar at the start of ``rest`` (one line), or None when it is not one we edit."""
    if not rest or rest[0] in "*|>[{":
        return None
    if rest[0] == '"':
        index = 1
        while index < len(rest):
            if rest[index] == "\\":
                index += 2
                continue
            if rest[index] == '"':
                return index + 1
            index += 1
        return None
    if rest[0] == "'":
        index = 1
        while index < len(rest):
            if rest[index] == "'":
                if rest[index + 1 : index + 2] == "'":
                    index += 2
                    continue
                return index + 1
            index += 1
        return None
    stops = [match.start() for match in re.finditer(r"\s#", rest)]
    if flow:
        stops += [i for i, char in enumerate(rest) if char in ",]}"]
    end = min(stops) if stops else len(rest)
    length = len(rest[:end].rstrip())
    return length or None


def _plain_ok(value: str) -> bool:
    """True when ``value`` written without quotes reads back as this same string in YAML 1.1 and 1.2."""
    if not _PLAIN_WORD.match(value) or value.lower() in _YAML_WORDS:
        return False
    try:
        float(value.replace("_", ""))
    except ValueError:
        return not re.match(r"^(\d{4}-\d{1,2}-\d{1,2}|[-+]?\d[\d_]*(:[0-5]?\d)+)", value)  # dates, 1:30
    return False


def yaml_scalar(value: Any, old_text: str | None) -> str | None:
    """YAML text for a new scalar value, in the style of the one it replaces; None for collections."""
    if isinstance(value, bool):
        word = "true" if value else "false"
        if old_text is not None and old_text.strip()[:1].isupper():
            word = word.capitalize() if not old_text.strip().isupper() else word.upper()
        return word
    if value is None:
        return "null"
    if isinstance(value, int | float):
        return number_text(value, old_text, yaml=True)
    if isinstance(value, str):
        old = (old_text or "").strip()
        if old[:1] == "'":
            return "'" + value.replace("'", "''") + "'"
        return value if old[:1] != '"' and _plain_ok(value) else json.dumps(value)
    return None
