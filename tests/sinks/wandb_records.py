"""Read back what an offline W&B run wrote, to test the W&B sink against the real library.

An offline run's ``run-*.wandb`` file is a LevelDB-style log: a 7-byte header (``:W&B``, a magic
number, a version), then 32 KiB blocks of chunks, each with a 7-byte header (CRC, length, type:
1 full, 2 first, 3 middle, 4 last). Every complete chunk sequence is one ``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path
from typing import Any

BLOCK = 32768
HEADER = 7


def read_records(path: Path) -> list[Any]:
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    position, pending, records = HEADER, b"", []
    while position + HEADER <= len(data):
        left_in_block = BLOCK - position % BLOCK
        if left_in_block < HEADER:  # the tail of a block too short for a header is padding
            position += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position : position + HEADER])
        pending += data[position + HEADER : position + HEADER + length]
        position += HEADER + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
        elif kind == 0 and length == 0:
            pending = b""
    return records


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def history_rows(records: list[Any]) -> list[dict[str, str]]:
    return [{_key(item): item.value_json for item in r.history.item} for r in records
            if r.WhichOneof("record_type") == "history"]


def final_summary(records: list[Any]) -> dict[str, str]:
    summary: dict[str, str] = {}
    for record in records:
        if record.WhichOneof("record_type") == "summary":
            summary.update({_key(item): item.value_json for item in record.summary.update})
    return summary


def artifacts(records: list[Any]) -> list[Any]:
    return [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]


def run_file(root: Path) -> Path:
    (path,) = root.glob("wandb/offline-run-*/run-*.wandb")
    return path


def finished_records(root: Path, patience: float = 60.0) -> list[Any]:
    """The records of the offline run under ``root`` once W&B's writer process has written the run's end.

    ``finish()`` returns when the user process is done; the writer (a separate service process) may still be
    flushing on a loaded machine, so read again until the exit record is there (or ``patience`` runs out).
    """
    deadline = time.monotonic() + patience
    while True:
        records = read_records(run_file(root))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)
