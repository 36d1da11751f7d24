"""Real-world-shaped datasets for ``nanguard scan``, each built in a folder with the findings expected.

The layouts are the ones people keep: GluonTS/Monash JSON lines (``{"start", "target": [...]}``),
Nixtla long tables (``unique_id, ds, y``) as CSV and parquet, plain CSV with a ``value`` column,
nanoGPT's raw ``train.bin``/``val.bin`` token files, token ids saved as a plain ``train.npy``,
classification labels with -1 or 1-based classes, exports that write NaN as text. Each case returns
the scan options and the exact set of ``(file, field, check)`` findings a reviewer expects; also
used by ``benchmarks/lint_precision.py`` to report scan's findings on the corpus.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

Expected = set[tuple[str, str | None, str]]


@dataclass
class Case:
    options: dict[str, Any]
    expected: Expected
    notes: list[str] = field(default_factory=list)  # substrings the notes must contain


def _series(rng: np.random.Generator, length: int, level: float) -> list[float]:
    season = np.sin(np.arange(length) * 2 * np.pi / 24)
    return [round(float(v), 4) for v in level * (1 + 0.3 * season + 0.05 * rng.standard_normal(length))]


def _gluonts(folder: Path, scales: dict[str, float], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for name, scale in scales.items():
        with (folder / name).open("w") as out:
            for item in range(40):
                level = float(rng.uniform(50, 150))
                out.write(json.dumps({
                    "start": "2021-01-01 00:00:00",
                    "target": _series(rng, 96, level * scale),
                    "feat_static_cat": [item % 5],
                    "item_id": f"MT_{item:03d}",
                }) + "\n")


def gluonts_x1000(folder: Path) -> Case:
    """Electricity in kW, one file exported in W: the post-mortem's case."""
    _gluonts(folder, {"train-0.jsonl": 1, "train-1.jsonl": 1, "train-2.jsonl": 1000, "train-3.jsonl": 1})
    return Case({}, {("train-2.jsonl", "target", "scale_mismatch")}, ["'target': named like labels but holds non-whole"])


def gluonts_x10(folder: Path) -> Case:
    """One shard in cm where the others are in mm: 10x, inside the default --scale-ratio of 100."""
    _gluonts(folder, {"part-a.jsonl": 1, "part-b.jsonl": 10, "part-c.jsonl": 1}, seed=1)
    return Case({}, {("part-b.jsonl", "target", "scale_mismatch")})


def gluonts_healthy(folder: Path) -> Case:
    """Shards whose levels differ by up to ~2x, as real collections do: no finding."""
    _gluonts(folder, {"a.jsonl": 1, "b.jsonl": 1.8, "c.jsonl": 0.7, "d.jsonl": 1.3}, seed=2)
    return Case({}, set())


def _nixtla_frame(rng: np.random.Generator, scale: float, series: int = 20, length: int = 60) -> Any:
    import pandas as pd

    rows = []
    for item in range(series):
        level = rng.uniform(10, 100)
        values = level * (1 + 0.2 * np.sin(np.arange(length) / 3)) * scale
        dates = pd.date_range("2023-01-01", periods=length, freq="D")
        rows += [{"unique_id": f"id_{item}", "ds": d.strftime("%Y-%m-%d"), "y": round(float(v), 3)} for d, v in zip(dates, values, strict=True)]
    return pd.DataFrame(rows)


def nixtla_csv_x1000(folder: Path) -> Case:
    rng = np.random.default_rng(3)
    for name, scale in (("store_1.csv", 1), ("store_2.csv", 1), ("store_3.csv", 1e3)):
        _nixtla_frame(rng, scale).to_csv(folder / name, index=False)
    return Case({}, {("store_3.csv", "y", "scale_mismatch")}, ["'y': named like labels but holds non-whole"])


def nixtla_parquet_x10(folder: Path) -> Case:
    rng = np.random.default_rng(4)
    for name, scale in (("m1.parquet", 1), ("m2.parquet", 1), ("m3.parquet", 10)):
        frame = _nixtla_frame(rng, scale)
        frame["ds"] = (np.arange(len(frame)) * 86400 + 1_672_531_200).astype(np.int64)  # Unix seconds
        frame.to_parquet(folder / name)
    return Case({}, {("m3.parquet", "y", "scale_mismatch")}, ["'ds': integers", "read as timestamps"])


def plain_csv_x10(folder: Path) -> Case:
    rng = np.random.default_rng(5)
    for name, scale in (("sensor_jan.csv", 1), ("sensor_feb.csv", 10), ("sensor_mar.csv", 1), ("sensor_apr.csv", 1)):
        ts = 1_700_000_000 + np.arange(200) * 60
        value = (20 + rng.standard_normal(200)) * scale
        lines = ["timestamp,value,status"] + [f"{t},{v:.3f},{i % 2}" for i, (t, v) in enumerate(zip(ts, value, strict=True))]
        (folder / name).write_text("\n".join(lines) + "\n")
    return Case({}, {("sensor_feb.csv", "value", "scale_mismatch")}, ["read as timestamps"])


def nan_as_text(folder: Path) -> Case:
    """pandas' to_json and JavaScript write NaN/Infinity as strings; pandas.read_csv reads NA cells as NaN."""
    rows = [{"x": [1.0, 2.0, "NaN"], "y": 0.5}, {"x": [1.0, "Infinity", 3.0], "y": "nan"}, {"x": [1.0, 2.0, 3.0], "y": 1.5},
            {"x": [0.5, 0.5, 0.5], "y": 2.5, "name": "Nan"}]
    (folder / "export.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "table.csv").write_text("price,qty,note\n1.5,3,ok\nNA,4,\n2.5,,fine\n3.5,5,ok\n")
    return Case({}, {
        ("export.jsonl", "x", "nonfinite"), ("export.jsonl", "y", "nonfinite"),
        ("table.csv", "price", "nonfinite"), ("table.csv", "qty", "nonfinite"), ("table.csv", "note", "empty"),
    })


def token_ids_in_npy(folder: Path) -> Case:
    """GPT-2 token ids saved as a plain train.npy (uint16), one id corrupted to 65535."""
    rng = np.random.default_rng(6)
    tokens = rng.integers(0, 50257, 200_000).astype(np.uint16)
    tokens[12345] = 65535
    np.save(folder / "train.npy", tokens)
    return Case({"vocab_size": 50257}, {("train.npy", None, "token_out_of_range")}, ["checked as token ids"])


def nanogpt_bin(folder: Path) -> Case:
    """nanoGPT's prepare.py output: raw uint16 ids; val.bin has an id past the vocabulary; meta.pkl beside."""
    rng = np.random.default_rng(7)
    rng.integers(0, 50257, 100_000).astype(np.uint16).tofile(folder / "train.bin")
    val = rng.integers(0, 50257, 10_000).astype(np.uint16)
    val[77] = 50300
    val.tofile(folder / "val.bin")
    (folder / "meta.pkl").write_bytes(b"\x80\x04N.")
    return Case({"vocab_size": 50257}, {("val.bin", None, "token_out_of_range")}, ["skipped 1 file", "meta.pkl"])


def labels_without_num_classes(folder: Path) -> Case:
    """No --num-classes: a -1 is still never a class; 1-based labels are named as such in a note."""
    rng = np.random.default_rng(8)
    np.save(folder / "x.npy", rng.standard_normal((500, 16)).astype(np.float32))
    labels = rng.integers(0, 10, 500)
    labels[[3, 40]] = -1
    np.save(folder / "labels.npy", labels)
    rows = [{"text": f"review {i}", "label": int(c)} for i, c in enumerate(rng.integers(1, 6, 300))]
    (folder / "reviews.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return Case({}, {("labels.npy", None, "label_out_of_range")}, ["they are 1-based", "no --num-classes"])


def timestamps_and_ids(folder: Path) -> Case:
    """Event logs: integer timestamps (ms) and user ids must not flood the output as fp16 overflows."""
    rng = np.random.default_rng(9)
    for part in range(3):
        n = 300
        lines = ["event_ms,user_id,amount"] + [
            f"{1_700_000_000_000 + i * 1000},{int(rng.integers(100_000, 999_999))},{rng.uniform(1, 50):.2f}" for i in range(n)
        ]
        (folder / f"events_{part}.csv").write_text("\n".join(lines) + "\n")
    return Case({}, set(), ["read as timestamps"])


class Batch:
    """A user's own class pickled into a cache file: torch.load(weights_only=True) refuses it."""

    def __init__(self, x: Any) -> None:
        self.x = x


def unsafe_pickle(folder: Path) -> Case:
    import torch

    torch.save({"batch": Batch(torch.ones(3))}, folder / "cache.pt")
    torch.save({"x": torch.randn(8, 4), "y": torch.arange(8) % 3}, folder / "good.pt")
    return Case({}, {("cache.pt", None, "unreadable")})


CASES: dict[str, Callable[[Path], Case]] = {
    "gluonts_x1000": gluonts_x1000,
    "gluonts_x10": gluonts_x10,
    "gluonts_healthy": gluonts_healthy,
    "nixtla_csv_x1000": nixtla_csv_x1000,
    "nixtla_parquet_x10": nixtla_parquet_x10,
    "plain_csv_x10": plain_csv_x10,
    "nan_as_text": nan_as_text,
    "token_ids_in_npy": token_ids_in_npy,
    "nanogpt_bin": nanogpt_bin,
    "labels_without_num_classes": labels_without_num_classes,
    "timestamps_and_ids": timestamps_and_ids,
    "unsafe_pickle": unsafe_pickle,
}
