"""Read a run directory (``events.jsonl``, ``history.csv``, ``summary.json``) into plain records.

Pure functions, no plotting: the report, ``nanguard events`` and tests all read runs through here.
Readers tolerate what the format allows to vary (unknown keys, missing optional fields, empty cells)
and reject what cannot be meant (a line that is not JSON, a step that is not a number) with one line
that names the file and the line number.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanguard.errors import UsageError

EVENTS_FILE = "events.jsonl"
HISTORY_FILE = "history.csv"
SUMMARY_FILE = "summary.json"


MODULE_ROLES = ("birth", "upstream", "downstream", "clean")


@dataclass(frozen=True)
class ModuleStat:
    """What one module saw at an event: its largest activation and gradient, and its NaN/Inf outputs.

    ``forward_nonfinite``/``backward_nonfinite`` count op outputs holding NaN/Inf in each pass (an
    intended ``-inf`` mask fill is never counted), and ``role`` places the module relative to where
    the first bad value was born: ``birth``, ``upstream`` (ran before it), ``downstream`` (saw it
    only because the bad value flowed there) or ``clean``. Older records have only ``nonfinite``, a
    total over both passes (or a bool, read as 0 or 1): their split counts and role are ``None``.
    """

    module: str
    dtype: str | None
    act_absmax: float | None
    grad_absmax: float | None
    nonfinite: int
    forward_nonfinite: int | None = None
    backward_nonfinite: int | None = None
    role: str | None = None
    dtype_max: float | None = None

    @property
    def has_split(self) -> bool:
        """True for records that tell forward from backward and say where the module stands."""
        return self.role is not None


@dataclass(frozen=True)
class Contributing:
    """A cause that triggered or worsened the main one (``diagnosis.contributing``)."""

    cause: str
    evidence: tuple[str, ...] = ()


@dataclass(frozen=True)
class EventRecord:
    """One ``events.jsonl`` line, flattened; ``loss``/``grad_norm`` keep NaN/Inf from their ``*_repr``."""

    line: int
    step: int
    trigger: str
    action: str
    cause: str
    phase: str
    module: str | None = None
    op: str | None = None
    tensor: str | None = None
    confidence: float | None = None
    reproducible: bool | None = None
    evidence: tuple[str, ...] = ()
    fixes: tuple[str, ...] = ()
    loss: float | None = None
    grad_norm: float | None = None
    lr: float | None = None
    rank: int = 0
    time: str | None = None
    lr_multiplier: float | None = None
    same_as_step: int | None = None
    contributing: tuple[Contributing, ...] = ()
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @functools.cached_property
    def module_stats(self) -> tuple[ModuleStat, ...]:
        """``details.module_stats``, read when first asked for: a long run's report draws only a few of them."""
        return _module_stats(self.raw.get("details"))

    @property
    def extra_details(self) -> dict[str, Any]:
        """``details`` minus what the report already draws, shown as-is for completeness."""
        details = self.raw.get("details")
        if not isinstance(details, Mapping):
            return {}
        return {key: value for key, value in details.items() if key != "module_stats"}


@dataclass(frozen=True)
class HistoryRow:
    """One ``history.csv`` row; a number is ``None`` when its cell was empty."""

    step: int
    time: float | None = None
    loss: float | None = None
    grad_norm: float | None = None
    lr: float | None = None
    lr_multiplier: float | None = None
    loss_scale: float | None = None
    action: str = "none"
    trigger: str = ""
    skipped_total: float | None = None
    rollbacks_total: float | None = None
    clipped_total: float | None = None


@dataclass(frozen=True)
class RunData:
    """Everything a run directory holds; ``history``/``events`` are empty when their file is absent."""

    run_dir: Path
    events: tuple[EventRecord, ...]
    history: tuple[HistoryRow, ...]
    summary: Mapping[str, Any] | None
    has_events_file: bool
    has_history_file: bool


def _bad(path: Path, line: int, what: str) -> UsageError:
    return UsageError(f"{path}:{line}: {what}")


def _optional_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _optional_float(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _number_with_repr(record: Mapping[str, Any], key: str) -> float | None:
    value = _optional_float(record.get(key))
    if value is None:
        value = _optional_float(record.get(f"{key}_repr"))
    return value


def _count(value: Any) -> int:
    if isinstance(value, bool):
        return int(value)
    number = _optional_float(value)
    return int(number) if number is not None and math.isfinite(number) and number > 0 else 0


def _optional_count(value: Any) -> int | None:
    return None if value is None else _count(value)


def _module_stat(item: Mapping[str, Any]) -> ModuleStat:
    forward, backward = _optional_count(item.get("forward_nonfinite")), _optional_count(item.get("backward_nonfinite"))
    role = item.get("role")
    split = forward is not None or backward is not None
    return ModuleStat(
        module=str(item["module"]),
        dtype=_optional_str(item.get("dtype")),
        act_absmax=_optional_float(item.get("act_absmax")),
        grad_absmax=_optional_float(item.get("grad_absmax")),
        nonfinite=(forward or 0) + (backward or 0) if split else _count(item.get("nonfinite")),
        forward_nonfinite=forward,
        backward_nonfinite=backward,
        role=role if role in MODULE_ROLES else None,
        dtype_max=_optional_float(item.get("dtype_max")),
    )


def _module_stats(details: Any) -> tuple[ModuleStat, ...]:
    if not isinstance(details, Mapping):
        return ()
    stats = details.get("module_stats")
    if not isinstance(stats, list):
        return ()
    return tuple(_module_stat(item) for item in stats if isinstance(item, Mapping) and item.get("module") is not None)


def _contributing(diagnosis: Mapping[str, Any]) -> tuple[Contributing, ...]:
    items = diagnosis.get("contributing")
    if not isinstance(items, list):
        return ()
    out = []
    for item in items:
        if isinstance(item, Mapping) and item.get("cause"):
            evidence = item.get("evidence")
            lines = tuple(str(line) for line in evidence) if isinstance(evidence, list) else ()
            out.append(Contributing(str(item["cause"]), lines))
    return tuple(out)


def _step_pointer(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _details_float(details: Any, key: str) -> float | None:
    return _optional_float(details.get(key)) if isinstance(details, Mapping) else None


def parse_event(record: Any, *, path: Path, line: int) -> EventRecord:
    """Validate the fields the report needs and flatten the diagnosis; extra keys are kept in ``raw``."""
    if not isinstance(record, Mapping):
        raise _bad(path, line, f"expected a JSON object, got {type(record).__name__}")
    step = record.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise _bad(path, line, f"'step' must be an integer >= 0, got {step!r}")
    for key in ("trigger", "action"):
        if not isinstance(record.get(key), str):
            raise _bad(path, line, f"'{key}' must be a string, got {record.get(key)!r}")
    diagnosis = record.get("diagnosis", {})
    if diagnosis is None:
        diagnosis = {}
    if not isinstance(diagnosis, Mapping):
        raise _bad(path, line, f"'diagnosis' must be an object, got {type(diagnosis).__name__}")
    evidence = diagnosis.get("evidence") or []
    fixes = diagnosis.get("fixes") or []
    if not isinstance(evidence, list) or not isinstance(fixes, list):
        raise _bad(path, line, "'diagnosis.evidence' and 'diagnosis.fixes' must be lists of strings")
    reproducible = diagnosis.get("reproducible")
    rank = record.get("rank", 0)
    return EventRecord(
        line=line,
        step=step,
        trigger=record["trigger"],
        action=record["action"],
        cause=str(diagnosis.get("cause") or "unknown"),
        phase=str(diagnosis.get("phase") or "unknown"),
        module=_optional_str(diagnosis.get("module")),
        op=_optional_str(diagnosis.get("op")),
        tensor=_optional_str(diagnosis.get("tensor")),
        confidence=_optional_float(diagnosis.get("confidence")),
        reproducible=reproducible if isinstance(reproducible, bool) else None,
        evidence=tuple(str(item) for item in evidence),
        fixes=tuple(str(item) for item in fixes),
        loss=_number_with_repr(record, "loss"),
        grad_norm=_number_with_repr(record, "grad_norm"),
        lr=_optional_float(record.get("lr")),
        rank=rank if isinstance(rank, int) and not isinstance(rank, bool) else 0,
        time=_optional_str(record.get("time")),
        lr_multiplier=_details_float(record.get("details"), "lr_multiplier"),
        same_as_step=_step_pointer(diagnosis.get("same_as_step")),
        contributing=_contributing(diagnosis),
        raw=dict(record),
    )


def load_events(path: str | Path) -> tuple[EventRecord, ...]:
    """Every event of ``events.jsonl`` in file order; blank lines are allowed (a run may be cut short)."""
    path = Path(path)
    events = []
    with open(path, encoding="utf-8") as handle:
        for line_no, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                raise _bad(path, line_no, f"not valid JSON ({exc.msg} at column {exc.colno})") from None
            events.append(parse_event(record, path=path, line=line_no))
    return tuple(events)


def _cell_float(text: str | None, *, path: Path, line: int, column: str) -> float | None:
    if text is None or not text.strip():
        return None
    try:
        return float(text)
    except ValueError:
        raise _bad(path, line, f"column '{column}' holds {text!r}, not a number") from None


def _cell_step(text: str | None, *, path: Path, line: int) -> int:
    value = _cell_float(text, path=path, line=line, column="step")
    if value is None or not math.isfinite(value) or value != int(value) or value < 0:
        raise _bad(path, line, f"column 'step' must be an integer >= 0, got {text!r}")
    return int(value)


_NUMERIC_COLUMNS = (
    "time",
    "loss",
    "grad_norm",
    "lr",
    "lr_multiplier",
    "loss_scale",
    "skipped_total",
    "rollbacks_total",
    "clipped_total",
)


def load_history(path: str | Path) -> tuple[HistoryRow, ...]:
    """Rows of ``history.csv``; missing columns read as empty, unknown columns are ignored."""
    path = Path(path)
    rows = []
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None:
            return ()
        if "step" not in reader.fieldnames:
            raise _bad(path, 1, f"the header has no 'step' column (found {', '.join(reader.fieldnames)})")
        for cells in reader:
            line = reader.line_num
            if not any((value or "").strip() for value in cells.values() if isinstance(value, str)):
                continue
            numbers = {
                column: _cell_float(cells.get(column), path=path, line=line, column=column)
                for column in _NUMERIC_COLUMNS
            }
            rows.append(
                HistoryRow(
                    step=_cell_step(cells.get("step"), path=path, line=line),
                    action=(cells.get("action") or "").strip() or "none",
                    trigger=(cells.get("trigger") or "").strip(),
                    **numbers,
                )
            )
    return tuple(rows)


def load_summary(path: str | Path) -> Mapping[str, Any]:
    path = Path(path)
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise _bad(path, exc.lineno, f"not valid JSON ({exc.msg})") from None
    if not isinstance(payload, Mapping):
        raise _bad(path, 1, f"expected a JSON object, got {type(payload).__name__}")
    return payload


def load_run(run_dir: str | os.PathLike[str]) -> RunData:
    """Load a run directory; it must exist and hold at least ``events.jsonl`` or ``history.csv``."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"run directory {str(run_dir)!r} does not exist; pass the --out folder of a guarded run")
    events_path, history_path, summary_path = (run_dir / name for name in (EVENTS_FILE, HISTORY_FILE, SUMMARY_FILE))
    has_events, has_history = events_path.is_file(), history_path.is_file()
    if not has_events and not has_history:
        raise UsageError(
            f"{run_dir} holds neither {EVENTS_FILE} nor {HISTORY_FILE}; pass the --out folder of a guarded run"
        )
    return RunData(
        run_dir=run_dir,
        events=load_events(events_path) if has_events else (),
        history=load_history(history_path) if has_history else (),
        summary=load_summary(summary_path) if summary_path.is_file() else None,
        has_events_file=has_events,
        has_history_file=has_history,
    )
