"""Readers for each file format. Each streams its file into a :class:`FileScan`.

A reader raises on a file it cannot read at all; the caller records that as ``unreadable``.
Damage in one part (a bad JSON line, a parquet row group) is recorded here and the read goes on.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from collections.abc import Callable
from typing import IO, Any

import numpy as np

from nanguard._optional import require
from nanguard.scan.core import RowMap
from nanguard.scan.feed import (
    FileScan,
    RecordBuffers,
    feed_array,
    is_tensor,
    join_path,
    rows_per_chunk,
    to_array,
)

Reader = Callable[[str, FileScan], None]

_BOM = b"\xef\xbb\xbf"


def _no_rows(scan: FileScan, what: str = "no data rows") -> None:
    scan.add("empty", f"the file has {what}")


# --------------------------------------------------------------------------- numpy
def read_npy(path: str, scan: FileScan) -> None:
    """Memory-mapped, so a file larger than memory is read one chunk at a time."""
    with open(path, "rb") as handle:
        if handle.read(6) != b"\x93NUMPY":
            raise ValueError("not a .npy file (it does not start with the NumPy magic bytes)")
    array = np.load(path, mmap_mode="r", allow_pickle=False)
    _feed_numpy(array, None, scan)


def _feed_numpy(array: np.ndarray, field: str | None, scan: FileScan) -> None:
    if array.size == 0:
        _no_rows(scan, "no values" if field is None else f"no values in array {field!r}")
        return
    if array.dtype.names:  # a structured array: each named field is a column
        for name in array.dtype.names:
            feed_array(scan.field(join_path(field, name)), array[name], scan.advance)
        return
    feed_array(scan.field(field), array, scan.advance)


def read_npz(path: str, scan: FileScan) -> None:
    """Streams each member out of the zip (compressed or not) instead of loading it whole."""
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                continue
            key = info.filename[: -len(".npy")]
            with archive.open(info) as member:
                _stream_npy_member(member, key, scan)


def _stream_npy_member(member: IO[bytes], key: str, scan: FileScan) -> None:
    fmt = np.lib.format
    version = fmt.read_magic(member)
    if version == (1, 0):
        shape, fortran_order, dtype = fmt.read_array_header_1_0(member)
    else:
        shape, fortran_order, dtype = fmt.read_array_header_2_0(member)
    if dtype.hasobject:
        scan.add(
            "unreadable", f"array {key!r} holds Python objects (pickled); not loaded, for safety", field=key
        )
        return
    rows = shape[0] if shape else 1
    if int(np.prod(shape, dtype=np.int64)) == 0:
        _no_rows(scan, f"no values in array {key!r}")
        return
    if fortran_order and len(shape) > 1:  # column-major: rows are not contiguous, read it whole
        data = member.read()
        _feed_numpy(np.frombuffer(data, dtype=dtype).reshape(shape, order="F"), key, scan)
        return
    row_shape = tuple(shape[1:])
    row_bytes = dtype.itemsize * int(np.prod(row_shape, dtype=np.int64))
    step = rows_per_chunk(row_shape, dtype.itemsize)
    for begin in range(0, rows, step):
        count = min(step, rows - begin)
        data = _read_exactly(member, count * row_bytes)
        if len(data) < count * row_bytes:
            scan.add(
                "unreadable",
                f"array {key!r} is truncated: {rows} rows declared, data ends in row {begin + len(data) // row_bytes}",
                field=key,
            )
            return
        chunk = np.frombuffer(data, dtype=dtype).reshape((count, *row_shape))
        if dtype.names:
            for name in dtype.names:
                scan.field(join_path(key, name)).update(chunk[name], RowMap(begin))
        else:
            scan.field(key).update(chunk, RowMap(begin))
        scan.advance(len(data))


def _read_exactly(stream: IO[bytes], size: int) -> bytes:
    parts, remaining = [], size
    while remaining > 0:
        part = stream.read(remaining)
        if not part:
            break
        parts.append(part)
        remaining -= len(part)
    return b"".join(parts)


# --------------------------------------------------------------------------- torch
class NotADataFile(Exception):
    """A file with a dataset suffix that holds something else (a checkpoint named ``.bin``): skipped."""


def read_pt(path: str, scan: FileScan) -> None:
    """``torch.load(weights_only=True)``: tensors and plain containers only, never arbitrary code.

    A file that holds other Python objects is reported and not loaded. torch's own message then
    suggests retrying with ``weights_only=False``, which would run whatever code the pickle names;
    that advice is never repeated.
    """
    torch = require("torch", extra="torch", feature="scanning .pt files")
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if _refused_pickle(exc):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) files cannot mmap
    except Exception as exc:
        if not _refused_pickle(exc):
            raise
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        named = f" (such as {found.group(1)})" if found else ""
        scan.add(
            "unreadable",
            f"holds arbitrary Python objects{named}, which torch.load(weights_only=True) refuses: not loaded, "
            "because unpickling them can run any code. To scan it, save tensors and plain dicts/lists "
            "(or safetensors) from the code that made it.",
        )
        return
    walk_object(obj, None, scan)


def _refused_pickle(exc: BaseException) -> bool:
    return isinstance(exc, pickle.UnpicklingError) or "weights only load failed" in str(exc).lower()


def read_bin(path: str, scan: FileScan) -> None:
    """A raw array of token ids with no header, as nanoGPT's prepare.py writes ``train.bin`` (uint16 by
    default; ``--bin-dtype`` for others). A PyTorch checkpoint or pickle named ``.bin`` is skipped."""
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head.startswith((b"PK\x03\x04", b"\x80")):
        raise NotADataFile("a PyTorch checkpoint or pickle, not raw token ids")
    dtype = np.dtype(scan.options.bin_dtype)
    size = os.path.getsize(path)
    if size == 0:
        _no_rows(scan, "no token ids (0 bytes)")
        return
    if size % dtype.itemsize:
        scan.add(
            "unreadable",
            f"{size} bytes is not a whole number of {dtype.name} token ids: is --bin-dtype right?",
        )
        return
    tokens = np.memmap(path, dtype=dtype, mode="r")
    feed_array(scan.field(None, "token"), tokens, scan.advance)


def walk_object(obj: Any, path: str | None, scan: FileScan) -> None:
    """Tensors are fields; dict keys and tuple positions extend the field path (``batch.labels``).

    A list is a list of samples: a list of tensors is one field whose rows are the list items
    (so zero-length items are empty rows), and a list of dicts is a table of records.
    """
    array = _as_array(obj)
    if array is not None:
        _feed_any(array, path, scan)
    elif isinstance(obj, dict):
        for key, value in obj.items():
            walk_object(value, join_path(path, key), scan)
    elif isinstance(obj, tuple):
        for index, value in enumerate(obj):
            walk_object(value, join_path(path, index), scan)
    elif isinstance(obj, list):
        if not obj:
            scan.add("empty", f"{'the list' if path is None else repr(path)} holds no samples", field=path)
            return
        records = RecordBuffers(scan, prefix=path)
        for row, item in enumerate(obj):
            records.add(row, item)
        records.flush()


def _as_array(obj: Any) -> Any:
    return obj if isinstance(obj, np.ndarray) or is_tensor(obj) else None


def _feed_any(array: Any, path: str | None, scan: FileScan) -> None:
    if isinstance(array, np.ndarray):
        _feed_numpy(array, path, scan)
    elif array.numel() == 0:
        _no_rows(scan, f"an empty tensor at {path!r}" if path else "an empty tensor")
    else:
        feed_array(scan.field(path), array, scan.advance)


# --------------------------------------------------------------------------- json
def read_jsonl(path: str, scan: FileScan) -> None:
    """Line by line; a line that is not JSON is recorded (by its 0-based line index) and skipped."""
    records = RecordBuffers(scan)
    bad: list[int] = []
    first_error = ""
    rows = 0
    with open(path, "rb") as handle:
        for index, line in enumerate(handle):
            scan.advance(len(line))
            if index == 0:
                line = line.removeprefix(_BOM)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
                bad.append(index)
                first_error = first_error or f"line {index}: {exc}"
                continue
            rows += 1
            records.add(index, record)
    records.flush()
    if bad:
        what = "1 line is" if len(bad) == 1 else f"{len(bad)} lines are"
        scan.add("unreadable", f"{what} not valid JSON (first: {first_error})", count=len(bad), examples=bad)
    if rows == 0 and not bad:
        _no_rows(scan, "no JSON records")


def read_json(path: str, scan: FileScan) -> None:
    """A list of records, a dict of equal-length columns, or one record; JSON-lines text is accepted too."""
    with open(path, "rb") as handle:
        text = handle.read().removeprefix(_BOM)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # several JSON values: it is JSON lines named .json
            read_jsonl(path, scan)
            return
        raise
    scan.advance(len(text))
    records = RecordBuffers(scan)
    if isinstance(data, list):
        if not data:
            _no_rows(scan, "an empty JSON list")
        for row, record in enumerate(data):
            records.add(row, record)
    elif isinstance(data, dict) and _is_columnar(data):
        columns = list(data.items())
        for row in range(len(columns[0][1])):
            records.add(row, {key: values[row] for key, values in columns})
    else:
        records.add(0, data)
    records.flush()


def _is_columnar(data: dict[str, Any]) -> bool:
    lengths = {len(v) if isinstance(v, list) else -1 for v in data.values()}
    return len(lengths) == 1 and next(iter(lengths)) > 0


# --------------------------------------------------------------------------- csv
def read_csv(path: str, scan: FileScan, chunk_rows: int = 65536) -> None:
    """Chunked; empty cells stay empty text (``na_filter=False``) so a missing cell and a NaN differ."""
    pd = require("pandas", extra="scan", feature="scanning .csv files")
    try:
        reader = pd.read_csv(
            path, chunksize=chunk_rows, na_filter=False, skip_blank_lines=False, low_memory=False
        )
    except pd.errors.EmptyDataError:
        _no_rows(scan, "no header and no rows")
        return
    start = 0
    blank_examples: list[int] = []
    blank_count = 0
    with reader:
        for frame in reader:
            all_empty = np.ones(len(frame), dtype=bool)
            cells: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
            for name in frame.columns:
                cells[str(name)] = _scan_csv_column(frame[name], str(name), start, scan, pd)
                all_empty &= cells[str(name)][0]
            for name, (empty, missing) in cells.items():
                if missing is None:
                    scan.field(name).note_empty(np.flatnonzero(empty & ~all_empty) + start, "empty cells")
                else:
                    scan.field(name).note_missing_cells(np.flatnonzero(missing & ~all_empty) + start)

            blank = np.flatnonzero(all_empty) + start
            blank_count += len(blank)
            blank_examples.extend(int(r) for r in blank[: scan.options.max_examples - len(blank_examples)])
            start += len(frame)
            scan.advance(int(frame.memory_usage(deep=False).sum()))
    if start == 0:
        _no_rows(scan, "a header and no data rows")
    elif blank_count:
        scan.add(
            "empty",
            (
                f"{blank_count} rows are blank or have every cell empty"
                if blank_count > 1
                else "1 row is blank or has every cell empty"
            ),
            count=blank_count,
            examples=blank_examples,
        )


#: The cell texts ``pandas.read_csv`` loads as NaN by default (its ``na_values``), empty included.
PANDAS_NA = frozenset(
    {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>",
     "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}
)


def _scan_csv_column(
    column: Any, name: str, start: int, scan: FileScan, pd: Any
) -> tuple[np.ndarray, np.ndarray | None]:
    """Scan one CSV column chunk; returns which cells are empty text and, for a numeric column, which
    cells pandas will load as NaN (the caller reports both once blank rows are known).

    In a numeric column, cells pandas will load as NaN (empty, "NA", "null", "nan", ...) are what the
    training code sees as NaN, so they are reported as such rather than as empty rows.
    """
    if column.dtype.kind in "iuf":
        scan.field(name).update(column.to_numpy(), RowMap(start))
        return np.zeros(len(column), dtype=bool), None
    text = column.astype(str).str.strip()
    empty = (text == "").to_numpy()
    missing = text.isin(PANDAS_NA).to_numpy()
    numbers = pd.to_numeric(text.where(~missing, "nan"), errors="coerce")
    failed = numbers.isna().to_numpy() & ~missing
    if failed.any() or missing.all():  # text, or nothing but missing cells: not a numeric column
        return empty, None
    kept = np.flatnonzero(~missing)
    values = numbers.to_numpy(dtype=np.float64)[kept]
    if np.array_equal(values[np.isfinite(values)], np.floor(values[np.isfinite(values)])) and np.isfinite(values).all():
        values = values.astype(np.int64)
    scan.field(name).update(values, RowMap(ids=kept + start))
    return empty, missing


# --------------------------------------------------------------------------- parquet
def read_parquet(path: str, scan: FileScan) -> None:
    """Row group by row group; a damaged row group is recorded and the next one is read."""
    pq = require("pyarrow.parquet", extra="scan", feature="scanning .parquet files", package="pyarrow")
    parquet = pq.ParquetFile(path)
    start = 0
    if parquet.metadata.num_rows == 0:
        _no_rows(scan)
        return
    for group in range(parquet.num_row_groups):
        rows = parquet.metadata.row_group(group).num_rows
        try:
            table = parquet.read_row_group(group)
        except Exception as exc:  # any arrow error here means this part of the file is damaged
            scan.add(
                "unreadable",
                f"row group {group} (rows {start}-{start + rows - 1}) cannot be read: {_one_line(exc)}",
            )
            start += rows
            continue
        while any(str(t).startswith("struct") for t in table.schema.types):
            table = table.flatten()
        for name, column in zip(table.column_names, table.columns, strict=True):
            _scan_arrow_column(column.combine_chunks(), name, start, scan)
        scan.advance(parquet.metadata.row_group(group).total_byte_size)
        start += rows


def _scan_arrow_column(array: Any, name: str, start: int, scan: FileScan) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = array.type
    valid = np.asarray(array.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    scanner = scan.field(name)
    if not valid.all():
        scanner.note_empty(np.flatnonzero(~valid) + start, "missing (null)")
    if pa.types.is_integer(kind) or pa.types.is_floating(kind):
        values = array.drop_null().to_numpy(zero_copy_only=False)
        scanner.update(values, RowMap(start) if valid.all() else RowMap(ids=np.flatnonzero(valid) + start))
    elif pa.types.is_string(kind) or pa.types.is_large_string(kind):
        empty = np.asarray(pc.equal(array, "").fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)
        scanner.note_empty(np.flatnonzero(empty) + start, "empty string")
    elif _is_list(kind):
        offsets = _list_offsets(array)
        values = array.flatten()
        while _is_list(values.type):  # nested lists: compose offsets down to the leaf values
            offsets = _list_offsets(values)[offsets]
            values = values.flatten()
        numeric = pa.types.is_integer(values.type) or pa.types.is_floating(values.type)
        numbers = values.to_numpy(zero_copy_only=False) if numeric else np.empty(0)
        if valid.all():
            scanner.update(numbers, RowMap(start, offsets=offsets))
        else:  # null lists were counted as missing; leave them out so they are not also zero-length
            kept = np.flatnonzero(valid)
            kept_offsets = np.append(offsets[kept], offsets[-1])
            scanner.update(numbers, RowMap(offsets=kept_offsets, ids=kept + start))


def _is_list(kind: Any) -> bool:
    import pyarrow as pa

    return bool(pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind))


def _list_offsets(array: Any) -> np.ndarray:
    import pyarrow.compute as pc

    lengths = pc.list_value_length(array).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


READERS: dict[str, Reader] = {
    ".npy": read_npy,
    ".npz": read_npz,
    ".pt": read_pt,
    ".pth": read_pt,
    ".csv": read_csv,
    ".parquet": read_parquet,
    ".pq": read_parquet,
    ".jsonl": read_jsonl,
    ".ndjson": read_jsonl,
    ".json": read_json,
    ".bin": read_bin,
}

#: Files of one kind are compared with each other for scale_mismatch.
KINDS: dict[str, str] = {
    ".npy": "npy",
    ".npz": "npz",
    ".pt": "pt",
    ".pth": "pt",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "json",
    ".ndjson": "json",
    ".json": "json",
    ".bin": "bin",
}

__all__ = ["KINDS", "READERS", "to_array", "walk_object"]
