"""Files in other units: the typical magnitude of each field compared across sibling files.

This is the failure the seeds' post-mortem is about: one file of a collection saved in other units
(kWh next to Wh, x1000; cm next to mm, x10) gives a finite loss of 1e15 and no NaN anywhere.
Siblings are files of one kind in one folder. Siblings with the same fields (one collection, one
schema) are compared tightly: healthy shards of one dataset agree within a few x, so a file
``sibling_ratio`` (default 5) times off the others' median is flagged, the bound widened to twice the
spread the other siblings already show among themselves. Files of different schemas, and whole-number
fields with few distinct values (codes, class labels), are held to the loose ``scale_ratio`` (100).
"""

from __future__ import annotations

import os
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from nanguard.scan.core import FieldScanner, ScanOptions, typical_magnitude
from nanguard.scan.feed import FileScan
from nanguard.scan.interpret import comparable, fmt, measurement
from nanguard.scan.result import Finding


@dataclass(frozen=True)
class Member:
    file: FileScan
    scanner: FieldScanner
    magnitude: float
    schema: frozenset[str | None]
    tight: bool


def scale_mismatches(scans: Sequence[FileScan], options: ScanOptions, kinds: dict[str, str]) -> list[Finding]:
    """Findings for fields whose typical |x| is far off the same field's in sibling files."""
    groups: dict[tuple[str, str, str | None], list[Member]] = {}
    for file_scan in scans:
        kind = kinds[os.path.splitext(file_scan.name)[1].lower()]
        folder = os.path.dirname(file_scan.name)
        schema = _schema(file_scan)
        for name, scanner in file_scan.scanners.items():
            if not comparable(scanner):
                continue
            magnitude = typical_magnitude(scanner.sampler.values())
            if magnitude is not None:
                member = Member(file_scan, scanner, magnitude, schema, measurement(scanner))
                groups.setdefault((folder, kind, name), []).append(member)
    findings: list[Finding] = []
    for members in groups.values():
        for member in members:
            finding = _compare(member, [m for m in members if m is not member], options)
            if finding is not None:
                findings.append(finding)
    return findings


def _schema(file_scan: FileScan) -> frozenset[str | None]:
    """The fields of a file; for a bare array, its name with the digits taken out, so shards
    (``part-001.npy``, ``part-002.npy``) are one collection and ``x.npy`` and ``y.npy`` are not."""
    fields = frozenset(file_scan.scanners)
    if fields == frozenset({None}):
        stem = os.path.splitext(os.path.basename(file_scan.name))[0]
        return frozenset({"bare:" + re.sub(r"\d+", "#", stem)})
    return fields


def _compare(member: Member, others: list[Member], options: ScanOptions) -> Finding | None:
    """Compare a field with the median of its collection (itself included, so one outlier among three
    files does not move the reference); with only two files, with the other one."""
    same = [m for m in others if m.schema == member.schema]
    if member.tight and same:
        peers, threshold = same, 0.0
        spread = max(m.magnitude for m in same) / min(m.magnitude for m in same)
        threshold = min(options.scale_ratio, max(options.sibling_ratio, 2 * spread))
        kind = " with the same fields"
    elif others:
        peers, threshold, kind, spread = others, options.scale_ratio, "", 0.0
    else:
        return None
    everyone = [member.magnitude, *(m.magnitude for m in peers)]
    reference = statistics.median(everyone) if len(everyone) >= 3 else peers[0].magnitude
    ratio = member.magnitude / reference
    if 1 / threshold < ratio < threshold:
        return None
    label = "|x|" if member.scanner.field is None else f"|{member.scanner.field}|"
    if len(everyone) == 2:
        judgement = (
            f"{_ratio(ratio)} the one sibling file{kind} ({_num(reference)}): the two disagree, and one "
            "of them is likely in other units"
        )
    else:
        agree = f", whose other files agree within {spread:.1f}x" if kind and len(peers) > 1 else ""
        judgement = (
            f"{_ratio(ratio)} the median of the {len(everyone)} files{kind} ({_num(reference)}{agree}): "
            "is this file in other units or unnormalised?"
        )
    message = f"typical {label} is {_num(member.magnitude)}, {judgement}"
    return Finding(member.file.name, member.scanner.field, "scale_mismatch", member.scanner.rows, (), message)


def _num(value: float) -> str:
    return f"{value:.3g}" if not float(value).is_integer() else fmt(value)


def _ratio(ratio: float) -> str:
    return f"{ratio:.3g}x" if ratio >= 1 else f"1/{1 / ratio:.3g} of"
