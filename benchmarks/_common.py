"""Helpers shared by the benchmark scripts: what machine ran them, robust summaries, Markdown tables.

Benchmarks are run as scripts (``python benchmarks/NAME.py``), so this module is imported as ``_common``
from the script's own folder; it imports nothing heavy at module level.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else whatever ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def source_revision() -> str | None:
    """The repository commit the benchmark ran on, and whether ``src/`` had uncommitted changes.

    Read-only: ``--no-optional-locks`` keeps ``git status`` from refreshing the index.
    """
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "--no-optional-locks", "-C", str(root), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "--no-optional-locks", "-C", str(root), "status", "--porcelain", "--", "src"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + (" + uncommitted changes in src/" if dirty else "")


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: on a shared machine, how much else was running."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def machine_info() -> dict[str, Any]:
    """Everything a reader needs to judge a number: hardware, library versions, threads, date."""
    import torch

    info: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "gpu": None,
        "cuda": None,
    }
    info["load_average"] = load_average()
    info["revision"] = source_revision()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    try:
        import nanguard

        info["nanguard"] = nanguard.__version__
    except ImportError:
        info["nanguard"] = None
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    return info


def describe_machine(info: dict[str, Any]) -> str:
    """One Markdown bullet list of :func:`machine_info`."""
    device = f"GPU: {info['gpu']} (CUDA {info['cuda']})" if info.get("gpu") else "GPU: none (CPU run)"
    lines = [
        f"- date: {info['date']}",
        f"- CPU: {info['cpu']}, {info['cpu_count']} logical cores, torch threads: {info['torch_threads']}",
        f"- {device}",
        f"- Python {info['python']}, torch {info['torch']}, nanguard {info.get('nanguard')}, "
        f"transformers {info.get('transformers') or 'not installed'}",
        f"- platform: {info['platform']}",
        f"- source: {info.get('revision') or 'not a git checkout'}",
    ]
    if info.get("load_average"):
        start = info.get("load_average_start")
        lines.append(f"- load average (1/5/15 min){f' at the start: {start},' if start else ''} at the end: {info['load_average']} "
                     f"(other processes share these {info['cpu_count']} cores when it exceeds ~1)")
    return "\n".join(lines)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table; numbers are expected to be formatted by the caller."""
    cells = [[str(c) for c in header], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) + " |"

    separator = "|" + "|".join("-" * (width + 2) for width in widths) + "|"
    return "\n".join([line(cells[0]), separator, *(line(row) for row in cells[1:])])


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write a results file so that a reader never sees half of it, creating its folder if needed."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, out)
    return out
