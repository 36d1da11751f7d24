"""`nanguard run SCRIPT`: an unmodified script, guarded; records written; the script's exit status kept.

One subprocess test per command-line path (a fault, a healthy run, arguments and exit status, a crash, the
one-line errors, ``--help``); the rest run the same command in-process (``nanguard.cli.main``).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import jsonschema
import pytest

from nanguard.cli import main as cli_main
from tests.conftest import load_schema, read_events

SCRIPT_HEAD = """
import sys
import torch
import torch.nn as nn
import torch.nn.functional as F

torch.manual_seed(0)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(8, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, features):
        return self.head(torch.relu(self.encoder(features)))


model = Net()
X = torch.randn(512, 8)
Y = X[:, :4].argmax(1)
"""


def _run(tmp_path: Path, body: str, *args: str, policy: str | None = None) -> subprocess.CompletedProcess:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT_HEAD + textwrap.dedent(body))
    command = [sys.executable, "-m", "nanguard", "run", "--out", str(tmp_path / "out"), "--quiet"]
    if policy:
        command += ["--policy", policy]
    return subprocess.run([*command, str(script), *args], capture_output=True, text=True, timeout=240, cwd=tmp_path)


def _run_here(tmp_path: Path, body: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """The same command, in this process: returns the exit status and the script's stdout."""
    script = tmp_path / "train.py"
    script.write_text(SCRIPT_HEAD + textwrap.dedent(body))
    code = cli_main(["run", "--out", str(tmp_path / "out"), "--quiet", str(script)])
    return code, capsys.readouterr().out


LOOP = """
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
for step in range(60):
    idx = torch.randint(0, 512, (32,))
    x, labels = X[idx].clone(), Y[idx].clone()
    {fault}
    loss = F.cross_entropy(model(x), labels)
    opt.zero_grad()
    loss.backward()
    opt.step()
print("final", loss.item())
"""


def test_nan_batch_under_nanguard_run_is_skipped_and_named(tmp_path):
    result = _run(tmp_path, LOOP.format(fault="if step == 25: x[5, 1] = float('nan')"))
    assert result.returncode == 0, result.stderr
    events = read_events(tmp_path / "out")
    assert len(events) == 1
    event = events[0]
    jsonschema.validate(event, load_schema())
    assert (event["step"], event["trigger"], event["action"]) == (25, "nonfinite_loss", "skip")
    assert event["diagnosis"]["cause"] == "input_nonfinite"
    assert event["diagnosis"]["tensor"] == "x"
    assert (tmp_path / "out" / "history.csv").read_text().count("\n") == 61
    assert (tmp_path / "out" / "report.html").exists()


def test_healthy_script_produces_no_event_and_exit_zero(tmp_path):
    result = _run(tmp_path, LOOP.format(fault="pass"))
    assert result.returncode == 0, result.stderr
    assert read_events(tmp_path / "out") == []
    assert "final" in result.stdout


def test_script_exit_status_and_arguments_pass_through(tmp_path):
    body = """
    print("args", sys.argv[1:])
    sys.exit(int(sys.argv[2]))
    """
    result = _run(tmp_path, body, "--code", "3")
    assert result.returncode == 3
    assert "args ['--code', '3']" in result.stdout


def test_label_out_of_range_crash_is_diagnosed_and_exit_status_kept(tmp_path):
    result = _run(tmp_path, LOOP.format(fault="if step == 12: labels[7] = 4"))
    assert result.returncode == 1
    assert "Target 4 is out of bounds" in result.stderr  # the user's own error stays in front
    events = read_events(tmp_path / "out")
    assert len(events) == 1
    event = events[0]
    jsonschema.validate(event, load_schema())
    assert event["step"] == 12 and event["action"] == "abort"
    assert event["diagnosis"]["cause"] == "label_out_of_range"
    assert event["diagnosis"]["tensor"] == "labels"


def test_missing_script_is_a_one_line_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "nanguard", "run", str(tmp_path / "nope.py")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "nope.py" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_unknown_policy_is_rejected_with_exit_2(tmp_path):
    script = tmp_path / "t.py"
    script.write_text("print(1)\n")
    result = subprocess.run([sys.executable, "-m", "nanguard", "run", "--policy", "bogus", str(script)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "bogus" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("fused", ["False", "True"])
def test_corrupted_weight_is_rolled_back_and_run_ends_finite(tmp_path, fused, capsys):
    body = f"""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused={fused})
    for step in range(80):
        idx = torch.randint(0, 512, (32,))
        x, labels = X[idx], Y[idx]
        loss = F.cross_entropy(model(x), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 60:
            with torch.no_grad():
                model.encoder.weight[0, 0] = float("inf")
    print("finite", all(torch.isfinite(p).all().item() for p in model.parameters()))
    """
    code, stdout = _run_here(tmp_path, body, capsys)
    assert code == 0
    assert "finite True" in stdout
    events = read_events(tmp_path / "out")
    assert [(e["step"], e["action"], e["diagnosis"]["cause"]) for e in events] == [(61, "rollback", "weights_nonfinite")]
    assert events[0]["diagnosis"]["module"] == "encoder"


def test_python_dash_m_and_console_script_are_the_same_program(tmp_path):
    result = subprocess.run([sys.executable, "-m", "nanguard", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for command in ("run", "demo", "report", "scan", "lint"):
        assert command in result.stdout


def test_model_passed_around_functions_and_dicts_is_found(tmp_path, capsys):
    """The optimizer is built in a helper that sees only parameters; the model lives in another function's frame."""
    body = """
    def build_optimizer(params):
        return torch.optim.SGD(params, lr=0.1)

    def train(net):
        opt = build_optimizer([p for p in net.parameters()])
        for step in range(30):
            idx = torch.randint(0, 512, (32,))
            x, labels = X[idx].clone(), Y[idx]
            if step == 20:
                x[0, 0] = float("nan")
            loss = F.cross_entropy(net(x), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()

    holder = {"net": Net()}
    del model
    train(holder.pop("net"))
    """
    code, _ = _run_here(tmp_path, body, capsys)
    assert code == 0
    events = read_events(tmp_path / "out")
    assert [(e["step"], e["diagnosis"]["cause"], e["diagnosis"]["tensor"]) for e in events] == [(20, "input_nonfinite", "x")]
