"""The out dir: nanguard moves only what its manifest says it wrote, and no two writers share a file."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import torch

import nanguard
from nanguard.outdir import LOCK_NAME, MANIFEST_NAME
from tests.conftest import read_events
from tests.guard.helpers import make_mlp, train

USER_FILES = {"report.md": "my notes\n", "summary.json": '{"mine": 1}\n', "events.jsonl": "{}\n",
              "emergency_checkpoint.pt": "not a checkpoint\n"}


def _guarded_run(out, steps=3, **kwargs):
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = nanguard.Guard(model, opt, out_dir=out, console=False, report=False, **kwargs)
    train(model, opt, steps)
    guard.close()
    return guard


def test_users_own_files_in_the_out_dir_are_never_moved_or_overwritten(tmp_path, capsys):
    for name, text in USER_FILES.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "tensorboard").mkdir()
    (tmp_path / "tensorboard" / "run1").write_text("theirs")
    guard = _guarded_run(tmp_path)
    assert {name: (tmp_path / name).read_text() for name in USER_FILES} == USER_FILES
    assert (tmp_path / "tensorboard" / "run1").read_text() == "theirs"
    assert not (tmp_path / "previous").exists()
    assert guard.out_dir == tmp_path / "nanguard-run-2" and (guard.out_dir / "history.csv").exists()
    lines = [line for line in capsys.readouterr().err.splitlines() if "nanguard did not write" in line]
    assert len(lines) == 1 and "nanguard-run-2" in lines[0]


def test_a_previous_run_is_set_aside_and_only_its_files_move(tmp_path, capsys):
    (tmp_path / "train.py").write_text("print('mine')\n")
    _guarded_run(tmp_path)
    _guarded_run(tmp_path)
    moved = [line for line in capsys.readouterr().err.splitlines() if "set aside" in line]
    assert len(moved) == 1 and "previous" in moved[0]
    (kept,) = (tmp_path / "previous").iterdir()
    assert sorted(p.name for p in kept.iterdir()) == sorted([MANIFEST_NAME, "events.jsonl", "history.csv",
                                                             "summary.json"])
    assert (tmp_path / "train.py").read_text() == "print('mine')\n"
    assert (tmp_path / "history.csv").exists()


def test_two_guards_in_one_out_dir_never_share_a_file(tmp_path, capsys):
    first_model, second_model = make_mlp(), make_mlp()
    first_opt = torch.optim.SGD(first_model.parameters(), lr=0.1)
    second_opt = torch.optim.SGD(second_model.parameters(), lr=0.1)
    first = nanguard.Guard(first_model, first_opt, out_dir=tmp_path, console=False, report=False)
    second = nanguard.Guard(second_model, second_opt, out_dir=tmp_path, console=False, report=False)
    train(first_model, first_opt, 4)
    train(second_model, second_opt, 2)
    first.close()
    second.close()
    assert first.out_dir == tmp_path and second.out_dir == tmp_path / "nanguard-run-2"
    assert len((tmp_path / "history.csv").read_text().splitlines()) == 5
    assert len((second.out_dir / "history.csv").read_text().splitlines()) == 3
    assert "in use by another Guard in this process" in capsys.readouterr().err
    assert read_events(tmp_path) == [] and read_events(second.out_dir) == []


HOLD = textwrap.dedent("""
    import sys
    from nanguard.outdir import open_out_dir
    out, notes = open_out_dir(sys.argv[1], ["events.jsonl", "history.csv"])
    print(out.path, *notes, sep="\\n", flush=True)
    sys.stdin.read()  # hold the out dir until the test closes our stdin
""")


def test_concurrent_starts_in_one_out_dir_each_get_their_own_directory_and_name_the_holder(tmp_path):
    out = tmp_path / "out"
    children = [subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        paths = [child.stdout.readline().strip() for child in children]
    finally:
        for child in children:
            child.stdin.close()
    for child in children:
        child.wait(timeout=120)
    notes = [child.stdout.read() for child in children]
    errors = [child.stderr.read() for child in children]
    assert [child.returncode for child in children] == [0, 0], errors
    assert sorted(paths) == [str(out), str(out / "nanguard-run-2")]
    first, second = (0, 1) if paths[0] == str(out) else (1, 0)
    assert notes[first] == "" and f"is in use by pid {children[first].pid}" in notes[second]
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == children[first].pid
