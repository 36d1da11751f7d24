"""Turning arrays, tensors and per-row Python values into chunks for the field scanners.

:class:`FileScan` holds the scanners of one file (or one in-memory object); readers for each
format and :func:`nanguard.scan.scan_dataset` call :func:`feed_array` for columnar data and
:class:`RowBuffer` for data that arrives one row at a time (JSON lines, dataset items).
"""

from __future__ import annotations

import itertools
import numbers
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from nanguard.scan.core import CHUNK_BYTES, FieldScanner, Role, RowMap, ScanOptions, field_role
from nanguard.scan.result import Finding

Advance = Callable[[int], None]


def _no_progress(_: int) -> None:
    pass


class FileScan:
    """The scanners and file-level findings of one file; ``name`` is what findings call the file."""

    def __init__(
        self, name: str, stem: str | None, options: ScanOptions, advance: Advance = _no_progress
    ) -> None:
        self.name = name
        self.stem = stem
        self.options = options
        self.advance = advance
        self.scanners: dict[str | None, FieldScanner] = {}
        self.extra: list[Finding] = []

    def field(self, name: str | None, role: Role | None = None) -> FieldScanner:
        scanner = self.scanners.get(name)
        if scanner is None:
            scanner = FieldScanner(
                self.name, name, role or field_role(name, self.stem, self.options), self.options
            )
            self.scanners[name] = scanner
        return scanner

    def add(
        self,
        check: str,
        message: str,
        *,
        field: str | None = None,
        count: int = 1,
        examples: Iterable[int] = (),
    ) -> None:
        rows = tuple(int(r) for r in examples)[: self.options.max_examples]
        self.extra.append(Finding(self.name, field, check, count, rows, message))

    def findings(self) -> list[Finding]:
        found = list(self.extra)
        for scanner in self.scanners.values():
            found.extend(scanner.findings())
        return found

    def notes(self) -> list[str]:
        """What was assumed about each field and what could not be checked, prefixed by the file name."""
        from nanguard.scan.interpret import field_notes

        return [f"{self.name}: {note}" for scanner in self.scanners.values() for note in field_notes(scanner)]


def rows_per_chunk(row_shape: tuple[int, ...], itemsize: int) -> int:
    row_bytes = max(1, int(np.prod(row_shape, dtype=np.int64)) * itemsize)
    return max(1, CHUNK_BYTES // row_bytes)


def feed_array(scanner: FieldScanner, array: Any, advance: Advance = _no_progress, start: int = 0) -> None:
    """Scan an array (ndarray, memmap or CPU tensor) in chunks along axis 0, never copying it whole."""
    if is_tensor(array):
        array = array.detach()
        if array.ndim == 0:
            array = array.reshape(1)
        step = rows_per_chunk(tuple(array.shape[1:]), array.element_size())
        for begin in range(0, array.shape[0], step):
            chunk = tensor_to_numpy(array[begin : begin + step])
            scanner.update(chunk, RowMap(start + begin))
            advance(chunk.nbytes)
        if array.shape[0] == 0:
            scanner.update(np.empty((0,), dtype=np.float32))
        return
    array = np.asarray(array) if not isinstance(array, np.ndarray) else array
    if array.ndim == 0:
        array = array.reshape(1)
    if array.shape[0] == 0:
        scanner.update(np.asarray(array))
        return
    step = rows_per_chunk(array.shape[1:], array.dtype.itemsize)
    for begin in range(0, array.shape[0], step):
        chunk = np.asarray(array[begin : begin + step])  # a plain view of a memmap: no subclass overhead
        scanner.update(chunk, RowMap(start + begin))
        advance(chunk.nbytes)


def is_tensor(value: Any) -> bool:
    """A torch tensor, recognised without importing torch."""
    return type(value).__module__.startswith("torch") and hasattr(value, "element_size")


def tensor_to_numpy(tensor: Any) -> np.ndarray:
    """CPU numpy view of a tensor; dtypes numpy lacks (bfloat16, float8) are widened to float32."""
    import torch

    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    if tensor.is_complex():
        tensor = torch.view_as_real(tensor)
    try:
        return tensor.numpy()
    except (TypeError, RuntimeError):
        return tensor.float().numpy() if tensor.is_floating_point() else tensor.to(torch.int64).numpy()


#: Text that ``float()``, ``json`` exports of pandas/JavaScript and ``pandas.to_numeric`` read as non-finite.
_NONFINITE_TEXT = {
    "nan": float("nan"), "-nan": float("nan"), "+nan": float("nan"),
    "inf": float("inf"), "+inf": float("inf"), "-inf": float("-inf"),
    "infinity": float("inf"), "+infinity": float("inf"), "-infinity": float("-inf"),
}


def spelled_number(text: str) -> float | None:
    """``float('nan')``/``inf`` for a text spelling of a non-finite number ("NaN", "-Infinity"), else None."""
    if len(text) > 9:
        return None
    return _NONFINITE_TEXT.get(text.strip().lower())


def to_array(value: Any) -> np.ndarray | None:
    """A numeric array for a row value (number, list, nested ragged list, tensor), else ``None``."""
    if isinstance(value, np.ndarray):
        return value
    if is_tensor(value):
        return tensor_to_numpy(value)
    if isinstance(value, bool | numbers.Number):
        return np.asarray(value)
    if isinstance(value, list | tuple):
        try:
            array = np.asarray(value)
        except ValueError:  # ragged nesting
            array = np.asarray(value, dtype=object)
        if array.dtype.kind in "iufb":
            return array
        flat = list(_leaves(value))
        if flat and all(isinstance(v, bool | numbers.Number) for v in flat):
            return np.asarray(flat)
        if not flat:
            return np.empty(0)
    return None


def _leaves(value: Any) -> Iterable[Any]:
    if isinstance(value, list | tuple):
        for item in value:
            yield from _leaves(item)
    else:
        yield value


class RowBuffer:
    """Collects one field's values row by row and hands them to its scanner in stacked chunks.

    Rows of one shape are stacked into a regular chunk; rows of differing lengths become a ragged
    chunk (flat values plus offsets), so zero-length rows are found and row indices stay exact.
    Plain Python numbers and flat lists are kept as they are and converted once per chunk: the
    per-row cost is what limits a JSON-lines scan.
    """

    def __init__(self, scanner: FieldScanner, flush_rows: int = 4096) -> None:
        self.scanner = scanner
        self.flush_rows = flush_rows
        self._rows: list[int] = []
        self._values: list[Any] = []
        self._elements = 0

    def add(self, row: int, value: Any) -> None:
        kind = type(value)
        if kind is int or kind is float:
            self._append(row, value, 1)
        elif kind is list:
            if value:
                if any(type(v) is str for v in value):
                    value = self._unspell(value)
                self._append(row, value, len(value))
            else:
                self.scanner.note_empty(np.asarray([row]), "zero-length")
                self.scanner.count_rows(1)
        elif value is None:
            self.scanner.note_empty(np.asarray([row]), "missing (null)")
        elif isinstance(value, str | bytes):
            if len(value) == 0:
                self.scanner.note_empty(np.asarray([row]), "empty string")
            elif isinstance(value, str) and spelled_number(value) is not None:
                self.scanner.note_text_nonfinite(row)
        else:
            array = to_array(value)
            if array is None:
                return
            if array.ndim > 0 and array.size == 0:
                self.scanner.note_empty(np.asarray([row]), "zero-length")
                self.scanner.count_rows(1)
                return
            self._append(row, array, array.size)

    def _unspell(self, values: list[Any]) -> list[Any]:
        """A list of numbers with some written as text ("NaN", "Infinity", as pandas and JavaScript export
        them) becomes numbers, each text counted; a list with other text is left as it is."""
        converted = [spelled_number(v) if type(v) is str else v for v in values]
        if any(v is None for v in converted):
            return values
        self.scanner.spelled += sum(1 for v in values if type(v) is str)
        return converted

    def _append(self, row: int, value: Any, size: int) -> None:
        self._rows.append(row)
        self._values.append(value)
        self._elements += size
        if len(self._rows) >= self.flush_rows or self._elements >= (1 << 18):
            self.flush()

    def flush(self) -> None:
        if not self._rows:
            return
        rows, values = np.asarray(self._rows), self._values
        self._rows, self._values, self._elements = [], [], 0
        plain = _plain_chunk(values)
        if plain is not None:
            array, offsets = plain
            self.scanner.update(array, RowMap(offsets=offsets, ids=rows))
            return
        arrays = [to_array(v) for v in values]
        kept = [i for i, a in enumerate(arrays) if a is not None]
        if len(kept) < len(arrays):  # rows that hold no numbers (e.g. lists of strings)
            rows, arrays = rows[kept], [arrays[i] for i in kept]
            if not arrays:
                return
        numeric = [a for a in arrays if a is not None]
        first_shape = numeric[0].shape
        if all(a.shape == first_shape for a in numeric):
            self.scanner.update(np.stack(numeric), RowMap(ids=rows))
            return
        flats = [a.reshape(-1) for a in numeric]
        offsets = np.zeros(len(flats) + 1, dtype=np.int64)
        np.cumsum([f.size for f in flats], out=offsets[1:])
        self.scanner.update(np.concatenate(flats), RowMap(offsets=offsets, ids=rows))


def _plain_chunk(values: list[Any]) -> tuple[np.ndarray, np.ndarray | None] | None:
    """Rows that are all Python numbers, or all flat lists of numbers, as one array (+ offsets if ragged)."""
    first = type(values[0])
    if first is int or first is float:
        if all(type(v) is int or type(v) is float for v in values):
            array = np.asarray(values)
            return (array, None) if array.dtype.kind in "iuf" else None
        return None
    if first is not list or not all(type(v) is list for v in values):
        return None
    lengths = [len(v) for v in values]
    if min(lengths) == max(lengths):
        try:
            array = np.asarray(values)
        except ValueError:
            return None
        return (array, None) if array.dtype.kind in "iuf" and array.ndim == 2 else None
    flat = list(itertools.chain.from_iterable(values))
    if not all(type(v) is int or type(v) is float for v in flat):
        return None
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return np.asarray(flat), offsets


class RecordBuffers:
    """Row buffers for every field of a stream of records (dicts, tuples, tensors, numbers)."""

    def __init__(self, scan: FileScan, prefix: str | None = None) -> None:
        self.scan = scan
        self.prefix = prefix
        self.buffers: dict[str | None, RowBuffer] = {}

    def add(self, row: int, record: Any) -> None:
        for path, value in flatten_record(record, self.prefix):
            buffer = self.buffers.get(path)
            if buffer is None:
                role = _positional_role(path, self.prefix, record)
                buffer = self.buffers[path] = RowBuffer(self.scan.field(path, role))
            buffer.add(row, value)

    def flush(self) -> None:
        for buffer in self.buffers.values():
            buffer.flush()


def _positional_role(path: str | None, prefix: str | None, record: Any) -> Role | None:
    """In an ``(inputs, target)`` pair the target sits at position 1: check it as labels if integral."""
    if path == join_path(prefix, 1) and isinstance(record, tuple) and len(record) == 2:
        array = to_array(record[1])
        if array is not None and array.dtype.kind in "iu":
            return "label"
    return None


def join_path(prefix: str | None, key: Any) -> str:
    return str(key) if prefix is None else f"{prefix}.{key}"


def flatten_record(record: Any, prefix: str | None = None) -> list[tuple[str | None, Any]]:
    """``{"a": {"b": 1}, "c": [..]}`` -> ``[("a.b", 1), ("c", [..])]``.

    Tuples are positional fields (``0``, ``1``); a list of dicts (chat messages) gathers each key's
    values under one path, so one row keeps one value per path; other lists are values.
    """
    if isinstance(record, dict):
        out: list[tuple[str | None, Any]] = []
        for key, value in record.items():
            key_path = str(key) if prefix is None else f"{prefix}.{key}"
            if isinstance(value, dict | tuple) or (
                type(value) is list and value and isinstance(value[0], dict)
            ):
                out.extend(flatten_record(value, key_path))
            else:
                out.append((key_path, value))
        return out
    if isinstance(record, tuple):
        out = []
        for index, value in enumerate(record):
            out.extend(flatten_record(value, join_path(prefix, index)))
        return out
    if isinstance(record, list) and record and all(isinstance(item, dict) for item in record):
        gathered: dict[str | None, list[Any]] = {}
        for item in record:
            for path, value in flatten_record(item, prefix):
                gathered.setdefault(path, []).append(value)
        return [(path, _merge(values)) for path, values in gathered.items()]
    return [(prefix, record)]


def _merge(values: list[Any]) -> Any:
    """One row value from several (one per list element): first empty/missing wins, else all numbers."""
    for value in values:
        if value is None or (isinstance(value, str | bytes | list) and len(value) == 0):
            return value
    if all(isinstance(v, str | bytes) for v in values):
        return values[0]
    arrays = [to_array(v) for v in values]
    numeric = [a.reshape(-1) for a in arrays if a is not None]
    return np.concatenate(numeric) if numeric else None
