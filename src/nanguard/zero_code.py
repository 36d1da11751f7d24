"""Zero-code mode: ``nanguard run [--out DIR] [--policy NAME] SCRIPT [ARGS...]``.

The script runs unmodified, as ``__main__``, with a few PyTorch entry points patched for its duration:

* ``torch.optim.Optimizer.__init__``: every optimizer the script creates gets a :class:`~nanguard.Guard`.
  The model(s) it trains are found by looking, in the creating frames, for modules that own its
  parameters (and again at the first step if none was found then).
* ``torch.amp.GradScaler.scale``/``step``: losses are read unscaled; the scaler's own overflow skips are
  counted, not reported.
* ``LRScheduler.__init__``: schedulers are held back on skipped steps.
* ``torch.nn.utils.clip_grad_norm_``: the norm the script computes is reused, not computed twice.

Replay without a closure works from what :mod:`nanguard.capture` records each step: the root module's
call arguments and RNG state, and the loss operators between the model's return and ``backward()``.
If the script raises, the exception is diagnosed (e.g. a class target out of range), written as an
``abort`` event, and re-raised, so the exit status is the script's own.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import runpy
import sys
import traceback
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from nanguard.capture import is_library_module
from nanguard.config import PRESETS, GuardConfig, resolve_config
from nanguard.errors import TrainingAborted, UsageError
from nanguard.guard import _ACTIVE_GUARDS, Guard, _set_aside_previous_run
from nanguard.record import EventLog, HistoryLog, Sink, write_json_atomic


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="nanguard_out", help="directory for events.jsonl, history.csv and the report")
    parser.add_argument("--policy", default="safe", choices=sorted(PRESETS), help="guard preset (default: safe)")
    parser.add_argument("--quiet", action="store_true", help="no live console output")
    parser.add_argument("script", help="the training script to run, unmodified")
    parser.epilog = "Everything after SCRIPT is passed to the script as its own arguments."


def main(args: argparse.Namespace) -> int:
    script = Path(args.script)
    if not script.is_file():
        raise UsageError(f"script {str(script)!r} does not exist or is not a file: give the path of a Python training script")
    config = resolve_config(args.policy, out_dir=str(args.out), console=not args.quiet)
    return run_script(script, list(getattr(args, "script_args", [])), config)


class Session:
    """Owns the run directory and the guards of one zero-code run."""

    def __init__(self, config: GuardConfig) -> None:
        self.config = config
        self.out_dir = Path(config.out_dir)
        self.guards: list[Guard] = []
        self._by_optimizer: weakref.WeakKeyDictionary[torch.optim.Optimizer, Guard] = weakref.WeakKeyDictionary()
        rank = int(os.environ.get("RANK", "0") or 0)
        self.is_writer = rank == 0
        self.sinks: list[Sink] = []
        if self.is_writer:
            _set_aside_previous_run(self.out_dir)
            self.sinks = [EventLog(self.out_dir / "events.jsonl"), HistoryLog(self.out_dir / "history.csv")]
            if config.console:
                try:
                    from nanguard.console import LiveConsole

                    self.sinks.append(LiveConsole())
                except ImportError:
                    pass
        self._closed = False

    def guard_of(self, optimizer: torch.optim.Optimizer) -> Guard | None:
        return self._by_optimizer.get(optimizer)

    def on_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        if optimizer in self._by_optimizer:
            return
        models = find_models(optimizer)
        guard = Guard(
            models, optimizer, config=self.config.replace(report=False, console=False), out_dir=self.out_dir,
            sinks=self.sinks, own_records=False,
        )
        if not models:
            guard.find_models = lambda: find_models(optimizer, start_depth=4, max_frames=16)
        self.guards.append(guard)
        self._by_optimizer[optimizer] = guard

    def close(self, status: str) -> None:
        if self._closed:
            return
        self._closed = True
        summaries = []
        for guard in self.guards:
            with contextlib.suppress(TrainingAborted):
                guard.close(status=status)
            summaries.append(guard.summary())
        if not self.is_writer:
            return
        summary = _merge_summaries(summaries, status)
        write_json_atomic(self.out_dir / "summary.json", summary)
        for sink in self.sinks:
            sink.close(summary)
        if self.config.report:
            try:
                from nanguard.report import render_report

                path = render_report(self.out_dir)
                print(f"[nanguard] report: {path}", file=sys.stderr)
            except Exception as exc:  # the report must never change the script's outcome
                print(f"[nanguard] could not write the report: {exc}", file=sys.stderr)


def _merge_summaries(summaries: list[dict[str, Any]], status: str) -> dict[str, Any]:
    merged: dict[str, Any] = {"status": status, "optimizers": len(summaries)}
    for key in ("steps", "skipped", "rollbacks", "clipped", "events"):
        merged[key] = sum(s.get(key, 0) for s in summaries)
    merged["causes"] = sorted({c for s in summaries for c in s.get("causes", [])})
    merged["aborted"] = any(s.get("aborted") for s in summaries)
    return merged


def find_models(optimizer: torch.optim.Optimizer, start_depth: int = 2, max_frames: int = 12) -> list[torch.nn.Module]:
    """The smallest set of root modules, visible from the calling frames, that own the optimizer's parameters."""
    wanted = {id(p) for group in optimizer.param_groups for p in group["params"]}
    candidates: dict[int, torch.nn.Module] = {}
    frame = sys._getframe(start_depth)
    for _ in range(max_frames):
        if frame is None:
            break
        if not is_library_module(frame.f_globals.get("__name__", "")):
            for value in list(frame.f_locals.values()) + list(frame.f_globals.values()):
                for item in _modules_in(value):
                    candidates.setdefault(id(item), item)
        frame = frame.f_back  # type: ignore[assignment]
    scored = []
    for module in candidates.values():
        owned = {id(p) for p in module.parameters()} & wanted
        if owned:
            scored.append((len(owned), module))
    scored.sort(key=lambda item: -item[0])
    chosen: list[torch.nn.Module] = []
    covered: set[int] = set()
    for _, module in scored:
        ids = {id(p) for p in module.parameters()} & wanted
        if ids - covered and not any(_contains(parent, module) for parent in chosen):
            chosen.append(module)
            covered |= ids
        if covered >= wanted:
            break
    return chosen


def _modules_in(value: Any) -> Iterator[torch.nn.Module]:
    if isinstance(value, torch.nn.Module):
        yield value
    elif isinstance(value, (list, tuple)) and len(value) < 16:
        for item in value:
            if isinstance(item, torch.nn.Module):
                yield item
    elif isinstance(value, dict) and len(value) < 64:
        for item in value.values():
            if isinstance(item, torch.nn.Module):
                yield item
    elif hasattr(value, "__dict__") and not isinstance(value, type) and type(value).__module__ not in ("builtins",):
        try:
            attributes = vars(value)
        except TypeError:
            return
        for item in list(attributes.values())[:64]:
            if isinstance(item, torch.nn.Module):
                yield item


def _contains(parent: torch.nn.Module, child: torch.nn.Module) -> bool:
    return any(m is child for m in parent.modules())


@contextlib.contextmanager
def patched(session: Session) -> Iterator[None]:
    """Install the zero-code patches for the duration of the block, and take them all out again."""
    from torch.optim import lr_scheduler

    undo: list[tuple[Any, str, Any]] = []

    def patch(owner: Any, name: str, replacement: Any) -> None:
        undo.append((owner, name, getattr(owner, name)))
        setattr(owner, name, replacement)

    original_init = torch.optim.Optimizer.__init__

    def optimizer_init(self: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        try:
            session.on_optimizer(self)
        except Exception as exc:  # never break the user's script because the guard could not attach
            print(f"[nanguard] could not guard {type(self).__name__}: {exc}", file=sys.stderr)

    patch(torch.optim.Optimizer, "__init__", optimizer_init)

    scheduler_base = getattr(lr_scheduler, "LRScheduler", None) or lr_scheduler._LRScheduler
    original_scheduler_init = scheduler_base.__init__

    def scheduler_init(self: Any, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> None:
        original_scheduler_init(self, optimizer, *args, **kwargs)
        guard = session.guard_of(optimizer)
        if guard is not None:
            guard.attach_scheduler(self)

    patch(scheduler_base, "__init__", scheduler_init)

    scaler_classes = [torch.amp.GradScaler] if hasattr(torch.amp, "GradScaler") else []
    for scaler_class in scaler_classes:
        original_scale, original_step = scaler_class.scale, scaler_class.step

        def scale(self: Any, outputs: Any, _original: Any = original_scale) -> Any:
            scaled = _original(self, outputs)
            if isinstance(outputs, torch.Tensor) and isinstance(scaled, torch.Tensor):
                for guard in list(_ACTIVE_GUARDS):
                    guard._note_scaled(scaled, outputs)
            return scaled

        def step(self: Any, optimizer: torch.optim.Optimizer, *args: Any, _original: Any = original_step, **kwargs: Any) -> Any:
            guard = session.guard_of(optimizer)
            if guard is None or getattr(self, "_nanguard_guard", None) is guard:
                return _original(self, optimizer, *args, **kwargs)
            guard.attach_scaler(self)
            return self.step(optimizer, *args, **kwargs)

        patch(scaler_class, "scale", scale)
        patch(scaler_class, "step", step)

    original_clip = torch.nn.utils.clip_grad_norm_

    def clip_grad_norm_(parameters: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
        norm = original_clip(params, *args, **kwargs)
        for guard in session.guards:
            guard.note_clip_norm(norm, sum(1 for p in params if p.grad is not None))
        return norm

    patch(torch.nn.utils, "clip_grad_norm_", clip_grad_norm_)
    if hasattr(torch.nn.utils, "clip_grad"):
        patch(torch.nn.utils.clip_grad, "clip_grad_norm_", clip_grad_norm_)
    try:
        yield
    finally:
        for owner, name, value in reversed(undo):
            setattr(owner, name, value)


def run_script(script: Path, script_args: list[str], config: GuardConfig) -> int:
    """Run ``script`` as ``__main__`` under the guard; return its exit status."""
    session = Session(config)
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    sys.argv = [str(script), *script_args]
    sys.path.insert(0, str(script.resolve().parent))
    status = 0
    try:
        with patched(session):
            runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exc:
        status = _exit_status(exc.code)
    except TrainingAborted as exc:
        print(f"[nanguard] {exc}", file=sys.stderr)
        status = 1
        session.close("aborted")
    except BaseException as exc:
        _print_user_traceback(exc, script)
        _diagnose_crash(session, exc)
        status = 130 if isinstance(exc, KeyboardInterrupt) else 1
        session.close("error")
    finally:
        sys.argv, sys.path = saved_argv, saved_path
        session.close("finished" if status == 0 else "error")
    return status


def _print_user_traceback(exc: BaseException, script: Path) -> None:
    """The traceback as ``python SCRIPT`` would print it: starting at the script, without nanguard's frames."""
    tb = exc.__traceback__
    target = str(script.resolve())
    while tb is not None and str(Path(tb.tb_frame.f_code.co_filename).resolve()) != target:
        tb = tb.tb_next
    package = str(Path(__file__).resolve().parent)
    frames = [f for f in traceback.extract_tb(tb if tb is not None else exc.__traceback__)
              if str(Path(f.filename).resolve()) == target or not str(Path(f.filename).resolve()).startswith(package)]
    print("Traceback (most recent call last):", file=sys.stderr)
    print("".join(traceback.format_list(frames)), end="", file=sys.stderr)
    print("".join(traceback.format_exception_only(type(exc), exc)), end="", file=sys.stderr)


def _exit_status(code: Any) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _diagnose_crash(session: Session, exc: BaseException) -> None:
    """The step raised (e.g. ``Target 101 is out of bounds``): the first guard writes an abort event for it."""
    guard = session.guards[0] if session.guards else None
    if guard is None or isinstance(exc, KeyboardInterrupt):
        return
    event = guard.record_crash(exc)
    if event is not None and not session.config.console:
        print(event.summary(), file=sys.stderr)
