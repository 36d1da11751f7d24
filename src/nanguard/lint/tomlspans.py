"""TOML configs (torchtitan's ``train_configs/*.toml``): parse, and find where each value is written.

``tomllib`` (``tomli`` before Python 3.11) parses; it gives no positions, so this module reads the
text once more, line by line, for the ``[table]`` headers and ``key = value`` lines. That is enough
for line numbers and for edits that change only the value's bytes: a value that spans lines (an
array, a multi-line string) is located but never edited, and keys inside ``[[array tables]]`` are
not edited either.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanguard._optional import require
from nanguard.errors import ConfigError

KeyPath = tuple[str, ...]

_BARE_KEY = r"[A-Za-z0-9_-]+"
_KEY_PART = rf'(?:{_BARE_KEY}|"(?:[^"\\]|\\.)*"|\'[^\']*\')'
_DOTTED = rf"{_KEY_PART}(?:\s*\.\s*{_KEY_PART})*"
_TABLE = re.compile(rf"^\s*\[\s*({_DOTTED})\s*\]\s*(#.*)?$")
_ARRAY_TABLE = re.compile(rf"^\s*\[\[\s*({_DOTTED})\s*\]\]\s*(#.*)?$")
_KEY_VALUE = re.compile(rf"^(\s*)({_DOTTED})\s*=\s*")
_PART = re.compile(_KEY_PART)


@dataclass
class TomlSpans:
    """Spans of single-line values, key lines, and the last key line of each table."""

    text: str
    values: dict[KeyPath, tuple[int, int]] = field(default_factory=dict)
    lines: dict[KeyPath, int] = field(default_factory=dict)
    line_ends: dict[KeyPath, int] = field(default_factory=dict)  # offset just past the key's last line
    table_ends: dict[KeyPath, int] = field(default_factory=dict)  # offset past a table's last key line
    indents: dict[KeyPath, str] = field(default_factory=dict)

    def line_of(self, key_path: tuple[Any, ...]) -> int | None:
        return self.lines.get(tuple(str(part) for part in key_path))


def parse_toml(text: str, path: Path) -> dict[str, Any]:
    toml = _toml_module()
    try:
        return dict(toml.loads(text))
    except toml.TOMLDecodeError as exc:
        line = getattr(exc, "lineno", None) or _line_from_message(str(exc))
        raise ConfigError(f"{path}:{line}: could not parse TOML: {str(exc).split(' (at')[0]}") from exc
    except RecursionError as exc:
        raise ConfigError(f"{path}:1: could not parse TOML: nested too deeply") from exc


def _toml_module() -> Any:
    if sys.version_info >= (3, 11):
        import tomllib

        return tomllib
    return require("tomli", extra="lint", feature="nanguard lint of TOML files")


def _line_from_message(message: str) -> int:
    match = re.search(r"line (\d+)", message)
    return int(match.group(1)) if match else 1


def _key_parts(dotted: str) -> KeyPath:
    parts = []
    for match in _PART.finditer(dotted):
        part = match.group(0)
        if part[:1] in "\"'":
            part = part[1:-1]
        parts.append(part)
    return tuple(parts)


def index_toml(text: str) -> TomlSpans:
    """Spans of ``text``, which must already parse as TOML."""
    spans = TomlSpans(text)
    table: KeyPath | None = ()
    offset = 0
    lines = text.splitlines(keepends=True)
    index = 0
    while index < len(lines):
        line = lines[index]
        line_start, offset = offset, offset + len(line)
        index += 1
        header = _TABLE.match(line)
        if header and not _ARRAY_TABLE.match(line):
            table = _key_parts(header.group(1))
            spans.lines.setdefault(table, index)
            spans.table_ends[table] = offset
            continue
        if _ARRAY_TABLE.match(line):
            table = None  # keys of array tables are not addressable by a plain key path
            continue
        match = _KEY_VALUE.match(line)
        if match is None or table is None:
            continue
        key_path = (*table, *_key_parts(match.group(2)))
        value_start = line_start + match.end()
        value_text = line[match.end() :]
        closed, value_end = _single_line_value(value_text)
        spans.lines[key_path] = index
        spans.indents[key_path] = match.group(1)
        if closed:
            spans.values[key_path] = (value_start, value_start + value_end)
        else:
            while index < len(lines) and not _closes(lines[index]):
                offset += len(lines[index])
                index += 1
            if index < len(lines):
                offset += len(lines[index])
                index += 1
        spans.line_ends[key_path] = offset
        spans.table_ends[table] = offset
    return spans


def _single_line_value(value_text: str) -> tuple[bool, int]:
    """(whether the value ends on this line, its length without the comment and trailing space)."""
    stripped = value_text.rstrip("\r\n")
    if stripped.startswith(('"""', "'''")) and stripped.count(stripped[:3]) < 2:
        return False, 0
    depth, quote, index = 0, "", 0
    while index < len(stripped):
        char = stripped[index]
        if quote:
            if char == "\\" and quote == '"':
                index += 1
            elif char == quote:
                quote = ""
        elif char in "\"'":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "#":
            break
        index += 1
    return depth <= 0, len(stripped[:index].rstrip())


def _closes(line: str) -> bool:
    stripped = line.split("#", 1)[0].strip()
    return stripped.endswith(("]", "}", '"""', "'''"))
