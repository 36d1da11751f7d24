"""Every monkeypatch nanguard makes, through one object that can undo it.

Two kinds:

* :class:`Patches` holds one owner's own replacements (a guard's ``optimizer.step``, the zero-code
  runner's ``Optimizer.__init__``); ``undo()`` puts each attribute back as it was, including "absent"
  for an attribute that only existed on the class before.
* :func:`acquire` installs a *process-wide* patch (``torch.autograd.backward``, a class's method) once,
  however many guards need it, and counts them: each lease's ``release()`` drops one count, and the
  last one restores the original. Per-instance behaviour then comes from registries the replacement
  consults (weak references), never from attributes written onto the user's objects.

:func:`active` lists what is patched right now (for tests and for ``close()`` to prove it left no trace).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

_MISSING = object()
_LOCK = threading.RLock()


@dataclass
class _Replacement:
    owner: Any
    name: str
    previous: Any  # _MISSING when the attribute was not in the owner's own __dict__
    value: Any

    def undo(self) -> bool:
        """Put the previous value back; False when someone else replaced ours meanwhile (left alone)."""
        current = _own_attribute(self.owner, self.name)
        if current is not self.value:
            return False
        if self.previous is _MISSING:
            delattr(self.owner, self.name)
        else:
            setattr(self.owner, self.name, self.previous)
        return True


def _own_attribute(owner: Any, name: str) -> Any:
    """The attribute as stored on ``owner`` itself (its ``__dict__``), not inherited."""
    namespace = getattr(owner, "__dict__", None)
    if namespace is not None and name in namespace:
        return namespace[name]
    return _MISSING if namespace is not None else getattr(owner, name, _MISSING)


def _replace(owner: Any, name: str, value: Any) -> _Replacement:
    replacement = _Replacement(owner, name, _own_attribute(owner, name), value)
    setattr(owner, name, value)
    return replacement


@dataclass
class Patches:
    """One owner's replacements, undone together (newest first)."""

    _done: list[_Replacement] = field(default_factory=list)

    def replace(self, owner: Any, name: str, value: Any) -> Any:
        """Set ``owner.name = value``; returns what ``owner.name`` resolved to before."""
        original = getattr(owner, name)
        self._done.append(_replace(owner, name, value))
        return original

    def undo(self) -> list[str]:
        """Undo every replacement; returns the ones that could not be undone because something wrapped them."""
        stuck = []
        while self._done:
            item = self._done.pop()
            if not item.undo():
                stuck.append(f"{_label(item.owner)}.{item.name}")
        return stuck

    def __len__(self) -> int:
        return len(self._done)


@dataclass
class _Shared:
    replacement: _Replacement
    original: Any
    count: int = 0


_SHARED: dict[tuple[int, str], _Shared] = {}


@dataclass
class Lease:
    """One holder's claim on a process-wide patch; ``release()`` is idempotent."""

    key: tuple[int, str]
    original: Any
    released: bool = False

    def release(self) -> None:
        with _LOCK:
            if self.released:
                return
            self.released = True
            shared = _SHARED.get(self.key)
            if shared is None:
                return
            shared.count -= 1
            if shared.count <= 0:
                del _SHARED[self.key]
                shared.replacement.undo()


def acquire(owner: Any, name: str, make: Callable[[Any], Any]) -> Lease:
    """Hold the process-wide patch of ``owner.name``; the first holder installs ``make(original)``.

    ``original`` is what ``owner.name`` resolved to before (for a class, possibly a base class's method).
    """
    key = (id(owner), name)
    with _LOCK:
        shared = _SHARED.get(key)
        if shared is None:
            original = getattr(owner, name)
            shared = _SHARED[key] = _Shared(_replace(owner, name, make(original)), original)
        shared.count += 1
        return Lease(key, shared.original)


def active() -> list[str]:
    """The process-wide patches installed right now, as ``owner.name`` strings."""
    with _LOCK:
        return sorted(f"{_label(s.replacement.owner)}.{s.replacement.name}" for s in _SHARED.values())


def _label(owner: Any) -> str:
    if isinstance(owner, type):
        return f"{owner.__module__}.{owner.__qualname__}"
    return getattr(owner, "__name__", type(owner).__name__)


__all__ = ["Lease", "Patches", "acquire", "active"]
