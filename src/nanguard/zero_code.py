"""Zero-code mode: ``nanguard run [--out DIR] [--policy NAME] SCRIPT [ARGS...]``.

The script runs unmodified, as ``__main__``, with a few PyTorch entry points patched for its duration
(all through one :class:`~nanguard.patches.Patches`, undone when the script ends):

* ``torch.optim.Optimizer.__init__``: every optimizer the script creates gets a :class:`~nanguard.Guard`.
  The model(s) it trains are found by looking, in the creating frames, for modules that own its
  parameters (and again at the first step if none was found then);
* ``LRScheduler.__init__``: schedulers are held back on skipped steps;
* ``torch.nn.utils.clip_grad_norm_``: the norm the script computes is reused, not computed twice.

GradScalers need nothing extra: every guard watches them (see :mod:`nanguard.step.scaler`). All guards
of the run write to one :class:`~nanguard.records.RunRecords`, exactly as a Guard would on its own.

Replay without a closure works from what :mod:`nanguard.forensics.capture` records each step. If the
script raises, the exception is diagnosed (e.g. a class target out of range), written as an
``exception`` event (action ``abort``), and re-raised, so the exit status is the script's own.
"""

from __future__ import annotations

import argparse
import contextlib
import runpy
import signal
import sys
import threading
import traceback
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from nanguard import distributed as dist_utils
from nanguard.config import PRESETS, GuardConfig, resolve_config
from nanguard.errors import TrainingAborted, UsageError
from nanguard.forensics.naming import is_library_module
from nanguard.guard import Guard
from nanguard.patches import Patches
from nanguard.records import RunRecords, merge_summaries


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
    """The guards and the records of one zero-code run."""

    def __init__(self, config: GuardConfig) -> None:
        self.config = config
        self.records = RunRecords(config.out_dir, config, writer=dist_utils.rank() == 0)
        self.guards: list[Guard] = []
        self._by_optimizer: weakref.WeakKeyDictionary[torch.optim.Optimizer, Guard] = weakref.WeakKeyDictionary()
        self._closed = False

    def guard_of(self, optimizer: torch.optim.Optimizer) -> Guard | None:
        return self._by_optimizer.get(optimizer)

    def on_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        if optimizer in self._by_optimizer:
            return
        models = find_models(optimizer)
        guard = Guard(models, optimizer, config=self.config, out_dir=self.records.out_dir, records=self.records)
        if not models:
            guard.find_models = lambda: find_models(optimizer, start_depth=4, max_frames=16)
        self.guards.append(guard)
        self._by_optimizer[optimizer] = guard

    def note_clip_norm(self, params: list[torch.Tensor], norm: torch.Tensor) -> None:
        """A ``clip_grad_norm_`` call: the guard of those parameters reuses the norm."""
        ids = {id(p) for p in params}
        for guard in self.guards:
            owned = [p for p in guard.subjects.params() if id(p) in ids]
            if owned:
                guard.note_clip_norm(norm, sum(1 for p in params if p.grad is not None))

    def record_crash(self, exc: BaseException) -> None:
        """The script raised: the first guard writes the ``exception`` event for it."""
        if not self.guards or isinstance(exc, KeyboardInterrupt):
            return
        event = self.guards[0].record_crash(exc)
        if event is not None and not self.config.console:
            print(event.summary(), file=sys.stderr)

    def close(self, status: str) -> None:
        if self._closed:
            return
        self._closed = True
        for guard in self.guards:
            with contextlib.suppress(TrainingAborted):
                guard.close(status=status)
        summaries = [guard.summary() for guard in self.guards] or [
            {"steps": 0, "skipped": 0, "rollbacks": 0, "clipped": 0, "events": 0, "causes": [], "aborted": False}]
        summary = merge_summaries(summaries, status)
        if not summary.get("steps"):  # a syntax error, or a script with no optimizer: claim nothing
            summary["checked"] = "no optimizer step was seen: nothing was checked for NaN/Inf"
            if not self.config.console:
                print(f"[nanguard] {'done' if status == 'finished' else status}: {summary['checked']}", file=sys.stderr)
        self.records.close(summary, announce=True)


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
    scored = [(len({id(p) for p in m.parameters()} & wanted), m) for m in candidates.values()]
    scored = sorted((s for s in scored if s[0]), key=lambda item: -item[0])
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
        yield from (item for item in value if isinstance(item, torch.nn.Module))
    elif isinstance(value, dict) and len(value) < 64:
        yield from (item for item in value.values() if isinstance(item, torch.nn.Module))
    elif hasattr(value, "__dict__") and not isinstance(value, type) and type(value).__module__ not in ("builtins",):
        try:
            attributes = vars(value)
        except TypeError:
            return
        yield from (item for item in list(attributes.values())[:64] if isinstance(item, torch.nn.Module))


def _contains(parent: torch.nn.Module, child: torch.nn.Module) -> bool:
    return any(m is child for m in parent.modules())


def install(session: Session) -> Patches:
    """Patch the entry points the session needs; ``undo()`` the returned patches to take them all out."""
    from torch.optim import lr_scheduler

    patches = Patches()
    original_init = torch.optim.Optimizer.__init__

    def optimizer_init(self: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        try:
            session.on_optimizer(self)
        except Exception as exc:  # never break the user's script because the guard could not attach
            print(f"[nanguard] could not guard {type(self).__name__}: {exc}", file=sys.stderr)

    patches.replace(torch.optim.Optimizer, "__init__", optimizer_init)

    scheduler_base = getattr(lr_scheduler, "LRScheduler", None) or lr_scheduler._LRScheduler
    original_scheduler_init = scheduler_base.__init__

    def scheduler_init(self: Any, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> None:
        original_scheduler_init(self, optimizer, *args, **kwargs)
        guard = session.guard_of(optimizer)
        if guard is not None:
            guard.attach_scheduler(self)

    patches.replace(scheduler_base, "__init__", scheduler_init)
    original_clip = torch.nn.utils.clip_grad_norm_

    def clip_grad_norm_(parameters: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
        norm = original_clip(params, *args, **kwargs)
        session.note_clip_norm(params, norm)
        return norm

    patches.replace(torch.nn.utils, "clip_grad_norm_", clip_grad_norm_)
    if hasattr(torch.nn.utils, "clip_grad"):
        patches.replace(torch.nn.utils.clip_grad, "clip_grad_norm_", clip_grad_norm_)
    return patches


def run_script(script: Path, script_args: list[str], config: GuardConfig) -> int:
    """Run ``script`` as ``__main__`` under the guard; return its exit status. Leaves no patch behind.

    Ctrl-C (SIGINT) and SIGTERM (a cluster pre-empting the job) end the script as they would without
    nanguard, but the records are flushed first and the run is recorded with status ``interrupted``.
    """
    session = Session(config)
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    sys.argv = [str(script), *script_args]
    sys.path.insert(0, str(script.resolve().parent))
    status, outcome = 0, "finished"
    patches = install(session)
    terminated = _SigtermWatch()
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exc:
        status = _exit_status(exc.code)
        outcome = "interrupted" if terminated() else ("finished" if status == 0 else "error")
    except TrainingAborted as exc:
        print(f"[nanguard] {exc}", file=sys.stderr)
        status, outcome = 1, "aborted"
    except KeyboardInterrupt:
        status, outcome = 130, "interrupted"
    except BaseException as exc:
        _print_user_traceback(exc, script)
        session.record_crash(exc)
        status, outcome = 1, "error"
    finally:
        terminated.restore()
        patches.undo()
        sys.argv, sys.path = saved_argv, saved_path
        if outcome == "interrupted":
            steps = sum(guard.step_count for guard in session.guards)
            signal_name = "SIGTERM" if terminated() else "SIGINT"
            print(f"[nanguard] {signal_name} after {steps} optimizer steps: records flushed, status interrupted",
                  file=sys.stderr)
        session.close(outcome)
    return status


class _SigtermWatch:
    """SIGTERM raises ``SystemExit(143)`` (so ``finally`` blocks and the records' close run) and is noted."""

    def __init__(self) -> None:
        self.seen = False
        self._previous: Any = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.seen = True
        raise SystemExit(128 + signum)

    def __call__(self) -> bool:
        return self.seen

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


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


__all__ = ["Session", "add_arguments", "find_models", "install", "main", "run_script"]
