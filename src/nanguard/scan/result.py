"""What a scan finds: one :class:`Finding` per (file, field, check), gathered in a :class:`ScanResult`.

The JSON form (``ScanResult.to_dict``) is a contract of ``nanguard scan --json``; keep its keys stable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: Every check a scan runs, in the order findings are listed for one field.
CHECKS: tuple[str, ...] = (
    "unreadable",
    "nonfinite",
    "label_out_of_range",
    "token_out_of_range",
    "extreme_scale",
    "scale_mismatch",
    "constant",
    "empty",
)

#: Examples kept per finding; enough to find the rows, small enough to read.
MAX_EXAMPLES = 10


@dataclass(frozen=True)
class Finding:
    """One problem in one field of one file.

    ``count`` counts the offending things the check is about: values for ``nonfinite``,
    ``extreme_scale`` and the range checks, rows for ``empty``, constant columns for ``constant``,
    rows of the field for ``scale_mismatch``, and bad lines/parts for ``unreadable``.
    ``examples`` are 0-based row indices (data rows; the first row after a CSV header is 0).
    """

    file: str
    field: str | None
    check: str
    count: int
    examples: tuple[int, ...]
    message: str

    def __post_init__(self) -> None:
        if self.check not in CHECKS:
            raise ValueError(f"unknown check {self.check!r}; expected one of {', '.join(CHECKS)}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "field": self.field,
            "check": self.check,
            "count": int(self.count),
            "examples": [int(row) for row in self.examples],
            "message": self.message,
        }


@dataclass
class ScanResult:
    """Findings of one scan plus what was scanned; ``exit_code`` is the CLI's exit status."""

    findings: list[Finding] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    bytes: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)  # what was assumed, and what could not be checked
    skipped: list[str] = field(default_factory=list)  # files in the folders that are not datasets

    @property
    def ok(self) -> bool:
        return not self.findings

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def by_check(self, check: str) -> list[Finding]:
        return [finding for finding in self.findings if finding.check == check]

    def to_dict(self) -> dict[str, Any]:
        return {
            "findings": [finding.to_dict() for finding in self.findings],
            "files": list(self.files),
            "bytes": int(self.bytes),
            "seconds": round(float(self.seconds), 6),
            "notes": list(self.notes),
            "skipped": list(self.skipped),
        }


def sort_findings(findings: list[Finding], file_order: list[str]) -> list[Finding]:
    """Order by file as scanned, then field, then the fixed check order: stable, diff-friendly output."""
    rank = {name: i for i, name in enumerate(file_order)}
    check_rank = {name: i for i, name in enumerate(CHECKS)}
    return sorted(
        findings,
        key=lambda f: (rank.get(f.file, len(rank)), f.file, f.field or "", check_rank[f.check]),
    )
