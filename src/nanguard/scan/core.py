"""The numeric core of the scan: one :class:`FieldScanner` per field, fed array chunks in row order.

Speed matters here: on clean float data a chunk costs two reductions (``min`` and ``max``, which
propagate NaN, so a finite min and max prove the whole chunk finite and in float16 range) and a tiny
strided sample. Masks, row indices and counts are computed only for a chunk whose min/max show a
problem, so a clean scan runs at about the speed of ``numpy.isfinite(a).all()``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from nanguard.scan.result import MAX_EXAMPLES, Finding

FLOAT16_MAX = 65504.0
#: Bytes per chunk: large enough that per-chunk Python overhead vanishes, small enough to stay in cache.
CHUNK_BYTES = 1 << 20

Role = Literal["label", "token", "mask", "data"]

_LABEL_WORDS = frozenset({"label", "labels", "target", "targets", "y", "class", "classes"})
_TOKEN_WORDS = frozenset({"token", "tokens"})
_MASK_WORDS = frozenset({"mask", "masks"})
_GENERIC_FIELD = re.compile(r"^(arr_\d+|\d+)?$")


@dataclass(frozen=True)
class ScanOptions:
    """What the checks compare against. ``None`` bounds switch the matching range check off."""

    num_classes: int | None = None
    vocab_size: int | None = None
    label_fields: frozenset[str] = frozenset()
    ignore_index: int | None = -100
    scale_ratio: float = 100.0
    max_examples: int = MAX_EXAMPLES


def name_words(name: str) -> list[str]:
    """Split ``input_ids``, ``trainLabels`` or ``batch.y-true`` into lower-case words."""
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", name)
    return [word for word in re.split(r"[^A-Za-z0-9]+", spaced.lower()) if word]


def role_of_name(name: str) -> Role:
    """Guess what a field or file holds from its name: class labels, token ids, a mask, or data."""
    words = name_words(name)
    if _LABEL_WORDS.intersection(words):
        return "label"
    if _TOKEN_WORDS.intersection(words) or words[-2:] == ["input", "ids"] or words == ["ids"]:
        return "token"
    if _MASK_WORDS.intersection(words):
        return "mask"
    return "data"


def field_role(field_name: str | None, file_stem: str | None, options: ScanOptions) -> Role:
    """The role of a field: ``--label-field`` wins, then the field's own name, then the file's name.

    The file name is used only when the field has no telling name of its own (a plain ``.npy``,
    ``arr_0`` in an ``.npz``, a positional ``0``/``1``), so ``labels.npy`` is checked as labels.
    """
    if field_name is not None and (
        field_name in options.label_fields or field_name.rsplit(".", 1)[-1] in options.label_fields
    ):
        return "label"
    last = None if field_name is None else field_name.rsplit(".", 1)[-1]
    if last is not None and not _GENERIC_FIELD.match(last):
        return role_of_name(last)
    if file_stem is not None:
        if file_stem in options.label_fields:
            return "label"
        return role_of_name(file_stem)
    return "data"


@dataclass(frozen=True)
class RowMap:
    """Maps positions along axis 0 of a chunk to dataset row indices, computed only when needed.

    Regular chunks: position ``i`` is row ``start + i``. Ragged chunks (``offsets``): positions
    ``offsets[k]:offsets[k+1]`` belong to segment ``k``. ``ids``, when given, names the row of each
    segment (rows a chunk skips, such as CSV cells that were empty).
    """

    start: int = 0
    offsets: np.ndarray | None = None
    ids: np.ndarray | None = None

    def segments(self) -> int:
        if self.offsets is not None:
            return len(self.offsets) - 1
        if self.ids is not None:
            return len(self.ids)
        raise ValueError("a RowMap without offsets or ids does not know its length")

    def rows_of_positions(self, positions: np.ndarray) -> np.ndarray:
        segments = (
            positions if self.offsets is None else np.searchsorted(self.offsets, positions, "right") - 1
        )
        segments = np.unique(segments)
        return self.rows_of_segments(segments)

    def rows_of_segments(self, segments: np.ndarray) -> np.ndarray:
        if self.ids is not None:
            return np.asarray(self.ids)[segments]
        return segments + self.start


@dataclass
class Tally:
    """Count of bad values, count of rows holding them, and the first rows as examples."""

    count: int = 0
    rows: int = 0
    examples: list[int] = field(default_factory=list)

    def add(self, count: int, rows: np.ndarray, limit: int) -> None:
        self.count += int(count)
        self.rows += len(rows)
        room = limit - len(self.examples)
        if room > 0:
            last = self.examples[-1] if self.examples else -1
            self.examples.extend(int(r) for r in rows[rows > last][:room])


class Sampler:
    """An evenly spaced sample of a stream of values, bounded in size whatever the stream's length.

    It keeps the values at global positions that are multiples of ``stride``; when full it keeps
    every other one and doubles the stride, so the sample stays evenly spread over the whole stream.
    """

    def __init__(self, capacity: int = 1 << 16) -> None:
        self.capacity = capacity
        self.stride = 1
        self.position = 0
        self._parts: list[np.ndarray] = []
        self._size = 0

    def add(self, flat: np.ndarray) -> None:
        first = (-self.position) % self.stride
        self.position += flat.size
        taken = np.array(flat[first :: self.stride], dtype=np.float64)
        self._parts.append(taken)
        self._size += taken.size
        while self._size > self.capacity:
            merged = np.concatenate(self._parts)[::2]
            self._parts, self._size = [merged], merged.size
            self.stride *= 2

    def values(self) -> np.ndarray:
        return np.concatenate(self._parts) if self._parts else np.empty(0)


def typical_magnitude(sample: np.ndarray) -> float | None:
    """Median |x| over finite non-zero values: robust to outliers and to sparse (mostly zero) data."""
    magnitudes = np.abs(sample[np.isfinite(sample)])
    magnitudes = magnitudes[magnitudes > 0]
    return float(np.median(magnitudes)) if magnitudes.size else None


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def plural(count: int, noun: str) -> str:
    """``1 row``, ``3 rows``."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


class FieldScanner:
    """Runs every value check on one field, chunk by chunk, and turns the tallies into findings."""

    def __init__(self, file: str, field_name: str | None, role: Role, options: ScanOptions) -> None:
        self.file = file
        self.field = field_name
        self.role = role
        self.options = options
        self.rows = 0
        self.nonfinite = Tally()
        self.nan = self.posinf = self.neginf = 0
        self.extreme = Tally()
        self.max_abs = 0.0
        self.out_of_range = Tally()
        self.ignored = 0
        self.range_min: float | None = None
        self.range_max: float | None = None
        self.empty = Tally()
        self.empty_reasons: dict[str, int] = {}
        self.sampler = Sampler()
        self.numeric = False
        # Constant check: running extremes for 1-D fields, surviving candidate columns for wider ones.
        self._can_be_constant = role not in ("token", "mask")
        self._low: float | None = None
        self._high: float | None = None
        self._columns: int | None = None
        self._reference: np.ndarray | None = None
        self._candidates: np.ndarray | None = None

    # ----------------------------------------------------------------- feeding
    def note_empty(self, rows: np.ndarray, reason: str) -> None:
        """Record rows that are empty or missing (``reason`` is said in the message)."""
        if len(rows):
            self.empty.add(len(rows), np.asarray(rows), self.options.max_examples)
            self.empty_reasons[reason] = self.empty_reasons.get(reason, 0) + len(rows)

    def count_rows(self, rows: int) -> None:
        self.rows += rows

    def update(self, values: np.ndarray, rows: RowMap | None = None) -> None:
        """Check one chunk. Axis 0 of ``values`` is rows, unless ``rows`` is ragged (then positions)."""
        rows = rows or RowMap()
        values = np.asarray(values)
        if values.ndim == 0:
            values = values.reshape(1)
        if rows.offsets is None and rows.ids is None:
            self.rows += values.shape[0]
        else:
            self.rows += rows.segments()
            if rows.offsets is not None:
                lengths = np.diff(rows.offsets)
                self.note_empty(rows.rows_of_segments(np.flatnonzero(lengths == 0)), "zero-length")
            # A ragged field's positions are not aligned columns: equal values there mean nothing.
            self._can_be_constant = self._can_be_constant and rows.offsets is None
        kind = values.dtype.kind
        if values.size == 0 or kind not in "iuf":
            if kind not in "iuf" and kind != "b":
                self._can_be_constant = False
            return
        self.numeric = True
        low, high = values.min(), values.max()
        if kind == "f":
            low, high = float(low), float(high)
            if not (math.isfinite(low) and math.isfinite(high)):
                low, high = self._count_nonfinite(values, rows)
                if low is None or high is None:
                    return
        else:
            low, high = int(low), int(high)
        if self.role in ("label", "token"):
            self._check_range(values, rows, low, high)
        elif high > FLOAT16_MAX or low < -FLOAT16_MAX:
            self._count_extreme(values, rows)
        if self._can_be_constant:
            self._track_constant(values, low, high)
        if self.role == "data":
            self.sampler.add(values.reshape(-1))

    def _bad_rows(self, mask: np.ndarray, rows: RowMap) -> np.ndarray:
        per_position = mask.reshape(mask.shape[0], -1).any(axis=1) if mask.ndim > 1 else mask
        return rows.rows_of_positions(np.flatnonzero(per_position))

    def _count_nonfinite(self, values: np.ndarray, rows: RowMap) -> tuple[float | None, float | None]:
        finite = np.isfinite(values)
        bad = ~finite
        nan = np.isnan(values)
        posinf = int(np.count_nonzero(values == np.inf))
        self.nan += int(np.count_nonzero(nan))
        self.posinf += posinf
        self.neginf += int(np.count_nonzero(bad)) - int(np.count_nonzero(nan)) - posinf
        self.nonfinite.add(int(np.count_nonzero(bad)), self._bad_rows(bad, rows), self.options.max_examples)
        # A 1-D field with NaN is not called constant (the NaN is the finding); in a table the
        # comparison with the first row already drops exactly the columns holding NaN.
        if values.ndim == 1:
            self._can_be_constant = False
        kept = values[finite]
        if kept.size == 0:
            return None, None
        return float(kept.min()), float(kept.max())

    def _count_extreme(self, values: np.ndarray, rows: RowMap) -> None:
        mask = (values > FLOAT16_MAX) | (values < -FLOAT16_MAX)
        if values.dtype.kind == "f":
            mask &= np.isfinite(values)
        count = int(np.count_nonzero(mask))
        if count:
            self.max_abs = max(self.max_abs, float(np.abs(values[mask].astype(np.float64)).max()))
            self.extreme.add(count, self._bad_rows(mask, rows), self.options.max_examples)

    def range_bound(self) -> int | None:
        if self.role == "label":
            return (
                self.options.num_classes if self.options.num_classes is not None else self.options.vocab_size
            )
        if self.role == "token":
            return self.options.vocab_size
        return None

    def _check_range(self, values: np.ndarray, rows: RowMap, low: float, high: float) -> None:
        """Class labels / token ids must be whole numbers in [0, bound); labels may be ignore_index."""
        bound = self.range_bound()
        if bound is None:
            return
        if values.dtype.kind == "f":
            finite = values[np.isfinite(values)]
            if not np.array_equal(finite, np.floor(finite)):
                return  # not integer-valued: a regression target, not class labels
        self.range_min = low if self.range_min is None else min(self.range_min, low)
        self.range_max = high if self.range_max is None else max(self.range_max, high)
        if low >= 0 and high < bound:
            return
        mask = (values < 0) | (values >= bound)
        ignore = self.options.ignore_index
        if self.role == "label" and ignore is not None and low <= ignore:
            ignored = values == ignore
            self.ignored += int(np.count_nonzero(ignored))
            mask &= ~ignored
        count = int(np.count_nonzero(mask))
        if count:
            self.out_of_range.add(count, self._bad_rows(mask, rows), self.options.max_examples)

    def _track_constant(self, values: np.ndarray, low: float, high: float) -> None:
        if values.ndim == 1:
            self._low = low if self._low is None else min(self._low, low)
            self._high = high if self._high is None else max(self._high, high)
            self._columns = 1
            return
        table = values.reshape(values.shape[0], -1)
        if self._reference is None:
            self._reference = np.array(table[0])
            self._columns = table.shape[1]
            self._candidates = np.arange(table.shape[1])
        if table.shape[1] != self._columns:
            self._can_be_constant = False
            return
        candidates = self._candidates
        assert candidates is not None
        if candidates.size == 0:
            return
        if candidates.size == self._columns:
            same = (table == self._reference).all(axis=0)
        else:
            same = (table[:, candidates] == self._reference[candidates]).all(axis=0)
        self._candidates = candidates[same]

    # ----------------------------------------------------------------- results
    def magnitude(self) -> float | None:
        """Typical |x| of this field, for comparing files; ``None`` for ids, masks and empty data."""
        if self.role != "data" or not self.numeric:
            return None
        return typical_magnitude(self.sampler.values())

    def constant_columns(self) -> list[int]:
        if not self._can_be_constant or self.rows < 2 or self._columns is None:
            return []
        if self._candidates is not None:
            return [int(c) for c in self._candidates]
        return [0] if self._low is not None and self._low == self._high else []

    def _finding(self, check: str, tally_count: int, examples: list[int], message: str) -> Finding:
        return Finding(self.file, self.field, check, tally_count, tuple(examples), message)

    def findings(self) -> list[Finding]:
        found: list[Finding] = []
        if self.nonfinite.count:
            parts = [
                f"{n} {name}"
                for n, name in ((self.nan, "NaN"), (self.posinf, "+Inf"), (self.neginf, "-Inf"))
                if n
            ]
            found.append(
                self._finding(
                    "nonfinite",
                    self.nonfinite.count,
                    self.nonfinite.examples,
                    f"{plural(self.nonfinite.count, 'non-finite value')} ({', '.join(parts)}) "
                    f"in {plural(self.nonfinite.rows, 'row')}",
                )
            )
        if self.out_of_range.count:
            found.append(self._range_finding())
        if self.extreme.count:
            found.append(
                self._finding(
                    "extreme_scale",
                    self.extreme.count,
                    self.extreme.examples,
                    f"{plural(self.extreme.count, 'finite value')} beyond the float16 range (|x| > 65504, "
                    f"largest {_fmt(self.max_abs)}) in {plural(self.extreme.rows, 'row')}; "
                    "they become inf under fp16 autocast",
                )
            )
        columns = self.constant_columns()
        if columns:
            found.append(self._constant_finding(columns))
        if self.empty.count:
            reasons = ", ".join(f"{n} {reason}" for reason, n in self.empty_reasons.items())
            found.append(
                self._finding(
                    "empty",
                    self.empty.count,
                    self.empty.examples,
                    f"{plural(self.empty.count, 'empty row')} ({reasons})",
                )
            )
        return found

    def _range_finding(self) -> Finding:
        bound = self.range_bound()
        if self.role == "label":
            check, what = "label_out_of_range", "labels"
            source = (
                "--num-classes"
                if self.options.num_classes is not None
                else "--vocab-size (no --num-classes given)"
            )
        else:
            check, what, source = "token_out_of_range", "token ids", "--vocab-size"
        message = (
            f"{self.out_of_range.count} {what} outside [0, {bound}) in {plural(self.out_of_range.rows, 'row')} "
            f"(min {_fmt(self.range_min or 0)}, max {_fmt(self.range_max or 0)}; bound from {source})"
        )
        if self.role == "label" and self.options.ignore_index is not None:
            ignore = self.options.ignore_index
            message += (
                f"; {ignore} is allowed as ignore_index ({plural(self.ignored, 'such value')} not counted)"
            )
        return self._finding(check, self.out_of_range.count, self.out_of_range.examples, message)

    def _constant_finding(self, columns: list[int]) -> Finding:
        if self._reference is None:
            return self._finding(
                "constant",
                1,
                [],
                f"all {self.rows} values equal {_fmt(float(self._low or 0))}: the field carries no information",
            )
        shown = ", ".join(str(c) for c in columns[: self.options.max_examples])
        more = ", ..." if len(columns) > self.options.max_examples else ""
        return self._finding(
            "constant",
            len(columns),
            [],
            f"{len(columns)} of {self._columns} columns hold one value in all {self.rows} rows "
            f"(columns {shown}{more}, flattened after axis 0)",
        )
