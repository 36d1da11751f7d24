"""Walking a parsed config and reading its values the way training code would.

Configs spell the same number many ways (``1e-3``, ``"1e-3"``, ``1.0e-03``), the same switch many
ways (``true``, ``"True"``, ``yes`` in YAML 1.1 files read as strings) and infinity in several
(``-.inf``, ``"-inf"``, ``"float('-inf')"``); these helpers give one reading of each, and ``None`` for
values a later tool fills in (DeepSpeed/HF ``"auto"``) so no rule guesses about them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from nanguard.lint.findings import KeyPath

_MISSING = object()
_TRUE_WORDS = {"true", "yes", "on", "1", "enabled", "enable"}
_FALSE_WORDS = {"false", "no", "off", "0", "disabled", "disable", "none", "null"}
_INF_TEXT = re.compile(
    r"^([+-]?)(?:float\(['\"]?([+-]?)(?:inf|infinity)['\"]?\)|(?:math\.|torch\.|np\.|numpy\.)?\.?(?:inf|infinity))$"
)


_WALKS: dict[int, tuple[Any, list[tuple[KeyPath, Any, Any]]]] = {}


def walk(data: Any, path: KeyPath = ()) -> Iterator[tuple[KeyPath, Any, Any]]:
    """Every ``(key path, value, parent container)`` below ``data``, depth first in document order."""
    if not path:
        cached = _WALKS.get(id(data))
        if cached is not None and cached[0] is data:
            return iter(cached[1])
    return _walk(data, path)


@contextmanager
def walks_cached(data: Any) -> Iterator[None]:
    """Within the block, walks of ``data`` (which must not change meanwhile) replay one stored walk:
    every rule walks the whole tree, and a config near the size limit has thousands of values."""
    key = id(data)
    _WALKS[key] = (data, list(_walk(data, ())))
    try:
        yield
    finally:
        _WALKS.pop(key, None)


def _walk(data: Any, path: KeyPath) -> Iterator[tuple[KeyPath, Any, Any]]:
    if isinstance(data, Mapping):
        for key, value in data.items():
            child = (*path, key)
            yield child, value, data
            yield from _walk(value, child)
    elif isinstance(data, list):
        for index, value in enumerate(data):
            child = (*path, index)
            yield child, value, data
            yield from _walk(value, child)


def get_path(data: Any, key_path: KeyPath, default: Any = None) -> Any:
    node = data
    for part in key_path:
        in_mapping = isinstance(node, Mapping) and part in node
        in_list = isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
        if not (in_mapping or in_list):
            return default
        node = node[part]
    return node


def has_path(data: Any, key_path: KeyPath) -> bool:
    return get_path(data, key_path, _MISSING) is not _MISSING


def key_name(key_path: KeyPath) -> str:
    """The lower-cased last key of a path ('' for a list index or the root)."""
    if not key_path or not isinstance(key_path[-1], str):
        return ""
    return key_path[-1].lower()


def parent_name(key_path: KeyPath) -> str:
    return key_name(key_path[:-1])


def as_number(value: Any) -> float | None:
    """A finite or infinite float for numbers and numeric strings; None for anything else."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        infinite = as_infinite(value)
        if infinite is not None:
            return infinite
        try:
            return float(value.strip().replace("_", ""))
        except ValueError:
            return None
    return None


def as_infinite(value: Any) -> float | None:
    """``±inf`` when ``value`` is an infinite float or a string that training code would read as one."""
    if isinstance(value, float) and math.isinf(value):
        return value
    if not isinstance(value, str):
        return None
    match = _INF_TEXT.match(re.sub(r"\s+", "", value.lower()))
    if match is None:
        return None
    negative = (match.group(1) == "-") != (match.group(2) == "-")
    return -math.inf if negative else math.inf


def as_bool(value: Any) -> bool | None:
    """True/False for booleans and their usual spellings; None when it is not a switch (e.g. 'auto')."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value != 0
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
    return None


def as_text(value: Any) -> str | None:
    """Lower-cased text of a string or a number (``precision: 16`` reads as '16'); None otherwise."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (str, int)):
        return str(value).strip().lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return None


def is_deferred(value: Any) -> bool:
    """``"auto"``: DeepSpeed/Accelerate/HF fill it in at launch, so the config alone does not decide it."""
    return isinstance(value, str) and value.strip().lower() == "auto"


def nice_round(value: float, digits: int = 2) -> float:
    """``value`` to ``digits`` significant digits, so a suggested 1e-3/10 reads 1e-4, not 1.0000000000000002e-4."""
    return float(f"{value:.{digits}g}")
