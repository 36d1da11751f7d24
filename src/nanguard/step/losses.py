"""Whose loss is it? Seeing every ``backward()`` and giving each loss to the guard it belongs to.

``torch.autograd.backward`` is patched process-wide while at least one guard is open (``Tensor.backward``
looks it up at call time, so both spellings pass through once). Each call becomes a pending entry: the
loss value (read unscaled when a GradScaler scaled it) and the guards whose parameters the autograd
graph reaches (a walk over ``grad_fn`` to the ``AccumulateGrad`` leaves, stopped as soon as every open
guard is found; with a single open guard there is nothing to walk). When a guard's optimizer steps it
takes the entries that reach it; an entry that reaches two guards (a GAN's generator loss flows through
the discriminator) belongs to the one that steps next. Two guards in one process never see each other's
losses, and nothing adds up every backward since the last step across guards.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from nanguard import patches

MAX_PENDING = 256
WALK_BUDGET = 100_000


class Owner(Protocol):
    """A guard's step pipeline, as the loss book sees it."""

    def on_backward(self, tensor: torch.Tensor, gradient: torch.Tensor | None, loss: torch.Tensor | None,
                    mine: bool) -> None: ...


@dataclass
class _Entry:
    value: torch.Tensor | None
    owners: tuple[Owner, ...]


class LossBook:
    """The process-wide record of ``backward()`` calls not yet taken by a guard's step."""

    def __init__(self) -> None:
        self._owners: list[Owner] = []
        self._params: dict[int, list[Owner]] = {}
        self._pending: list[_Entry] = []
        self._scaled: dict[int, tuple[weakref.ref[torch.Tensor], torch.Tensor]] = {}
        self._lease: patches.Lease | None = None
        self._lock = threading.RLock()
        self._paused = 0
        self._warned = False

    # -------------------------------------------------------------- owners
    def register(self, owner: Owner, params: Sequence[torch.Tensor]) -> None:
        with self._lock:
            if owner not in self._owners:
                self._owners.append(owner)
            self.update_params(owner, params)
            if self._lease is None:
                self._lease = patches.acquire(torch.autograd, "backward", self._make_backward)

    def update_params(self, owner: Owner, params: Sequence[torch.Tensor]) -> None:
        with self._lock:
            self._forget_params(owner)
            for p in params:
                self._params.setdefault(id(p), []).append(owner)

    def unregister(self, owner: Owner) -> None:
        with self._lock:
            if owner in self._owners:
                self._owners.remove(owner)
            self._forget_params(owner)
            self._pending = [e for e in self._pending if owner not in e.owners]
            if not self._owners and self._lease is not None:
                self._lease.release()
                self._lease = None
                self._pending.clear()
                self._scaled.clear()

    def _forget_params(self, owner: Owner) -> None:
        for key in [k for k, owners in self._params.items() if owner in owners]:
            owners = [o for o in self._params[key] if o is not owner]
            if owners:
                self._params[key] = owners
            else:
                del self._params[key]

    # -------------------------------------------------------------- the hot path
    def _make_backward(self, original: Any) -> Any:
        def backward(tensors: Any, grad_tensors: Any = None, *args: Any, **kwargs: Any) -> Any:
            if not self._paused:
                try:
                    self.on_backward(tensors, grad_tensors)
                except Exception as exc:  # never break the user's backward because of the guard
                    if not self._warned:
                        self._warned = True
                        warnings.warn(f"nanguard: could not record a backward() call: {exc!r}", stacklevel=2)
            return original(tensors, grad_tensors, *args, **kwargs)

        backward.__wrapped__ = original  # type: ignore[attr-defined]
        return backward

    def on_backward(self, tensors: Any, grad_tensors: Any) -> None:
        pairs = _pairs(tensors, grad_tensors)
        for tensor, gradient in pairs:
            loss = self._unscaled(tensor)
            owners = self._owners_of(tensor)
            for owner in self._owners:  # a backward() ends every guard's loss region, its owners' with a loss
                owner.on_backward(tensor, gradient, loss, owner in owners)
            if owners and loss is not None and loss.numel() == 1:
                value = loss.detach().reshape(())
                self._add(_Entry(value if value.dtype == torch.float32 else value.float(), owners))
            elif owners:
                self._add(_Entry(None, owners))

    def _add(self, entry: _Entry) -> None:
        self._pending.append(entry)
        if len(self._pending) > MAX_PENDING:
            del self._pending[: len(self._pending) - MAX_PENDING]

    def _unscaled(self, tensor: torch.Tensor) -> torch.Tensor | None:
        hit = self._scaled.pop(id(tensor), None) if self._scaled else None
        if hit is not None and hit[0]() is tensor:
            return hit[1]
        return tensor if tensor.numel() == 1 else None

    def _owners_of(self, tensor: torch.Tensor) -> tuple[Owner, ...]:
        owners = self._owners
        if len(owners) <= 1:
            return tuple(owners)
        found = _reached(tensor.grad_fn, self._params, len(owners))
        # A graph that reaches no guarded parameter (a custom engine, sharded parameters swapped in by
        # FSDP): whichever guard steps next may take it, as a single guard would.
        return tuple(o for o in owners if o in found) if found else tuple(owners)

    def take(self, owner: Owner) -> tuple[torch.Tensor | None, bool]:
        """The summed loss of the entries that belong to ``owner`` (removed), and whether there were any."""
        with self._lock:
            if not self._pending:
                return None, False
            if len(self._owners) == 1 and self._owners[0] is owner:
                mine, self._pending = self._pending, []
            else:
                mine = [e for e in self._pending if owner in e.owners]
                if not mine:
                    return None, False
                self._pending = [e for e in self._pending if owner not in e.owners]
        values = [e.value for e in mine if e.value is not None]
        if not values:
            return None, True
        total = values[0]
        for value in values[1:]:
            total = total + value.to(total.device)
        return total, True

    def has(self, owner: Owner) -> bool:
        """Whether a loss of ``owner`` is waiting for its step."""
        return any(owner in e.owners and e.value is not None for e in self._pending)

    def note_scaled(self, scaled: torch.Tensor, loss: torch.Tensor) -> None:
        """``scaled = scaler.scale(loss)``: a later ``scaled.backward()`` is read as ``loss``."""
        self._scaled[id(scaled)] = (weakref.ref(scaled), loss)
        if len(self._scaled) > 64:
            self._scaled = {k: v for k, v in self._scaled.items() if v[0]() is not None}

    @contextmanager
    def paused(self) -> Iterator[None]:
        """While forensics re-runs a step: its backward calls are not training's."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    @property
    def pending(self) -> bool:
        """Whether any ``backward()`` is waiting for a step."""
        return bool(self._pending)

    @property
    def owners(self) -> list[Owner]:
        return list(self._owners)


def _pairs(tensors: Any, grad_tensors: Any) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    if isinstance(tensors, torch.Tensor):
        return [(tensors, grad_tensors if isinstance(grad_tensors, torch.Tensor) else None)]
    if isinstance(tensors, (list, tuple)):
        grads = list(grad_tensors) if isinstance(grad_tensors, (list, tuple)) else [None] * len(tensors)
        return [(t, g if isinstance(g, torch.Tensor) else None)
                for t, g in zip(tensors, grads, strict=False) if isinstance(t, torch.Tensor)]
    return []


def _reached(root: Any, params: dict[int, list[Owner]], wanted: int) -> set[Owner]:
    """The owners whose parameters the graph below ``root`` reaches (stops once ``wanted`` are found)."""
    found: set[Owner] = set()
    stack = [root] if root is not None else []
    seen: set[int] = set()
    budget = WALK_BUDGET
    while stack and budget:
        node = stack.pop()
        budget -= 1
        if id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)
        if variable is not None:
            found.update(params.get(id(variable), ()))
            if len(found) >= wanted:
                break
            continue
        stack.extend(nxt for nxt, _ in node.next_functions if nxt is not None)
    return found


BOOK = LossBook()
"""The one loss book of the process (every guard registers with it)."""

__all__ = ["BOOK", "LossBook", "Owner"]
