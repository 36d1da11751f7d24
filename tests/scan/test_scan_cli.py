"""``nanguard scan`` on the command line: output, exit status, one-line errors, progress."""

from __future__ import annotations

import importlib.util
import io
import json
import subprocess
import sys

import numpy as np
import pytest

from nanguard import cli
from nanguard.scan.progress import Progress
from nanguard.scan.result import CHECKS


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


@pytest.fixture
def run_cli(monkeypatch, capsys):
    """``nanguard.cli.main`` in-process, without sibling subcommands that are not importable yet."""
    available = {name: spec for name, spec in cli.SUBCOMMANDS.items() if _importable(spec[0])}
    monkeypatch.setattr(cli, "SUBCOMMANDS", available)

    def run(*argv: str) -> tuple[int, str, str]:
        try:
            code = cli.main(["scan", *argv])
        except SystemExit as exit_:
            code = int(exit_.code or 0)
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def dataset(tmp_path):
    table = np.random.default_rng(0).standard_normal((20, 3)).astype(np.float32)
    table[4, 1] = np.nan
    np.save(tmp_path / "x.npy", table)
    np.save(tmp_path / "labels.npy", np.asarray([0, 1, 2, 7, -100, 1]))
    return tmp_path


def test_clean_data_exits_zero(run_cli, tmp_path):
    np.save(tmp_path / "x.npy", np.arange(10, dtype=np.float32))
    code, out, err = run_cli(str(tmp_path))
    assert code == 0
    assert out.startswith("no problems found in 1 file")
    assert err == ""


def test_findings_print_a_table_and_exit_one(run_cli, dataset):
    code, out, _ = run_cli(str(dataset), "--num-classes", "3")
    assert code == 1
    lines = out.splitlines()
    assert lines[0].split()[:5] == ["FILE", "FIELD", "CHECK", "COUNT", "ROWS"]
    assert any("labels.npy" in line and "label_out_of_range" in line and " 3 " in line for line in lines)
    assert any("x.npy" in line and "nonfinite" in line for line in lines)
    assert lines[-1].startswith("2 findings in 2 of 2 files")


def test_json_output_has_exactly_the_contract_keys(run_cli, dataset):
    code, out, _ = run_cli(str(dataset), "--num-classes", "3", "--json")
    assert code == 1
    report = json.loads(out)
    assert set(report) == {"findings", "files", "bytes", "seconds", "notes", "skipped"}
    assert report["files"] == [str(dataset / "labels.npy"), str(dataset / "x.npy")]
    assert isinstance(report["bytes"], int) and isinstance(report["seconds"], float)
    for finding in report["findings"]:
        assert set(finding) == {"file", "field", "check", "count", "examples", "message"}
        assert finding["check"] in CHECKS
    by_check = {f["check"]: f for f in report["findings"]}
    assert by_check["label_out_of_range"] == {
        **by_check["label_out_of_range"],
        "file": str(dataset / "labels.npy"),
        "field": None,
        "count": 1,
        "examples": [3],
    }
    assert by_check["nonfinite"]["examples"] == [4]


def test_label_field_flag_and_ignore_index(run_cli, tmp_path):
    (tmp_path / "t.csv").write_text("answer,x\n0,1\n-1,2\n5,3\n")
    code, out, _ = run_cli(str(tmp_path), "--num-classes", "3", "--label-field", "answer", "--json")
    assert code == 1
    [finding] = json.loads(out)["findings"]
    assert (finding["field"], finding["examples"]) == ("answer", [1, 2])
    code, out, _ = run_cli(
        str(tmp_path), "--num-classes", "3", "--label-field", "answer", "--ignore-index", "-1", "--json"
    )
    assert [f["examples"] for f in json.loads(out)["findings"]] == [[2]]


@pytest.mark.parametrize(
    "argv",
    [
        ["/definitely/not/here.npy"],
        ["{data}", "--num-classes", "abc"],
        ["{data}", "--num-classes", "0"],
        ["{data}", "--vocab-size", "-5"],
        ["{data}", "--scale-ratio", "1"],
        ["{data}", "--no-such-flag"],
        ["{data}/notes.txt"],
        [],
    ],
)
def test_bad_usage_is_exit_two_with_one_line(run_cli, dataset, argv):
    (dataset / "notes.txt").write_text("x")
    code, out, err = run_cli(*[a.format(data=dataset) for a in argv])
    assert code == 2
    assert out == ""
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert "error:" in err


@pytest.mark.slow
def test_python_dash_m_nanguard_scan(dataset):
    missing = [module for module, _ in cli.SUBCOMMANDS.values() if not _importable(module)]
    if missing:
        pytest.skip(f"the CLI cannot start until these subcommand modules exist: {', '.join(missing)}")
    proc = subprocess.run(
        [sys.executable, "-m", "nanguard", "scan", str(dataset), "--num-classes", "3", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    checks = sorted(f["check"] for f in json.loads(proc.stdout)["findings"])
    assert checks == ["label_out_of_range", "nonfinite"]


def test_scan_command_module_imports_nothing_heavy():
    code = "import sys, nanguard.scan.command; print(sorted(m for m in ('numpy', 'pandas', 'pyarrow', 'torch') if m in sys.modules))"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert proc.stdout.strip() == "[]"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_shows_only_on_a_terminal_after_the_delay(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    now = [0.0]
    terminal = _Terminal()
    progress = Progress(1000, terminal, delay=1.0, clock=lambda: now[0])
    progress.file("big.npy")
    progress.advance(100)
    assert terminal.getvalue() == ""  # under a second: silent
    now[0] = 2.0
    progress.advance(400)
    drawn = terminal.getvalue()
    assert "50%" in drawn and "big.npy" in drawn
    assert "\x1b[3" in drawn or "\x1b[9" in drawn  # in colour on a terminal
    progress.close()
    assert terminal.getvalue().endswith("\x1b[2K")  # the bar is erased when the scan ends

    piped = io.StringIO()
    quiet = Progress(1000, piped, delay=0.0, clock=lambda: now[0])
    now[0] = 10.0
    quiet.advance(1000)
    quiet.close()
    assert piped.getvalue() == ""


def test_progress_is_plain_when_no_color_is_set(monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    now = [0.0]
    terminal = _Terminal()
    progress = Progress(1000, terminal, delay=0.0, clock=lambda: now[0])
    now[0] = 1.0
    progress.advance(500)
    progress.close()
    drawn = terminal.getvalue()
    assert "50%" in drawn and not any(f"\x1b[{code}" in drawn for code in ("31m", "32m", "35m", "91m"))


def test_import_nanguard_does_not_load_rich():
    code = "import sys, nanguard, nanguard.scan.command, nanguard.scan.progress; print('rich' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert proc.stdout.strip() == "False"
