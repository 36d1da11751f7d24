"""Scan files, folders and in-memory datasets: discovery, per-file readers, cross-file scale checks."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from nanguard.errors import UsageError
from nanguard.scan.collection import scale_mismatches
from nanguard.scan.core import Role, ScanOptions
from nanguard.scan.feed import FileScan, RecordBuffers, feed_array, is_tensor, tensor_to_numpy
from nanguard.scan.formats import KINDS, READERS, NotADataFile, walk_object
from nanguard.scan.progress import Progress
from nanguard.scan.result import Finding, ScanResult, sort_findings

SUPPORTED = ", ".join(sorted(READERS))
BIN_DTYPES = ("uint16", "uint32", "int32", "int64")


def make_options(
    num_classes: int | None = None,
    vocab_size: int | None = None,
    label_field: str | Iterable[str] | None = None,
    ignore_index: int | None = -100,
    scale_ratio: float = 100.0,
    sibling_ratio: float = 5.0,
    bin_dtype: str = "uint16",
) -> ScanOptions:
    """Validated options; a bad value raises :class:`UsageError` naming the argument."""
    for name, value in (("num_classes", num_classes), ("vocab_size", vocab_size)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1
        ):
            raise UsageError(f"{name} must be a positive integer, got {value!r}")
    for name, ratio in (("scale_ratio", scale_ratio), ("sibling_ratio", sibling_ratio)):
        if not ratio > 1:
            raise UsageError(f"{name} must be greater than 1, got {ratio!r}")
    if bin_dtype not in BIN_DTYPES:
        raise UsageError(f"bin_dtype must be one of {', '.join(BIN_DTYPES)}, got {bin_dtype!r}")
    fields = [label_field] if isinstance(label_field, str) else list(label_field or [])
    return ScanOptions(
        num_classes=None if num_classes is None else int(num_classes),
        vocab_size=None if vocab_size is None else int(vocab_size),
        label_fields=frozenset(fields),
        ignore_index=ignore_index,
        scale_ratio=float(scale_ratio),
        sibling_ratio=float(sibling_ratio),
        bin_dtype=bin_dtype,
    )


def discover(paths: Sequence[str | os.PathLike[str]], skipped: list[str] | None = None) -> list[str]:
    """Dataset files under ``paths`` in a stable order; hidden files and folders are skipped.

    A missing path, or a file given by name in a format the scanner does not read, is bad usage;
    files of other types found in a folder are appended to ``skipped`` (so the output can say so).
    """
    if not paths:
        raise UsageError("no path given: name one or more dataset files or folders")
    found: list[str] = []
    for given in paths:
        path = os.fspath(given)
        if os.path.isdir(path):
            before = len(found)
            for folder, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(names):
                    if name.startswith("."):
                        continue
                    if _suffix(name) in READERS:
                        found.append(os.path.join(folder, name))
                    elif skipped is not None:
                        skipped.append(os.path.join(folder, name))
            if len(found) == before:
                raise UsageError(f"no dataset files found under {path!r} (looked for {SUPPORTED})")
        elif os.path.isfile(path):
            if _suffix(path) not in READERS:
                raise UsageError(f"cannot scan {path!r}: unknown file type (supported: {SUPPORTED})")
            found.append(path)
        else:
            raise UsageError(f"path not found: {path!r}")
    return list(dict.fromkeys(found))


def _suffix(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def scan_paths(
    paths: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
    *,
    num_classes: int | None = None,
    vocab_size: int | None = None,
    label_field: str | Iterable[str] | None = None,
    ignore_index: int | None = -100,
    scale_ratio: float = 100.0,
    sibling_ratio: float = 5.0,
    bin_dtype: str = "uint16",
    progress: Progress | None = None,
) -> ScanResult:
    """Scan dataset files and folders (recursively). Unreadable files become findings; the scan goes on."""
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    options = make_options(
        num_classes, vocab_size, label_field, ignore_index, scale_ratio, sibling_ratio, bin_dtype
    )
    skipped: list[str] = []
    files = discover(paths, skipped)
    sizes = [os.path.getsize(f) for f in files]
    started = time.perf_counter()
    progress = progress if progress is not None else Progress(sum(sizes))
    findings: list[Finding] = []
    scanned: list[FileScan] = []
    notes: list[str] = []
    done = 0
    try:
        for path, size in zip(files, sizes, strict=True):
            progress.file(os.path.basename(path))
            try:
                file_scan = scan_file(path, options, progress.advance)
            except NotADataFile as exc:
                notes.append(f"{path}: skipped, {exc}")
                continue
            scanned.append(file_scan)
            findings.extend(file_scan.findings())
            notes.extend(file_scan.notes())
            done += size
            progress.done = done
    finally:
        progress.close()
    findings.extend(scale_mismatches(scanned, options, KINDS))
    if skipped:
        kinds = sorted({_suffix(p) or "(no extension)" for p in skipped})
        notes.append(
            f"skipped {len(skipped)} file{'s' if len(skipped) != 1 else ''} of types nanguard scan does not "
            f"read ({', '.join(kinds)}): {', '.join(skipped[:5])}{', ...' if len(skipped) > 5 else ''}"
        )
    return ScanResult(
        findings=sort_findings(findings, files),
        files=[f.name for f in scanned],
        bytes=sum(sizes),
        seconds=time.perf_counter() - started,
        notes=notes,
        skipped=skipped,
    )


def scan_file(path: str, options: ScanOptions, advance: Any = None) -> FileScan:
    """Scan one file; any failure to read it is recorded as an ``unreadable`` finding."""
    stem = os.path.splitext(os.path.basename(path))[0]
    file_scan = FileScan(path, stem, options) if advance is None else FileScan(path, stem, options, advance)
    try:
        READERS[_suffix(path)](path, file_scan)
    except NotADataFile:
        raise
    except MemoryError:
        file_scan.add("unreadable", "ran out of memory reading this file")
    except Exception as exc:  # one damaged file must not stop the scan of the others
        file_scan.add("unreadable", f"cannot read: {_describe(exc)}")
    return file_scan


def _describe(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --------------------------------------------------------------------------- in memory
def scan_dataset(
    obj: Any,
    *,
    num_classes: int | None = None,
    vocab_size: int | None = None,
    label_field: str | Iterable[str] | None = None,
    ignore_index: int | None = -100,
    name: str = "<dataset>",
) -> ScanResult:
    """Scan an in-memory array, tensor, dict of arrays, DataFrame, ``Dataset`` or ``DataLoader``.

    Field names: ``None`` for a bare array or tensor, keys for dicts (``batch.labels`` when nested),
    positions ``0``, ``1`` for tuple items such as a ``TensorDataset``'s. In an ``(inputs, target)``
    pair, an integer target at position 1 is checked as class labels. Rows are dataset indices (for a
    DataLoader: sample positions in iteration order).
    """
    options = make_options(num_classes, vocab_size, label_field, ignore_index)
    started = time.perf_counter()
    file_scan = FileScan(name, None, options)
    _scan_object(obj, file_scan)
    return ScanResult(
        findings=sort_findings(file_scan.findings(), [name]),
        files=[],
        bytes=_nbytes(obj),
        seconds=time.perf_counter() - started,
        notes=file_scan.notes(),
    )


def _scan_object(obj: Any, file_scan: FileScan) -> None:
    module = type(obj).__module__
    if isinstance(obj, np.ndarray) or is_tensor(obj):
        walk_object(obj, None, file_scan)
    elif module.startswith("pandas") and hasattr(obj, "columns"):
        for column in obj.columns:
            feed_array(file_scan.field(str(column)), obj[column].to_numpy())
    elif isinstance(obj, dict | tuple):
        walk_object(obj, None, file_scan)
    elif _is_dataloader(obj):
        _scan_batches(obj, file_scan)
    elif hasattr(obj, "__getitem__") and hasattr(obj, "__len__") and not isinstance(obj, list):
        records = RecordBuffers(file_scan)
        for row in range(len(obj)):
            records.add(row, obj[row])
        records.flush()
    elif isinstance(obj, list):
        walk_object(obj, None, file_scan)
    elif hasattr(obj, "__iter__"):
        records = RecordBuffers(file_scan)
        for row, item in enumerate(obj):
            records.add(row, item)
        records.flush()
    else:
        raise UsageError(
            f"cannot scan an object of type {type(obj).__name__}: pass an array, tensor, dict, Dataset or DataLoader"
        )


def _is_dataloader(obj: Any) -> bool:
    return any(
        cls.__name__ == "DataLoader" and cls.__module__.startswith("torch") for cls in type(obj).__mro__
    )


def _scan_batches(loader: Iterable[Any], file_scan: FileScan) -> None:
    """Each batch's tensors have rows along axis 0; rows are numbered across batches."""
    records = RecordBuffers(file_scan)
    row = 0
    for batch in loader:
        fields = _batch_fields(batch)
        size = 0
        pair = isinstance(batch, tuple | list) and len(batch) == 2
        for path, value in fields:
            array = value if isinstance(value, np.ndarray) else None
            if array is None and is_tensor(value):
                array = tensor_to_numpy(value)
            if array is not None and array.ndim > 0:
                role: Role | None = "label" if pair and path == "1" and array.dtype.kind in "iu" else None
                feed_array(file_scan.field(path, role), array, start=row)
                size = max(size, array.shape[0])
            elif isinstance(value, list):
                for offset, item in enumerate(value):
                    records.add(row + offset, {path: item} if path is not None else item)
                size = max(size, len(value))
        row += size
    records.flush()


def _batch_fields(batch: Any, prefix: str | None = None) -> list[tuple[str | None, Any]]:
    """A batch's fields: dict keys (nested with dots) and, at the top, the positions of a collated tuple.

    ``default_collate`` turns ``(x, y)`` samples into a list ``[x_batch, y_batch]``, so a top-level
    list is positional; a list under a key holds one item per row (a custom collate of ragged data).
    """
    if isinstance(batch, dict):
        out: list[tuple[str | None, Any]] = []
        for key, value in batch.items():
            out.extend(_batch_fields(value, str(key) if prefix is None else f"{prefix}.{key}"))
        return out
    if prefix is None and isinstance(batch, tuple | list):
        out = []
        for index, value in enumerate(batch):
            out.extend(_batch_fields(value, str(index)))
        return out
    return [(prefix, batch)]


def _nbytes(obj: Any) -> int:
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes)
    if is_tensor(obj):
        return int(obj.element_size() * obj.numel())
    return 0
