"""The disk fills up for real: each child runs under ``RLIMIT_FSIZE`` (every write past the limit fails with
EFBIG, as on a full disk; SIGXFSZ ignored as a shell's ``ulimit -f`` job would have to). The healthy run ends
with the same final loss as without nanguard; the abort still raises ``TrainingAborted`` and leaves no
temporary file."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

resource = pytest.importorskip("resource")

HEALTHY = textwrap.dedent("""
    import torch
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    for step in range(120):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"final loss {loss.item():.10f}")
""")

ABORTING = textwrap.dedent("""
    import os, sys, torch, nanguard
    from nanguard.errors import CheckpointError
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    out = sys.argv[1]
    nanguard.Guard(model, opt, out_dir=out, console=False, report=False, rollback_after=2, abort_after=4,
                   max_rollbacks=1)
    try:
        for step in range(40):
            x = torch.randn(4, 64) * (float("nan") if step >= 5 else 1.0)
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    except nanguard.TrainingAborted as exc:
        print("aborted:", isinstance(exc.__cause__, CheckpointError), exc.checkpoint, exc)
""")


def _limit(size: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    return apply


def _run(args: list[str], cwd: Path, size: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          preexec_fn=_limit(size))


def _leftover_temp_files(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if ".tmp" in p.name]


def test_run_on_a_full_disk_finishes_with_the_same_final_loss(tmp_path, capsys):
    exec(compile(HEALTHY, "healthy.py", "exec"), {})  # the script without nanguard, one thread like the child
    plain = capsys.readouterr().out.strip()
    (tmp_path / "train.py").write_text(HEALTHY)
    guarded = _run(["-m", "nanguard", "run", "--quiet", "--out", "out", "train.py"], tmp_path, 3000)
    assert guarded.returncode == 0, guarded.stderr[-2000:]
    final = [line for line in guarded.stdout.splitlines() if line.startswith("final loss")]
    assert plain.startswith("final loss") and final == [plain]
    assert "Traceback" not in guarded.stderr
    assert guarded.stderr.count("history.csv stopped after") == 1 and "errno 27" in guarded.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 120
    assert any("history.csv" in line for line in summary["records_incomplete"])
    assert _leftover_temp_files(tmp_path / "out") == []


def test_abort_on_a_full_disk_still_raises_training_aborted_without_temp_files(tmp_path):
    (tmp_path / "abort.py").write_text(ABORTING)
    done = _run(["abort.py", "out"], tmp_path, 4096)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "aborted: True None" in done.stdout and "No emergency checkpoint: could not write" in done.stdout
    assert not (tmp_path / "out" / "emergency_checkpoint.pt").exists()
    assert _leftover_temp_files(tmp_path / "out") == []
