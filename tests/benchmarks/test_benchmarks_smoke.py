"""The benchmark scripts run end to end in their tiny modes, so they never rot. No timing is asserted."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
VARIANTS = ["unguarded", "nanguard safe (default)", "nanguard fast", "nanguard forensic", "seed checks", "detect_anomaly"]
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


def _run(*args: str, timeout: int = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=BENCHMARKS.parent)


def _table_rows(markdown: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in markdown.splitlines() if line.startswith("| ")]


@pytest.fixture(scope="module")
def quick_overhead(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], dict]:
    json_path = tmp_path_factory.mktemp("overhead") / "overhead.json"
    result = _run(str(BENCHMARKS / "overhead.py"), "--quick", "--shape", "small", "--json", str(json_path))
    assert result.returncode == 0, result.stderr[-4000:]
    return result, json.loads(json_path.read_text())


def test_overhead_quick_prints_every_variant_for_both_optimizers(quick_overhead):
    result, _ = quick_overhead
    out = result.stdout
    assert "## AdamW fused" in out and "## AdamW not fused" in out
    expected = VARIANTS + (["DebugUnderflowOverflow"] if HAS_TRANSFORMERS else [])
    first_cells = [row[0] for row in _table_rows(out)]
    for variant in expected:
        assert first_cells.count(variant) == 2, (variant, first_cells)  # one row per optimizer kind
    for section in ("## Time inside optimizer.step()", "## Rollback snapshot refresh", "## One forensic replay"):
        assert section in out


def test_overhead_quick_measures_what_it_claims(quick_overhead):
    _, data = quick_overhead
    unguarded = [row for row in data["timing"] if row["variant"] == "unguarded"]
    assert [row["ratio_median"] for row in unguarded] == [1.0, 1.0]
    assert all(row["median_ms"] > 0 for row in data["timing"])
    guarded = [row for row in data["timing"] if row["variant"].startswith("nanguard")]
    # On a GPU the fused optimizer takes the verdict on the device; on a CPU, where reading it back is free,
    # both optimizers take it on the host.
    import torch

    modes = {row["optimizer"]: row["guard"]["mode"].split()[0] for row in guarded}
    assert modes["plain"] == "host"
    assert modes["fused"] == ("device" if torch.cuda.is_available() else "host")
    # The injected NaN was caught and investigated by forensics, for both optimizer kinds.
    for row in data["replay"]:
        assert [fault["cause"] for fault in row["faults"]] == ["input_nonfinite"], row
    assert all(row["snapshot_ms"] > 0 and row["snapshot_mb"] > 0 for row in data["snapshots"])
    assert {row["variant"] for row in data["step_calls"]} == {"unguarded", *(v for v in VARIANTS if v.startswith("nanguard"))}


def test_overhead_refuses_gpt2_on_cpu_without_allow_cpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the refusal only applies to CPU-only machines")
    result = _run(str(BENCHMARKS / "overhead.py"), "--shape", "gpt2", timeout=60)
    assert result.returncode == 2
    assert "--allow-cpu" in result.stderr and "GPU" in result.stderr


def test_scan_speed_runs_on_a_small_array():
    # --mb must be a multiple of 4: scan_speed.py's pandas baseline reshapes the array to rows of 64 values.
    result = _run(str(BENCHMARKS / "scan_speed.py"), "--mb", "4", "--repeat", "1")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "nanguard scan_dataset(a)" in result.stdout


def test_stall_cost_quick_times_the_check_and_a_sample():
    result = _run(str(BENCHMARKS / "stall_cost.py"), "--quick")
    assert result.returncode == 0, result.stderr[-4000:]
    rows = _table_rows(result.stdout)
    assert [r[0] for r in rows if r[0] in ("fused", "plain")] == ["fused", "plain"]
    (timing,) = [r for r in rows if r[0].endswith(" us")]
    assert "nan" not in " ".join(timing) and timing[3].endswith("% of a step")
