"""Watching root modules: every gradient-enabled call of a watched module is told to its watchers.

The patch is on the module's class ``__call__`` (refcounted through :mod:`nanguard.patches`, undone with the
last lease); a call of a ``torch.compile``d watched module is seen through ``OptimizedModule.__call__`` and
reported as a call of its ``_orig_mod``, so the replay can run that module eagerly. Forensics pauses the
watch while it re-runs a step: those calls are not training's.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import torch

from nanguard import patches


class Watcher(Protocol):
    def on_forward_start(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None: ...

    def on_forward_end(self, module: torch.nn.Module, output: Any) -> None: ...


_WATCHED: dict[int, tuple[weakref.ref[torch.nn.Module], list[Watcher]]] = {}
_COMPILED: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()  # watched modules seen called through torch.compile
_COMPILED_LEASES: dict[int, patches.Lease] = {}  # id(module lease) -> its lease on OptimizedModule.__call__
_PAUSED = [0]
_INSIDE: set[int] = set()  # watched calls in progress (a class and its base both patched: report once)


def _make_call(original: Any) -> Any:
    def __call__(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        key = id(self)
        entry = _WATCHED.get(key)
        if entry is None or key in _INSIDE or _PAUSED[0] or entry[0]() is not self or not torch.is_grad_enabled():
            return original(self, *args, **kwargs)
        watchers = list(entry[1])
        for watcher in watchers:
            watcher.on_forward_start(self, args, kwargs)
        _INSIDE.add(key)
        try:
            output = original(self, *args, **kwargs)
        finally:
            _INSIDE.discard(key)
        for watcher in watchers:
            watcher.on_forward_end(self, output)
        return output

    __call__.__wrapped__ = original  # type: ignore[attr-defined]
    return __call__


def _make_compiled_call(original: Any) -> Any:
    """``OptimizedModule.__call__``: a call of a compiled watched module is a call of its ``_orig_mod``.

    The compiled graph never runs the original module's ``__call__`` in Python, so it is recorded here, with
    the original module as the callee: the replay then runs that module eagerly, under the instruments.
    """

    def __call__(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        inner = self.__dict__.get("_modules", {}).get("_orig_mod")
        entry = _WATCHED.get(id(inner)) if inner is not None else None
        if (entry is None or id(inner) in _INSIDE or _PAUSED[0] or entry[0]() is not inner
                or not torch.is_grad_enabled()):
            return original(self, *args, **kwargs)
        assert inner is not None
        _COMPILED.add(inner)
        watchers = list(entry[1])
        for watcher in watchers:
            watcher.on_forward_start(inner, args, kwargs)
        _INSIDE.add(id(inner))
        try:
            output = original(self, *args, **kwargs)
        finally:
            _INSIDE.discard(id(inner))
        for watcher in watchers:
            watcher.on_forward_end(inner, output)
        return output

    __call__.__wrapped__ = original  # type: ignore[attr-defined]
    return __call__


def _optimized_module_class() -> type | None:
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except Exception:  # torch without dynamo
        return None
    return OptimizedModule


def watch(module: torch.nn.Module, watcher: Watcher) -> patches.Lease:
    """Tell ``watcher`` about every gradient-enabled call of ``module``; release the lease to stop."""
    entry = _WATCHED.get(id(module))
    if entry is None or entry[0]() is not module:
        entry = _WATCHED[id(module)] = (weakref.ref(module), [])
    entry[1].append(watcher)
    lease = patches.acquire(type(module), "__call__", _make_call)
    compiled = _optimized_module_class()
    if compiled is not None and not isinstance(module, compiled):
        _COMPILED_LEASES[id(lease)] = patches.acquire(compiled, "__call__", _make_compiled_call)
    return lease


def unwatch(module: torch.nn.Module, watcher: Watcher, lease: patches.Lease) -> None:
    entry = _WATCHED.get(id(module))
    if entry is not None and entry[0]() is module:
        if watcher in entry[1]:
            entry[1].remove(watcher)
        if not entry[1]:
            del _WATCHED[id(module)]
    compiled = _COMPILED_LEASES.pop(id(lease), None)
    if compiled is not None:
        compiled.release()
    lease.release()


@contextmanager
def paused() -> Iterator[None]:
    """No recording while forensics re-runs a step: its calls are not training's."""
    _PAUSED[0] += 1
    try:
        yield
    finally:
        _PAUSED[0] -= 1



def was_compiled(module: torch.nn.Module) -> bool:
    """Whether ``module`` was seen called through ``torch.compile`` (its replay then runs eagerly)."""
    return module in _COMPILED


__all__ = ["Watcher", "paused", "unwatch", "was_compiled", "watch"]
