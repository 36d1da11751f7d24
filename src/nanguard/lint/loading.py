"""Reading a config file into a mapping that remembers where each key was written.

YAML is read with ruamel.yaml in round-trip mode (line and column of every key and value); JSON with
the standard library, TOML with ``tomllib`` and Python configs with ``ast`` (never executed), so only
YAML needs an optional package. Input is bounded (:mod:`nanguard.lint.limits`) before and after
parsing. Every failure is a :class:`NanguardError` whose message is one line naming the file and,
when the parser knows it, the line.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from nanguard._optional import require
from nanguard.errors import ConfigError, UsageError
from nanguard.lint.findings import KeyPath
from nanguard.lint.jsonspans import JsonSpans, index_json
from nanguard.lint.limits import check_size, check_text_depth, check_tree
from nanguard.lint.pyconfig import PyExpr, PySpans, parse_python
from nanguard.lint.tomlspans import TomlSpans, index_toml, parse_toml
from nanguard.lint.yamlspans import YamlText

FORMATS = {".yaml": "yaml", ".yml": "yaml", ".json": "json", ".toml": "toml", ".py": "python"}


@dataclass
class LoadedConfig:
    """A parsed config: ``data`` is a ruamel CommentedMap for YAML and a plain dict otherwise."""

    data: Mapping[Any, Any]
    fmt: str  # "yaml", "json", "toml", "python" or "mapping"
    path: Path | None = None
    text: str | None = None
    json_spans: JsonSpans | None = None
    toml_spans: TomlSpans | None = None
    py_spans: PySpans | None = None

    def line_of(self, key_path: KeyPath) -> int | None:
        """1-based line where ``key_path`` is written, or None (absent key, in-memory mapping)."""
        if self.json_spans is not None:
            return self.json_spans.line_of(key_path)
        if self.toml_spans is not None:
            return self.toml_spans.line_of(key_path)
        if self.py_spans is not None:
            return self.py_spans.line_of(key_path)
        if self.fmt == "yaml" and key_path:
            return _yaml_line(self.data, key_path)
        return None


    @cached_property
    def yaml_text(self) -> YamlText:
        """Positions in the YAML text (built once: every finding's message and fix reads them)."""
        assert self.text is not None
        return YamlText(self.text, self.data)

    def value_text(self, key_path: KeyPath) -> str | None:
        """A scalar value's text as written in the file (``1e-2``, ``"-inf"``), or None."""
        if self.text is None:
            return None
        span: tuple[int, int] | None = None
        if self.json_spans is not None:
            span = self.json_spans.values.get(key_path)
        elif self.toml_spans is not None:
            span = self.toml_spans.values.get(tuple(str(p) for p in key_path))
        elif self.py_spans is not None and len(key_path) == 1:
            span = self.py_spans.values.get(str(key_path[0]))
        elif self.fmt == "yaml":
            span = self.yaml_text.value_span(key_path)
        if span is None:
            return None
        text = self.text[span[0] : span[1]]
        return text if "\n" not in text and len(text) < 80 else None


def config_format(path: Path) -> str:
    """``yaml``, ``json``, ``toml`` or ``python`` from the file name; anything else is a usage error."""
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UsageError(
            f"{path}: unknown config extension {path.suffix or '(none)'!r}: "
            "expected .yaml, .yml, .json, .toml or .py"
        )
    return fmt


def load_config(path: str | Path) -> LoadedConfig:
    """Parse ``path`` (chosen by extension) into a :class:`LoadedConfig`, within the input limits."""
    path = Path(path)
    fmt = config_format(path)
    _check_readable(path)
    check_size(path, fmt)
    text = read_text(path)
    return parse_text(text, path, fmt)


def parse_text(text: str, path: Path, fmt: str) -> LoadedConfig:
    """Parse config text already read (also used to re-read a fixed file before it is written)."""
    check_text_depth(text, path, fmt)
    loaded = LoadedConfig(data={}, fmt=fmt, path=path, text=text)
    data: Any
    if fmt == "json":
        data = parse_json(text, path)
        loaded.json_spans = index_json(text) if isinstance(data, dict) else None
    elif fmt == "toml":
        data = parse_toml(text, path)
        loaded.toml_spans = index_toml(text)
    elif fmt == "python":
        data, loaded.py_spans = parse_python(text, path)
    else:
        data = parse_yaml(text, path)
    if data is None or (fmt == "python" and not data):
        raise ConfigError(f"{path}:1: the config is empty: expected a mapping of training settings")
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{path}:1: expected a mapping of training settings at the top level, "
            f"found a {type(data).__name__}"
        )
    check_tree(data, path)
    loaded.data = data
    return loaded


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise UsageError(f"{path}: no such file")
    if path.is_dir():
        raise UsageError(f"{path}: is a directory, expected a config file (.yaml, .yml, .json, .toml, .py)")


def read_text(path: Path) -> str:
    _check_readable(path)
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text: {exc.reason}") from exc
    except OSError as exc:
        raise UsageError(f"{path}: cannot read: {exc.strerror or exc}") from exc


def parse_json(text: str, path: Path) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{path}:{exc.lineno}: could not parse JSON: {exc.msg} (column {exc.colno})"
        ) from exc
    except RecursionError as exc:
        raise ConfigError(f"{path}:1: could not parse JSON: nested too deeply") from exc


def yaml_round_trip() -> Any:
    """A ruamel.yaml round-trip loader: keeps line and column of every key and value."""
    ruamel_yaml = require("ruamel.yaml", extra="lint", feature="nanguard lint of YAML files")
    yaml = ruamel_yaml.YAML(typ="rt")
    yaml.preserve_quotes = True
    return yaml


def parse_yaml(text: str, path: Path) -> Any:
    yaml = yaml_round_trip()
    from ruamel.yaml.error import YAMLError  # ruamel is importable: yaml_round_trip() required it

    try:
        return yaml.load(text)
    except YAMLError as exc:
        line, problem = _yaml_error_location(exc, text)
        raise ConfigError(f"{path}:{line}: could not parse YAML: {problem}") from exc
    except RecursionError as exc:
        raise ConfigError(f"{path}:1: could not parse YAML: nested too deeply") from exc


def _yaml_error_location(exc: Exception, text: str) -> tuple[int, str]:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None)
    if mark is not None:
        line = int(mark.line) + 1
    elif getattr(exc, "position", None) is not None:  # ReaderError: a character offset
        line = text.count("\n", 0, int(exc.position)) + 1  # type: ignore[attr-defined]
    else:
        line = 1
    if not problem:
        problem = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return line, re.sub(r"\s+", " ", str(problem)).strip()


def _yaml_line(data: Any, key_path: KeyPath) -> int | None:
    node = data
    for part in key_path[:-1]:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return None
    last = key_path[-1]
    lc = getattr(node, "lc", None)
    if lc is None:
        return None
    try:
        position = lc.item(last) if isinstance(last, int) and isinstance(node, list) else lc.key(last)
    except (KeyError, IndexError, TypeError):
        return None
    return int(position[0]) + 1 if position else None


def plain(value: Any) -> Any:
    """``value`` with ruamel's types (CommentedMap, ScalarFloat, ...) turned into plain Python ones."""
    if isinstance(value, Mapping):
        return {plain(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, bool) or value is None:
        return value
    if type(value).__name__ == "ScalarBoolean":  # ruamel's bool when it carries an anchor
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return value if isinstance(value, PyExpr) else str(value)
    return value
