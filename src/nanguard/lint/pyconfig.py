"""Python config files (nanoGPT's ``config/*.py``), read with :mod:`ast` and never executed.

nanoGPT's ``configurator.py`` runs such a file with ``exec`` so its top-level assignments override
the training script's globals. Linting must not run it (it is code), so only what can be read
without running anything counts: top-level ``name = <literal>`` statements. A value that is an
expression (``'bfloat16' if cuda else 'float16'``) is kept as its source text in a
:class:`PyExpr`, which the rules treat as unknown except for spelled infinities
(``float('-inf')``, ``-math.inf``). Assignments under ``if``/``for``/functions are not read: whether
they run is not known without running the file.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanguard.errors import ConfigError


class PyExpr(str):
    """The source text of a value that is not a literal (a rule cannot know what it evaluates to)."""


@dataclass
class PySpans:
    """Where each top-level assignment's value sits in the text (character offsets)."""

    text: str
    values: dict[str, tuple[int, int]] = field(default_factory=dict)
    lines: dict[str, int] = field(default_factory=dict)
    statement_ends: dict[str, int] = field(default_factory=dict)  # offset just past the statement's line

    def line_of(self, key_path: tuple[Any, ...]) -> int | None:
        if len(key_path) != 1:
            return None
        return self.lines.get(str(key_path[0]))


def parse_python(text: str, path: Path) -> tuple[dict[str, Any], PySpans]:
    """The top-level literal assignments of a Python config file and their spans."""
    try:
        tree = ast.parse(text, filename=str(path))
    except SyntaxError as exc:
        raise ConfigError(f"{path}:{exc.lineno or 1}: could not parse Python: {exc.msg}") from exc
    except (RecursionError, MemoryError) as exc:
        raise ConfigError(f"{path}:1: could not parse Python: nested too deeply") from exc
    starts = _line_starts(text)
    data: dict[str, Any] = {}
    spans = PySpans(text)
    for statement in tree.body:
        target, value = _assignment(statement)
        if target is None or value is None or target.startswith("_"):
            continue
        data[target] = _value_of(value, text, starts)
        start = _offset(text, starts, value.lineno, value.col_offset)
        end = _offset(text, starts, value.end_lineno or value.lineno, value.end_col_offset or 0)
        spans.values[target] = (start, end)
        spans.lines[target] = statement.lineno
        last_line = statement.end_lineno or statement.lineno
        spans.statement_ends[target] = starts[last_line + 1] if last_line + 1 < len(starts) else len(text)
    return data, spans


def _assignment(statement: ast.stmt) -> tuple[str | None, ast.expr | None]:
    if isinstance(statement, ast.Assign) and len(statement.targets) == 1:
        target = statement.targets[0]
        if isinstance(target, ast.Name):
            return target.id, statement.value
    if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
        return statement.target.id, statement.value
    return None, None


def _value_of(node: ast.expr, text: str, starts: list[int]) -> Any:
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        start = _offset(text, starts, node.lineno, node.col_offset)
        end = _offset(text, starts, node.end_lineno or node.lineno, node.end_col_offset or 0)
        return PyExpr(text[start:end])


def _line_starts(text: str) -> list[int]:
    """``starts[n]`` is the offset where 1-based line ``n`` begins (``starts[0]`` is unused)."""
    starts = [0, 0]
    for index, char in enumerate(text):
        if char == "\n":
            starts.append(index + 1)
    return starts


def _offset(text: str, starts: list[int], line: int, byte_col: int) -> int:
    """A character offset from ast's 1-based line and UTF-8 byte column."""
    begin = starts[line]
    line_end = text.find("\n", begin)
    line_text = text[begin : len(text) if line_end < 0 else line_end]
    return begin + len(line_text.encode("utf-8")[:byte_col].decode("utf-8", errors="ignore"))


def python_literal(value: Any, old_text: str | None) -> str:
    """Python source for a new value, spelled like the one it replaces (quotes, number notation)."""
    from nanguard.lint.textedit import number_text

    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, int | float):
        return number_text(value, old_text)
    if isinstance(value, str):
        quote = "'" if old_text is None or old_text.lstrip()[:1] != '"' else '"'
        return quote + value.replace("\\", "\\\\").replace(quote, "\\" + quote) + quote
    return repr(value)
