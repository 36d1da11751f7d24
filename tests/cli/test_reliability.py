"""The command line never hurts the run or lies about it: bad places are one line and exit 2, a run with no
optimizer step claims nothing, and SIGTERM/SIGINT flush every record with status ``interrupted``."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import nanguard
from nanguard.cli import main as cli_main
from tests.guard.helpers import make_mlp, train


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_run_with_out_an_existing_file_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "train.py").write_text("print('never run')\n")
    (tmp_path / "taken").write_text("a file")
    assert cli_main(["run", "--out", str(tmp_path / "taken"), str(tmp_path / "train.py")]) == 2
    assert "is not a directory" in _one_line_error(capsys)
    assert (tmp_path / "taken").read_text() == "a file"


def test_run_with_out_where_no_folder_can_be_made_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "train.py").write_text("print('never run')\n")
    assert cli_main(["run", "--out", "/proc/nanguard-out", str(tmp_path / "train.py")]) == 2
    assert "/proc/nanguard-out" in _one_line_error(capsys)


def test_report_out_in_an_unwritable_place_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "events.jsonl").write_text("")
    (tmp_path / "history.csv").write_text("step,loss\n1,0.5\n")
    assert cli_main(["report", str(tmp_path), "--out", "/proc/nanguard-report.html"]) == 2
    assert "could not write the report /proc/nanguard-report.html" in _one_line_error(capsys)


@pytest.mark.parametrize(("source", "status", "code"), [
    ("import torch\nprint('mean', torch.tensor([float('nan')]).mean().item())\n", "finished", 0),
    ("def broken(:\n    pass\n", "error", 1),
])
def test_a_run_without_an_optimizer_step_never_claims_every_step_finite(tmp_path, capsys, source, status, code):
    (tmp_path / "train.py").write_text(source)
    out = tmp_path / "out"
    assert cli_main(["run", "--quiet", "--out", str(out), str(tmp_path / "train.py")]) == code
    err = capsys.readouterr().err
    assert "finite" not in err.replace("checked for NaN/Inf", "") and "no optimizer step was seen" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == status and summary["steps"] == 0 and "nothing was checked" in summary["checked"]


def test_ctrl_c_inside_a_guard_block_records_interrupted(tmp_path):
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(KeyboardInterrupt), nanguard.Guard(model, opt, out_dir=tmp_path, console=False, report=False):
        train(model, opt, 3)
        raise KeyboardInterrupt
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["steps"] == 3


LONG_RUN = textwrap.dedent("""
    import torch
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    step = 0
    while True:
        loss = model(torch.randn(8, 4)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step == 5:
            print("training", flush=True)
""")


def test_ctrl_c_in_a_script_under_nanguard_run_records_interrupted(tmp_path, capsys):
    (tmp_path / "train.py").write_text(LONG_RUN.replace('print("training", flush=True)', "raise KeyboardInterrupt"))
    assert cli_main(["run", "--quiet", "--out", str(tmp_path / "out"), str(tmp_path / "train.py")]) == 130
    assert "[nanguard] SIGINT after 5 optimizer steps" in capsys.readouterr().err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["steps"] == 5


def test_sigterm_to_nanguard_run_flushes_everything_and_records_interrupted(tmp_path):
    signum, code, name = signal.SIGTERM, 143, "SIGTERM"
    (tmp_path / "train.py").write_text(LONG_RUN)
    child = subprocess.Popen([sys.executable, "-m", "nanguard", "run", "--out", "out", "train.py"], cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "training"
        child.send_signal(signum)
        _, err = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == code, err[-2000:]
    assert f"[nanguard] {name} after" in err and "[nanguard] interrupted:" in err and "Traceback" not in err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["steps"] >= 5
    rows = (tmp_path / "out" / "history.csv").read_text().splitlines()
    # every finished step's row was flushed (the step the signal cut short may be counted without its row)
    assert summary["steps"] - 1 <= len(rows) - 1 <= summary["steps"]
    assert (tmp_path / "out" / "report.html").exists()
