"""Where each value of a JSON document sits in its text.

The standard ``json`` module returns values without positions. Line numbers in findings and fixes
that change only the bytes of the fixed values (so number spelling, inline arrays and indentation stay
exactly as the user wrote them) both need the spans, so this walks the text once more after
``json.loads`` has already validated it; scalars are decoded by ``json`` itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from nanguard.lint.findings import KeyPath

_WHITESPACE = " \t\n\r"
_DECODER = json.JSONDecoder()


@dataclass
class Member:
    """One ``"key": value`` pair of an object: where the key starts and the value ends."""

    key: str
    key_start: int
    key_end: int
    value_start: int
    value_end: int


@dataclass
class ObjectSpan:
    """An object's braces and members, in document order."""

    start: int
    end: int  # index of the closing brace
    members: list[Member] = field(default_factory=list)


@dataclass
class JsonSpans:
    """Spans of every value (``values``) and of every object (``objects``), keyed by key path."""

    text: str
    values: dict[KeyPath, tuple[int, int]] = field(default_factory=dict)
    key_starts: dict[KeyPath, int] = field(default_factory=dict)
    objects: dict[KeyPath, ObjectSpan] = field(default_factory=dict)

    def line_of(self, key_path: KeyPath) -> int | None:
        """1-based line of the key (or list item) at ``key_path``; None when it is not in the text."""
        position = self.key_starts.get(key_path, self.values.get(key_path, (None, None))[0])
        if position is None:
            return None
        return self.text.count("\n", 0, position) + 1


def index_json(text: str) -> JsonSpans:
    """Spans of ``text``, which must already be valid JSON (``json.loads`` succeeded on it)."""
    spans = JsonSpans(text)
    _value(text, _skip(text, 0), (), spans)
    return spans


def _skip(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WHITESPACE:
        i += 1
    return i


def _value(text: str, i: int, path: KeyPath, spans: JsonSpans) -> int:
    """Record the span of the value starting at ``i`` and return the index just past it."""
    if text[i] == "{":
        end = _object(text, i, path, spans)
    elif text[i] == "[":
        end = _array(text, i, path, spans)
    else:
        _, end = _DECODER.raw_decode(text, i)
    spans.values[path] = (i, end)
    return end


def _object(text: str, i: int, path: KeyPath, spans: JsonSpans) -> int:
    obj = ObjectSpan(start=i, end=i)
    i = _skip(text, i + 1)
    while text[i] != "}":
        key_start = i
        key, key_end = _DECODER.raw_decode(text, i)
        i = _skip(text, key_end)  # at ':'
        value_start = _skip(text, i + 1)
        child = (*path, key)
        value_end = _value(text, value_start, child, spans)
        spans.key_starts[child] = key_start
        obj.members = [m for m in obj.members if m.key != key]  # a repeated key: json keeps the last
        obj.members.append(Member(key, key_start, key_end, value_start, value_end))
        i = _skip(text, value_end)
        if text[i] == ",":
            i = _skip(text, i + 1)
    obj.end = i
    spans.objects[path] = obj
    return i + 1


def _array(text: str, i: int, path: KeyPath, spans: JsonSpans) -> int:
    i = _skip(text, i + 1)
    index = 0
    while text[i] != "]":
        i = _skip(text, _value(text, i, (*path, index), spans))
        index += 1
        if text[i] == ",":
            i = _skip(text, i + 1)
    return i + 1
