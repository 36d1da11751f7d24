"""Bounds on what ``nanguard lint`` will read, checked before and right after parsing.

A training config is a few kilobytes of settings, a dozen levels deep at most. Anything far past
that is a mistake (a dataset passed as a config) or hostile (a YAML alias bomb: a 1 KB file whose
aliases expand to billions of values). Each bound is checked at the cheapest point: the size from
``stat`` before the file is read, the nesting depth on the raw text before the parser recurses into
it (a parser can spend seconds before hitting Python's recursion limit), and the number of values
once parsed, counting each shared (aliased) node every time it is reached, without expanding it.
Every refusal is a :class:`ConfigError` of one line that names the file, the limit and the way out.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nanguard.errors import ConfigError

# The largest real training configs are 10-20 KB (NeMo's), a few hundred values, 10 levels deep.
# YAML gets the lower size bound because the round-trip parser needs ~25 s and ~150x the file's
# size in memory per megabyte; at 64 KiB that is ~1.5 s and ~10 MB at worst.
MAX_BYTES = {"yaml": 64 * 1024, "json": 512 * 1024, "toml": 512 * 1024, "python": 512 * 1024}
MAX_DEPTH = 64  # nesting levels
MAX_VALUES = 20_000  # values, counting each YAML alias as the values it repeats

_QUOTED = re.compile(r'"(?:[^"\\\n]|\\.)*"|\'(?:[^\'\n]|\'\')*\'')
_COMMENT = re.compile(r"(^|\s)#.*$")
_DASHES = re.compile(r"^(?:-\s+)+")


def check_size(path: Path, fmt: str) -> None:
    """Refuse a file larger than :data:`MAX_BYTES` for its format before reading a byte of it."""
    size = path.stat().st_size
    limit = MAX_BYTES.get(fmt, min(MAX_BYTES.values()))
    if size > limit:
        raise ConfigError(
            f"{path}: {_size(size)} is far larger than a training config (the limit for {fmt} is "
            f"{limit // 1024} KB; real configs are under 20 KB): is this a dataset? Lint the config itself."
        )


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} KB"


def _too_deep(path: Path, depth: int) -> ConfigError:
    return ConfigError(
        f"{path}: nested more than {MAX_DEPTH} levels deep (at least {depth}); a training config "
        f"needs fewer than 15, so this file was not parsed"
    )


def check_text_depth(text: str, path: Path, fmt: str) -> None:
    """Refuse text nested deeper than :data:`MAX_DEPTH`, estimated without parsing it.

    Brackets count for every format (JSON, TOML arrays and inline tables, YAML flow style, Python
    literals); YAML block style adds one level per deeper indentation and per leading ``- ``. The
    estimate may be above the true depth, never below it, and real configs sit far under the limit.
    """
    flow = 0
    indents: list[int] = []
    for line in text.splitlines():
        stripped = _QUOTED.sub('""', line)
        if fmt in ("yaml", "toml", "python"):
            stripped = _COMMENT.sub("", stripped)
        block = 0
        if fmt == "yaml" and stripped.strip() and flow == 0:
            indent = len(stripped) - len(stripped.lstrip(" "))
            while indents and indents[-1] >= indent:
                indents.pop()
            indents.append(indent)
            dashes = _DASHES.match(stripped.lstrip(" "))
            block = len(indents) + (dashes.group(0).count("-") if dashes else 0)
        for char in stripped:
            if char in "[{(":
                flow += 1
                if flow + block > MAX_DEPTH:
                    raise _too_deep(path, flow + block)
            elif char in "]})":
                flow = max(0, flow - 1)
        if block + flow > MAX_DEPTH:
            raise _too_deep(path, block + flow)


def check_tree(data: Any, path: Path | str) -> None:
    """Refuse a parsed tree deeper than :data:`MAX_DEPTH` or with more than :data:`MAX_VALUES` values.

    Shared nodes (YAML aliases) are counted once per reference, as the rules would walk them, but
    measured once: the count of a node is memoised by identity, so a bomb costs microseconds.
    """
    sizes: dict[int, int] = {}
    depths: dict[int, int] = {}
    # Iterative post-order walk: no recursion, whatever the depth.
    stack: list[tuple[Any, bool]] = [(data, False)]
    on_path: set[int] = set()
    shared = False
    while stack:
        node, children_done = stack.pop()
        ident = id(node)
        if ident in sizes and not children_done:
            shared = True
            continue
        children = _children(node)
        if not children_done:
            if ident in on_path:
                raise ConfigError(f"{path}: a YAML alias refers to a node that contains it (a cycle)")
            on_path.add(ident)
            stack.append((node, True))
            stack.extend((child, False) for child in children if id(child) not in sizes)
            if len(on_path) > MAX_DEPTH:
                raise _too_deep(Path(str(path)), len(on_path))
            continue
        on_path.discard(ident)
        scalars = (len(node) if isinstance(node, Mapping | list) else 0) - len(children)
        sizes[ident] = 1 + scalars + sum(sizes[id(child)] for child in children)
        depths[ident] = 1 + max((depths.get(id(child), 0) for child in children), default=0)
        if sizes[ident] > MAX_VALUES:
            how = (
                "expands to more than {:,} values (YAML aliases repeat the same block many times over: "
                "an alias bomb?)"
                if shared or any(id(child) in sizes for child in children[1:])
                else "holds more than {:,} values"
            )
            raise ConfigError(f"{path}: {how.format(MAX_VALUES)}; a training config holds a few hundred")
        if depths[ident] > MAX_DEPTH:
            raise _too_deep(Path(str(path)), depths[ident])


def _children(node: Any) -> list[Any]:
    if isinstance(node, Mapping):
        return [value for value in node.values() if isinstance(value, Mapping | list)]
    if isinstance(node, list):
        return [value for value in node if isinstance(value, Mapping | list)]
    return []
