"""What a field's values say it is, and the findings and notes that follow from that.

A field's name suggests a role (``label``, ``y``, ``target``: class labels), but the values decide:
class labels are whole numbers in a small range; float values with many distinct values are a
measurement (a regression target, a GluonTS series), compared for scale across files; integers in the
Unix-time range are timestamps; integer data scanned with ``--vocab-size`` are token ids when nearly
all of them lie in ``[0, vocab)``. Each assumption is said in a note, and so is each check that could
not run (no ``--num-classes``, no ``--vocab-size``).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import numpy as np

from nanguard.scan.result import Finding

if TYPE_CHECKING:
    from nanguard.scan.core import FieldScanner

#: Unix time in seconds, ms, us and ns between 2000 and 2040.
_EPOCH_BANDS = ((9.4e8, 2.3e9), (9.4e11, 2.3e12), (9.4e14, 2.3e15), (9.4e17, 2.3e18))
_TIME_WORDS = frozenset({"ts", "time", "timestamp", "date", "datetime", "ds", "epoch", "unix", "created", "updated"})
_ID_WORDS = frozenset({"id", "ids", "idx", "index", "key", "hash", "uid", "uuid"})
#: At most this share of integer values may lie outside [0, vocab) for a field to count as token ids.
TOKEN_SHARE = 0.01
#: Whole-number fields with at most this many distinct values are categorical (class labels, codes).
CATEGORICAL_DISTINCT = 50


def _words(name: str | None) -> set[str]:
    return set(re.split(r"[^a-z0-9]+", (name or "").lower().rsplit(".", 1)[-1])) - {""}


def fmt(value: float) -> str:
    """Whole numbers as whole numbers (50300, not 5.03e+04); others to 4 significant digits."""
    if float(value).is_integer() and abs(value) < 1e16:
        return str(int(value))
    return f"{value:.4g}"


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def where(scanner: FieldScanner) -> str:
    return "the values" if scanner.field is None else f"field {scanner.field!r}"


# --------------------------------------------------------------------------- what the field is
def integral(scanner: FieldScanner) -> bool:
    """Every value is a whole number (an integer dtype, or floats that all happen to be whole)."""
    if not scanner.numeric:
        return False
    if scanner.integer_dtype:
        return True
    sample = scanner.sampler.values()
    finite = sample[np.isfinite(sample)]
    return bool(finite.size) and bool(np.array_equal(finite, np.floor(finite)))


def distinct(scanner: FieldScanner) -> int:
    sample = scanner.sampler.values()
    return int(np.unique(sample[np.isfinite(sample)]).size)


def timestamps(scanner: FieldScanner) -> bool:
    if not integral(scanner) or scanner.low is None or scanner.high is None:
        return False
    if _words(scanner.field) & _TIME_WORDS:
        return True
    return any(low <= scanner.low and scanner.high <= high for low, high in _EPOCH_BANDS)


def identifiers(scanner: FieldScanner) -> bool:
    return integral(scanner) and bool(_words(scanner.field) & _ID_WORDS)


def assumed_tokens(scanner: FieldScanner) -> bool:
    """Integer data with --vocab-size given, nearly all inside [0, vocab): token ids."""
    if scanner.role != "data" or not scanner.ids_checked or timestamps(scanner) or identifiers(scanner):
        return False
    return scanner.ids_out_of_range.count <= TOKEN_SHARE * scanner.ids_checked


def measurement(scanner: FieldScanner) -> bool:
    """A quantity (not ids, labels or codes): float values, or whole numbers with many distinct values."""
    if not scanner.numeric or scanner.role in ("token", "mask") or timestamps(scanner) or identifiers(scanner):
        return False
    if assumed_tokens(scanner):
        return False
    return not integral(scanner) or distinct(scanner) > CATEGORICAL_DISTINCT


#: A whole-number field named like labels with more distinct values than this is a count (a
#: measurement), unless --num-classes says it holds classes.
MAX_CLASSES_GUESSED = 1000


def class_labels(scanner: FieldScanner) -> bool:
    if scanner.role != "label" or not integral(scanner):
        return False
    return scanner.options.num_classes is not None or distinct(scanner) <= MAX_CLASSES_GUESSED


def comparable(scanner: FieldScanner) -> bool:
    """Worth comparing for scale across files: numeric fields but class labels, ids, tokens, masks, times."""
    if not scanner.numeric or scanner.role in ("token", "mask") or class_labels(scanner):
        return False
    return not (timestamps(scanner) or identifiers(scanner) or assumed_tokens(scanner))


# --------------------------------------------------------------------------- findings
def field_findings(scanner: FieldScanner) -> list[Finding]:
    found: list[Finding] = []
    nonfinite = _nonfinite(scanner)
    if nonfinite is not None:
        found.append(nonfinite)
    if scanner.out_of_range.count and (scanner.role == "token" or class_labels(scanner)):
        found.append(_range_finding(scanner))
    if scanner.ids_out_of_range.count and assumed_tokens(scanner):
        found.append(_assumed_token_finding(scanner))
    if scanner.extreme.count and not _exempt_from_fp16_range(scanner):
        found.append(_extreme_finding(scanner))
    columns = scanner.constant_columns()
    if columns:
        found.append(_constant_finding(scanner, columns))
    if scanner.empty.count:
        reasons = ", ".join(f"{n} {reason}" for reason, n in scanner.empty_reasons.items())
        found.append(
            _finding(scanner, "empty", scanner.empty.count, scanner.empty.examples,
                     f"{plural(scanner.empty.count, 'empty row')} ({reasons})")
        )
    return found


def _exempt_from_fp16_range(scanner: FieldScanner) -> bool:
    """Timestamps, identifiers and token ids are never cast to float16: their size is not a hazard."""
    return assumed_tokens(scanner) or (integral(scanner) and (timestamps(scanner) or identifiers(scanner)))


def _finding(scanner: FieldScanner, check: str, count: int, examples: list[int], message: str) -> Finding:
    return Finding(scanner.file, scanner.field, check, count, tuple(examples), message)


def _nonfinite(scanner: FieldScanner) -> Finding | None:
    text_rows = scanner.text_nonfinite if scanner.numeric else None
    count = scanner.nonfinite.count + (text_rows.count if text_rows else 0) + scanner.missing_cells.count
    if not count:
        return None
    parts = []
    if scanner.nonfinite.count:
        kinds = [f"{n} {name}" for n, name in ((scanner.nan, "NaN"), (scanner.posinf, "+Inf"), (scanner.neginf, "-Inf")) if n]
        parts.append(
            f"{plural(scanner.nonfinite.count, 'non-finite value')} ({', '.join(kinds)}) in "
            f"{plural(scanner.nonfinite.rows, 'row')}"
        )
    spelled = scanner.spelled + (text_rows.count if text_rows else 0)
    if spelled:
        parts.append(
            f"{spelled} of them written as text (\"NaN\", \"Infinity\"), which float() and pandas read as "
            "non-finite numbers"
        )
    if scanner.missing_cells.count:
        parts.append(
            f"{plural(scanner.missing_cells.count, 'cell')} empty or spelling a missing value (\"NA\", \"null\", "
            "\"\"), which pandas.read_csv loads as NaN"
        )
    rows = sorted({*scanner.nonfinite.examples, *(text_rows.examples if text_rows else []), *scanner.missing_cells.examples})
    return _finding(scanner, "nonfinite", count, rows[: scanner.options.max_examples], "; ".join(parts))


def _range_finding(scanner: FieldScanner) -> Finding:
    bound = scanner.range_bound()
    low, high = fmt(scanner.range_min or 0), fmt(scanner.range_max or 0)
    count, rows = scanner.out_of_range.count, scanner.out_of_range.rows
    if scanner.role == "token":
        message = f"{count} token ids outside [0, {bound}) in {plural(rows, 'row')} (min {low}, max {high}; bound from --vocab-size)"
        return _finding(scanner, "token_out_of_range", count, scanner.out_of_range.examples, message)
    ignore = scanner.options.ignore_index
    if bound is None:
        message = (
            f"{count} labels are negative in {plural(rows, 'row')} (min {low}): CrossEntropyLoss takes only "
            f"0..C-1 and ignore_index ({ignore}); if your loss ignores {low}, pass --ignore-index {low}"
        )
    else:
        source = "--num-classes" if scanner.options.num_classes is not None else "--vocab-size (no --num-classes given)"
        message = f"{count} labels outside [0, {bound}) in {plural(rows, 'row')} (min {low}, max {high}; bound from {source})"
        if scanner.range_min == 1 and scanner.range_max == bound and bound > 1:
            message += f"; labels run 1..{bound} with no 0: they look 1-based (subtract 1)"
    if ignore is not None:
        message += f"; {ignore} is allowed as ignore_index ({plural(scanner.ignored, 'such value')} not counted)"
    return _finding(scanner, "label_out_of_range", count, scanner.out_of_range.examples, message)


def _assumed_token_finding(scanner: FieldScanner) -> Finding:
    tally, vocab = scanner.ids_out_of_range, scanner.options.vocab_size
    message = (
        f"{tally.count} integer values outside [0, {vocab}) in {plural(tally.rows, 'row')} (min "
        f"{fmt(scanner.low or 0)}, max {fmt(scanner.high or 0)}); the other "
        f"{scanner.ids_checked - tally.count} are valid ids, so this field was checked as token ids "
        "(integers, --vocab-size given): an embedding lookup of these ids fails"
    )
    return _finding(scanner, "token_out_of_range", tally.count, tally.examples, message)


def _extreme_finding(scanner: FieldScanner) -> Finding:
    tally = scanner.extreme
    return _finding(
        scanner, "extreme_scale", tally.count, tally.examples,
        f"{plural(tally.count, 'finite value')} beyond the float16 range (|x| > 65504, largest "
        f"{fmt(scanner.max_abs)}) in {plural(tally.rows, 'row')}; they become inf under fp16 autocast",
    )


def _constant_finding(scanner: FieldScanner, columns: list[int]) -> Finding:
    if scanner.reference_row is None:
        return _finding(
            scanner, "constant", 1, [],
            f"all {scanner.rows} values equal {fmt(float(scanner.constant_value or 0))}: the field carries no information",
        )
    limit = scanner.options.max_examples
    shown = ", ".join(str(c) for c in columns[:limit]) + (", ..." if len(columns) > limit else "")
    return _finding(
        scanner, "constant", len(columns), [],
        f"{len(columns)} of {scanner.width} columns hold one value in all {scanner.rows} rows "
        f"(columns {shown}, flattened after axis 0)",
    )


# --------------------------------------------------------------------------- notes
def field_notes(scanner: FieldScanner) -> list[str]:
    """What was assumed about this field, and what could not be checked."""
    if not scanner.numeric:
        return []
    what = where(scanner)
    low, high = fmt(scanner.low or 0), fmt(scanner.high or 0)
    options = scanner.options
    if scanner.role == "label" and not class_labels(scanner):
        kind = "non-whole values" if not integral(scanner) else "whole numbers"
        return [f"{what}: named like labels but holds {kind} ({distinct(scanner)} distinct in the sample): "
                "treated as a measurement, not class labels, and compared for scale with sibling files"]
    if class_labels(scanner) and options.num_classes is None and options.vocab_size is None:
        note = (f"{what}: class labels {low}..{high}; no --num-classes, so the class count was not checked "
                f"(the model needs at least {fmt((scanner.high or 0) + 1)} outputs); negatives were checked")
        if scanner.low == 1:
            note += "; no label is 0: if they are 1-based, CrossEntropyLoss needs them minus 1"
        return [note]
    if scanner.role == "token" and options.vocab_size is None:
        return [f"{what}: token ids {low}..{high}, not range-checked: pass --vocab-size"]
    if assumed_tokens(scanner):
        return [f"{what}: integers with --vocab-size given, {fmt(scanner.ids_checked - scanner.ids_out_of_range.count)} "
                f"of {fmt(scanner.ids_checked)} inside [0, {options.vocab_size}): checked as token ids"]
    if timestamps(scanner):
        return [f"{what}: integers {low}..{high} read as timestamps: not checked against float16's range "
                "or compared for scale"]
    return []
