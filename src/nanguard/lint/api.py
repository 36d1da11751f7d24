"""The Python entry points: lint a config file or mapping, and write a fixed copy.

Fixes are never written over the input: ``train.yaml`` becomes ``train_fixed.yaml`` beside it, and an
existing ``train_fixed.yaml`` is only replaced when the caller says so (``overwrite=True``,
``--force``). Files are written atomically (temporary file in the same folder, then ``os.replace``).
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from nanguard.errors import UsageError
from nanguard.lint.findings import RULES, Finding, KeyPath, format_path
from nanguard.lint.fixing import Change, fix_mapping, fix_text, output_path_problem, planned
from nanguard.lint.limits import check_tree
from nanguard.lint.loading import LoadedConfig, load_config
from nanguard.lint.locate import find_sections
from nanguard.lint.rules import run_rules

Source = str | os.PathLike[str] | Mapping[Any, Any]

_SUPPRESS = re.compile(r"#\s*nanguard:\s*ignore(?:\[([\w\s,]+)\])?")


@dataclass
class FixResult:
    """What :func:`fix_config` did.

    ``findings`` are the input's; ``applied`` the ones fixed; ``remaining`` what a lint of the fixed
    config still reports (the findings that need a person). ``changes`` says, for a file, each value
    written (old and new text, line); ``refused`` the fixable findings whose fix could not be written
    safely. ``output_path`` is None for a mapping input or when nothing was fixed; ``document`` is the
    fixed mapping or the fixed file's text.
    """

    findings: list[Finding]
    applied: list[Finding]
    remaining: list[Finding]
    output_path: Path | None = None
    document: Any = None
    shape: str = field(default="freeform")
    changes: list[Change] = field(default_factory=list)
    refused: list[Finding] = field(default_factory=list)

    @property
    def problems_left(self) -> list[Finding]:
        """The remaining findings that are problems (errors and warnings), not questions or notes."""
        return [f for f in self.remaining if f.severity != "info"]


def load(source: Source) -> LoadedConfig:
    """A :class:`LoadedConfig` for a path or an in-memory mapping."""
    if isinstance(source, Mapping):
        check_tree(source, "<mapping>")
        return LoadedConfig(data=source, fmt="mapping")
    return load_config(Path(os.fspath(source)))


def config_shape(source: Source | LoadedConfig) -> str:
    """'huggingface', 'lightning', 'deepspeed', 'accelerate', 'jsonargparse', 'hydra', 'nanogpt',
    'torchtitan' or 'freeform'."""
    loaded = source if isinstance(source, LoadedConfig) else load(source)
    return find_sections(loaded.data, loaded.fmt).shape


def lint_config(source: Source | LoadedConfig, *, ignore: Iterable[str] = ()) -> list[Finding]:
    """Every finding for a config file (YAML or JSON) or an already-parsed mapping.

    Findings carry 1-based line numbers for files; a ``# nanguard: ignore`` or
    ``# nanguard: ignore[rule, ...]`` comment on a key's line silences it (YAML, TOML, Python).
    """
    loaded = source if isinstance(source, LoadedConfig) else load(source)
    ignored = _check_rule_names(ignore)
    lines = loaded.text.splitlines() if loaded.text is not None else []
    findings = []
    for finding in run_rules(loaded.data, loaded.fmt, loaded.value_text):
        line = loaded.line_of(finding.key_path) if finding.exists else None
        if finding.rule in ignored or _suppressed(lines, line, finding.rule):
            continue
        if finding.fixable and not finding.exists and not _insertable(loaded.data, finding.key_path):
            finding = replace(finding, fix=None, message=f"{finding.message} (set it by hand: "
                              f"{format_path(finding.key_path[:-1])} is not a section that can hold it)")
        findings.append(replace(finding, line=line))
    order = {rule: index for index, rule in enumerate(RULES)}
    return sorted(findings, key=lambda f: (f.line if f.line is not None else 10**9, order[f.rule]))


def _insertable(data: Any, path: KeyPath) -> bool:
    """Every section on the way to a new key is a mapping or absent, so a fixer can write the key there
    (``trainer: 0`` cannot take ``trainer.gradient_clip_val``)."""
    node = data
    for part in path[:-1]:
        if not isinstance(node, Mapping):
            return False
        node = node.get(part)
        if node is None:
            return True
    return isinstance(node, Mapping)


def fixed_path(path: Path) -> Path:
    """``train.yaml`` -> ``train_fixed.yaml``."""
    return path.with_name(f"{path.stem}_fixed{path.suffix}")


def fix_config(
    source: Source,
    *,
    output: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    ignore: Iterable[str] = (),
) -> FixResult:
    """Apply every fixable finding; for a file, write the result beside it (see the module doc).

    Raises :class:`UsageError` when the output exists and ``overwrite`` is false, or when it would be
    the input itself.
    """
    loaded = load(source)
    findings = lint_config(loaded, ignore=ignore)
    plan = planned(findings)
    shape = find_sections(loaded.data, loaded.fmt).shape
    if loaded.path is None:
        fixed = fix_mapping(loaded.data, plan)
        remaining = lint_config(LoadedConfig(data=fixed, fmt="mapping"), ignore=ignore)
        return FixResult(findings, plan, remaining, None, fixed, shape)
    if not plan:
        return FixResult(findings, [], findings, None, loaded.text, shape)
    target = Path(output) if output is not None else fixed_path(loaded.path)
    _check_target(loaded.path, target, overwrite)
    text, changes, refused = fix_text(loaded, plan)
    applied = [change.finding for change in changes]
    if not changes:
        return FixResult(findings, [], findings, None, loaded.text, shape, refused=refused)
    from nanguard.lint.loading import parse_text

    remaining = lint_config(parse_text(text, target, loaded.fmt), ignore=ignore)
    write_atomically(
        target, text, crlf=b"\r\n" in loaded.path.read_bytes(), mode=loaded.path.stat().st_mode & 0o777
    )
    return FixResult(findings, applied, remaining, target, text, shape, changes, refused)


def _check_target(source: Path, target: Path, overwrite: bool) -> None:
    if target.resolve() == source.resolve():
        raise UsageError(
            f"{target}: refusing to write the fixed config over its input; choose another --output"
        )
    problem = output_path_problem(target)
    if problem is not None:
        raise UsageError(problem)
    if target.exists() and not overwrite:
        raise UsageError(
            f"{target} already exists; pass --force to overwrite it or --output to write somewhere else"
        )


def write_atomically(path: Path, text: str, *, crlf: bool = False, mode: int = 0o644) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same folder, so no reader sees half a file."""
    try:
        handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise UsageError(
            f"cannot write in {path.parent}: {exc.strerror or exc}; choose another --output"
        ) from exc
    try:
        os.chmod(temp_name, mode)
        with os.fdopen(handle, "w", encoding="utf-8", newline="\r\n" if crlf else "\n") as out:
            out.write(text)
        os.replace(temp_name, path)
    except OSError as exc:
        Path(temp_name).unlink(missing_ok=True)
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}; nothing was written") from exc
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def _check_rule_names(names: Iterable[str]) -> set[str]:
    chosen = {name.strip() for name in names if name.strip()}
    unknown = sorted(chosen - set(RULES))
    if unknown:
        raise UsageError(f"unknown rule(s) {', '.join(unknown)}: choose from {', '.join(RULES)}")
    return chosen


def _suppressed(lines: list[str], line: int | None, rule: str) -> bool:
    if line is None or not 0 < line <= len(lines):
        return False
    match = _SUPPRESS.search(lines[line - 1])
    if match is None:
        return False
    return match.group(1) is None or rule in {r.strip() for r in match.group(1).split(",")}
