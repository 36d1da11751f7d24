"""``optional_sinks``: what a guard adds to its own records, and what it may import to decide."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest

from nanguard.sinks import mlflow_active, optional_sinks, wandb_active
from nanguard.sinks.console import LiveConsole


def test_auto_detection_imports_neither_library_and_import_nanguard_stays_light(tmp_path: Path) -> None:
    code = (
        "import sys; from pathlib import Path; import nanguard, nanguard.sinks.console, nanguard.sinks.tensorboard\n"
        "from nanguard.sinks import optional_sinks\n"
        f"sinks = optional_sinks(Path({str(tmp_path)!r}), console=False, tensorboard=False)\n"
        "print(len(sinks), sorted(m for m in ('rich', 'wandb', 'mlflow', 'tensorboard', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "0 []"


def test_active_runs_are_read_from_already_imported_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_wandb = types.SimpleNamespace(run=None)
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb)
    assert not wandb_active()
    fake_wandb.run = object()
    assert wandb_active()
    info = types.SimpleNamespace(info=types.SimpleNamespace(run_id="abc"))
    monkeypatch.setitem(sys.modules, "mlflow", types.SimpleNamespace(active_run=lambda: info))
    assert mlflow_active()

    def broken() -> None:
        raise RuntimeError("tracking URI unset")

    monkeypatch.setitem(sys.modules, "mlflow", types.SimpleNamespace(active_run=broken))
    assert not mlflow_active()  # a half-configured mlflow never stops a guard from starting


def test_an_active_run_that_cannot_be_logged_to_is_a_warning(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    class Run:
        def define_metric(self, *args, **kwargs):
            raise RuntimeError("run is finishing")

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(run=Run()))
    with pytest.warns(RuntimeWarning, match="found an active W&B run but could not log to it"):
        assert optional_sinks(tmp_path, console=False, tensorboard=False, mlflow=False) == []


def test_console_and_tensorboard_are_added_when_asked(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from nanguard.sinks.tensorboard import TensorBoardSink

    sinks = optional_sinks(tmp_path, console=True, tensorboard=True, wandb=False, mlflow=False)
    assert [type(s) for s in sinks] == [LiveConsole, TensorBoardSink]
    assert (tmp_path / "tensorboard").is_dir()
    for sink in sinks:
        sink.close(None)


def test_missing_extra_names_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from nanguard.errors import MissingExtraError

    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'nanguard\[wandb\]'"):
        optional_sinks(tmp_path, console=False, tensorboard=False, wandb=True)
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'nanguard\[mlflow\]' \(or pip install mlflow-skinny\)"):
        optional_sinks(tmp_path, console=False, tensorboard=False, wandb=False, mlflow=True)
