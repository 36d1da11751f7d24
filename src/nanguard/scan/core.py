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
    sibling_ratio: float = 5.0
    bin_dtype: str = "uint16"
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


class FieldScanner:
    """Runs every value check on one field, chunk by chunk; :mod:`nanguard.scan.interpret` turns the
    tallies into findings and notes once the field has been read."""

    def __init__(self, file: str, field_name: str | None, role: Role, options: ScanOptions) -> None:
        self.file = file
        self.field = field_name
        self.role = role
        self.options = options
        self.rows = 0
        self.nonfinite = Tally()
        self.nan = self.posinf = self.neginf = 0
        self.spelled = 0  # non-finite values written as text ("NaN", "Infinity") in numeric rows
        self.text_nonfinite = Tally()  # rows whose whole value is such a text
        self.missing_cells = Tally()  # CSV cells pandas will read as NaN (empty, "NA", "null", ...)
        self.extreme = Tally()
        self.max_abs = 0.0
        self.out_of_range = Tally()
        self.ids_out_of_range = Tally()  # integer data outside [0, vocab): token ids if few are
        self.ids_checked = 0
        self.ignored = 0
        self.range_min: float | None = None
        self.range_max: float | None = None
        self.low: float | None = None  # finite extremes of every value seen
        self.high: float | None = None
        self.integer_dtype = True
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

    def note_missing_cells(self, rows: np.ndarray) -> None:
        """CSV cells of a numeric column that pandas' default ``read_csv`` will load as NaN."""
        if len(rows):
            self.missing_cells.add(len(rows), np.asarray(rows), self.options.max_examples)

    def note_text_nonfinite(self, row: int) -> None:
        """A row whose value is a text spelling of NaN or infinity (counted only if the field is numeric)."""
        self.text_nonfinite.add(1, np.asarray([row]), self.options.max_examples)

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
            self.integer_dtype = False
            low, high = float(low), float(high)
            if not (math.isfinite(low) and math.isfinite(high)):
                low, high = self._count_nonfinite(values, rows)
                if low is None or high is None:
                    return
        else:
            low, high = int(low), int(high)
        self.low = low if self.low is None else min(self.low, low)
        self.high = high if self.high is None else max(self.high, high)
        if self.role in ("label", "token"):
            self._check_range(values, rows, low, high)
        elif high > FLOAT16_MAX or low < -FLOAT16_MAX:
            self._count_extreme(values, rows)
        if self.role == "data" and kind in "iu" and self.options.vocab_size is not None:
            self._check_ids(values, rows, low, high)
        if self._can_be_constant:
            self._track_constant(values, low, high)
        if self.role != "token" and self.role != "mask":
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
        """Class labels / token ids must be whole numbers in [0, bound); labels may be ignore_index.

        Without a bound a label is still never negative (other than ignore_index): CrossEntropyLoss
        takes 0..C-1 whatever C is.
        """
        bound = self.range_bound()
        if bound is None and self.role == "token":
            self._note_range(low, high)
            return
        if values.dtype.kind == "f":
            finite = values[np.isfinite(values)]
            if not np.array_equal(finite, np.floor(finite)):
                return  # not integer-valued: a measurement or regression target, not class labels
        self._note_range(low, high)
        if low >= 0 and (bound is None or high < bound):
            return
        mask = (values < 0) if bound is None else (values < 0) | (values >= bound)
        ignore = self.options.ignore_index
        if self.role == "label" and ignore is not None and low <= ignore:
            ignored = values == ignore
            self.ignored += int(np.count_nonzero(ignored))
            mask &= ~ignored
        count = int(np.count_nonzero(mask))
        if count:
            self.out_of_range.add(count, self._bad_rows(mask, rows), self.options.max_examples)

    def _note_range(self, low: float, high: float) -> None:
        self.range_min = low if self.range_min is None else min(self.range_min, low)
        self.range_max = high if self.range_max is None else max(self.range_max, high)

    def _check_ids(self, values: np.ndarray, rows: RowMap, low: float, high: float) -> None:
        """Integer data while --vocab-size is given: count values outside [0, vocab) as would-be token ids;
        whether the field holds token ids at all is decided from the share in range, at the end."""
        vocab = self.options.vocab_size
        assert vocab is not None
        self.ids_checked += values.size
        if low >= 0 and high < vocab:
            return
        mask = (values < 0) | (values >= vocab)
        self.ids_out_of_range.add(int(np.count_nonzero(mask)), self._bad_rows(mask, rows), self.options.max_examples)

    def _track_constant(self, values: np.ndarray, low: float, high: float) -> None:
        if (values.ndim == 1) != (self._reference is None) and self._columns is not None:
            self._can_be_constant = False  # rows mix scalars and lists: no columns to compare
            return
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
    def constant_columns(self) -> list[int]:
        if not self._can_be_constant or self.rows < 2 or self._columns is None:
            return []
        if self._candidates is not None:
            return [int(c) for c in self._candidates]
        return [0] if self._low is not None and self._low == self._high else []

    @property
    def reference_row(self) -> np.ndarray | None:
        return self._reference

    @property
    def width(self) -> int | None:
        return self._columns

    @property
    def constant_value(self) -> float | None:
        return self._low

    def findings(self) -> list[Finding]:
        from nanguard.scan.interpret import field_findings

        return field_findings(self)
