"""Where a run's records go besides nanguard's own files: the terminal, TensorBoard, W&B, MLflow.

Every sink has the three methods of the ``Sink`` protocol (``on_step(row)``, ``on_event(event)``,
``close(summary)``), receives the same history rows and event dicts as ``history.csv`` and
``events.jsonl``, and never stops training over its own failure (:mod:`nanguard.sinks._safe`).
Importing this package is light: ``rich``, ``tensorboard``, ``wandb`` and ``mlflow`` are imported by
the sink that needs them, when it is created.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nanguard.records import Sink


def wandb_active() -> bool:
    """A W&B run is active in this process (checked without importing ``wandb``)."""
    from nanguard.sinks.wandb_sink import active_run

    return active_run() is not None


def mlflow_active() -> bool:
    """An MLflow run is active in this process (checked without importing ``mlflow``)."""
    from nanguard.sinks.mlflow_sink import active_run_id

    try:
        return active_run_id() is not None
    except Exception:  # a half-configured mlflow must not stop the guard from starting
        return False


def _auto(kind: str, factory: type, out_dir: Path) -> list[Sink]:
    """A sink the user did not ask for by name: a failure to start it is a warning, not an error."""
    try:
        return [factory(out_dir)]
    except Exception as exc:
        warnings.warn(f"nanguard: found an active {kind} run but could not log to it ({type(exc).__name__}: {exc}); "
                      f"pass {kind.lower()}=False to silence this", RuntimeWarning, stacklevel=3)
        return []


def optional_sinks(out_dir: Path, *, console: bool, tensorboard: bool, wandb: bool | None = None,
                   mlflow: bool | None = None) -> list[Sink]:
    """The sinks a guard adds to its own records (events.jsonl, history.csv), in this order.

    ``console``: the live console on stderr. ``tensorboard``: ``OUT_DIR/tensorboard``. ``wandb`` /
    ``mlflow``: ``True`` logs there (starting a run of nanguard's own when none is active; an error
    naming the extra or the set-up if that cannot work), ``False`` never, ``None`` (auto) only when
    the process already has an active W&B run (``wandb.run``) / MLflow run (``mlflow.active_run()``),
    checked without importing either package.

    How the Guard wires it (``GuardConfig`` gets ``wandb: bool | None = None`` and ``mlflow: bool |
    None = None``): on the writing rank, at construction,
    ``sinks += optional_sinks(out_dir, console=config.console, tensorboard=config.tensorboard,
    wandb=config.wandb, mlflow=config.mlflow)``. At close, write ``summary.json`` and the report
    *before* calling ``close(summary)`` on these sinks: the W&B and MLflow sinks upload the report
    and the record files they find in ``out_dir`` then (``summary["report"]``, if set, is printed
    by the console). Ranks other than 0 get none of these.
    """
    from nanguard.sinks.wandb_sink import WandbSink

    sinks: list[Sink] = []
    if console:
        from nanguard.sinks.console import LiveConsole

        sinks.append(LiveConsole())
    if tensorboard:
        from nanguard.sinks.tensorboard import TensorBoardSink

        sinks.append(TensorBoardSink(out_dir / "tensorboard"))
    if wandb:
        sinks.append(WandbSink(out_dir))
    elif wandb is None and wandb_active():
        sinks += _auto("W&B", WandbSink, out_dir)
    from nanguard.sinks.mlflow_sink import MlflowSink

    if mlflow:
        sinks.append(MlflowSink(out_dir))
    elif mlflow is None and mlflow_active():
        sinks += _auto("MLflow", MlflowSink, out_dir)
    return sinks


__all__ = ["mlflow_active", "optional_sinks", "wandb_active"]
