"""The human-readable table ``nanguard scan`` prints."""

from __future__ import annotations

from nanguard.scan.progress import size_text as _size
from nanguard.scan.result import ScanResult

_HEADERS = ("FILE", "FIELD", "CHECK", "COUNT", "ROWS", "MESSAGE")


def _rows_text(examples: tuple[int, ...], count: int) -> str:
    if not examples:
        return "-"
    text = ", ".join(str(r) for r in examples[:5])
    return text + (", ..." if count > 5 else "")


def render_table(result: ScanResult) -> str:
    """Aligned columns, one finding per line, then a one-line summary."""
    scanned = f"{len(result.files)} file{'s' if len(result.files) != 1 else ''} ({_size(result.bytes)}) in {result.seconds:.2f} s"
    notes = _notes(result)
    if result.ok:
        return f"no problems found in {scanned}\n{notes}"
    rows = [
        (
            f.file,
            f.field if f.field is not None else "-",
            f.check,
            str(f.count),
            _rows_text(f.examples, f.count),
            f.message,
        )
        for f in result.findings
    ]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(_HEADERS[:-1])]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip((*row[:-1],), widths, strict=True)) + "  " + row[-1]
        for row in [_HEADERS, *rows]
    ]
    files_with = len({f.file for f in result.findings})
    summary = f"{len(result.findings)} finding{'s' if len(result.findings) != 1 else ''} in {files_with} of {scanned}"
    return "\n".join(lines) + "\n\n" + summary + "\n" + notes


def _notes(result: ScanResult) -> str:
    """What the scan assumed and what it could not check: part of every honest "no problems"."""
    if not result.notes:
        return ""
    return "\nassumed and not checked:\n" + "".join(f"  - {note}\n" for note in result.notes)
