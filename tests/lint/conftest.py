"""Fixtures for ``nanguard lint``: the sample configs (copied out of the repo before any --fix) and
an in-process CLI runner."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from nanguard import cli

CONFIGS = Path(__file__).resolve().parent / "configs"


@pytest.fixture
def config(tmp_path):
    """``config("hf_bad.yaml")`` -> a private copy of that sample config in ``tmp_path``."""

    def copy(name: str) -> Path:
        target = tmp_path / name
        shutil.copyfile(CONFIGS / name, target)
        return target

    return copy


@pytest.fixture
def run_lint(capsys):
    """``run_lint(args...)`` -> (exit status, stdout, stderr) of ``nanguard lint ARGS`` in-process."""

    def run(*args: object) -> tuple[int, str, str]:
        status = cli.main(["lint", *map(str, args)])
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    return run
