"""Shared fixtures: tiny models and data that train in milliseconds on a CPU."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# Every model here is tiny: one intra-op thread is faster than two, and on a shared machine extra OpenMP
# threads spin-wait for cores other processes hold (the suite ran several times slower that way). Set
# before torch is imported, so subprocesses the tests start (nanguard run, torchrun) inherit it too.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"

import torch

torch.set_num_threads(1)

SCHEMA_PATH = Path(__file__).resolve().parents[1].parent / "shared" / "spec" / "event.schema.json"
REPO_SCHEMA_COPY = Path(__file__).resolve().parent / "data" / "event.schema.json"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def load_schema() -> dict:
    path = SCHEMA_PATH if SCHEMA_PATH.exists() else REPO_SCHEMA_COPY
    return json.loads(path.read_text())


def read_events(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
