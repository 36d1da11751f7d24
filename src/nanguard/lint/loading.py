"""Reading a config file into a mapping that remembers where each key was written.

YAML is read with ruamel.yaml in round-trip mode (comments, order and line numbers survive, and the
same document object is what the fixer edits); JSON with the standard library, so linting JSON needs
no optional package. Every failure is a :class:`NanguardError` whose message is one line naming the
file and, when the parser knows it, the line.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nanguard._optional import require
from nanguard.errors import ConfigError, UsageError
from nanguard.lint.findings import KeyPath
from nanguard.lint.jsonspans import JsonSpans, index_json

YAML_SUFFIXES = (".yaml", ".yml")
JSON_SUFFIXES = (".json",)


@dataclass
class LoadedConfig:
    """A parsed config: ``data`` is a ruamel CommentedMap for YAML and a plain dict otherwise."""

    data: Mapping[Any, Any]
    fmt: str  # "yaml", "json" or "mapping"
    path: Path | None = None
    text: str | None = None
    json_spans: JsonSpans | None = None

    def line_of(self, key_path: KeyPath) -> int | None:
        """1-based line where ``key_path`` is written, or None (absent key, in-memory mapping)."""
        if self.json_spans is not None:
            return self.json_spans.line_of(key_path)
        if self.fmt == "yaml" and key_path:
            return _yaml_line(self.data, key_path)
        return None


def config_format(path: Path) -> str:
    """``yaml`` or ``json`` from the file name; anything else is a usage error."""
    suffix = path.suffix.lower()
    if suffix in YAML_SUFFIXES:
        return "yaml"
    if suffix in JSON_SUFFIXES:
        return "json"
    raise UsageError(
        f"{path}: unknown config extension {path.suffix or '(none)'!r}: expected .yaml, .yml or .json"
    )


def load_config(path: str | Path) -> LoadedConfig:
    """Parse ``path`` (YAML or JSON, chosen by extension) into a :class:`LoadedConfig`."""
    path = Path(path)
    fmt = config_format(path)
    text = read_text(path)
    if fmt == "json":
        data: Any = parse_json(text, path)
        spans = index_json(text) if isinstance(data, dict) else None
    else:
        data = parse_yaml(text, path)
        spans = None
    if data is None:
        raise ConfigError(f"{path}:1: the config is empty: expected a mapping of training settings")
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{path}:1: expected a mapping of training settings at the top level, "
            f"found a {type(data).__name__}"
        )
    return LoadedConfig(data=data, fmt=fmt, path=path, text=text, json_spans=spans)


def read_text(path: Path) -> str:
    if not path.exists():
        raise UsageError(f"{path}: no such file")
    if path.is_dir():
        raise UsageError(f"{path}: is a directory, expected a YAML or JSON config file")
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


def yaml_round_trip() -> Any:
    """A ruamel.yaml round-trip instance configured to change as little as possible on dump."""
    ruamel_yaml = require("ruamel.yaml", extra="lint", feature="nanguard lint of YAML files")
    yaml = ruamel_yaml.YAML(typ="rt")
    yaml.preserve_quotes = True
    yaml.width = 4096  # never re-wrap long lines the user wrote on one line
    return yaml


def parse_yaml(text: str, path: Path) -> Any:
    yaml = yaml_round_trip()
    from ruamel.yaml.error import YAMLError  # ruamel is importable: yaml_round_trip() required it

    try:
        return yaml.load(text)
    except YAMLError as exc:
        line, problem = _yaml_error_location(exc, text)
        raise ConfigError(f"{path}:{line}: could not parse YAML: {problem}") from exc


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
