"""Shared fixtures: tiny models and data that train in milliseconds on a CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

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
