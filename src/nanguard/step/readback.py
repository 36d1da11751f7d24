"""Moving a step's device vector to the host without waiting for the device.

On CUDA the copy goes to pinned memory with ``non_blocking=True`` and a CUDA event marks completion;
:meth:`DeviceReadback.poll` returns only the items whose event has completed, so the host never waits.
Elsewhere (CPU) the vector already lives on the host and reading it is free.

Each item carries the host-side context of its step (what a later decision needs: the limits used,
the layout, references for a replay), so nothing about a pending step is parked anywhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

T = TypeVar("T")


@dataclass
class Item(Generic[T]):
    step: int
    host: torch.Tensor
    ready_event: Any | None
    context: T

    def ready(self) -> bool:
        return self.ready_event is None or bool(self.ready_event.query())

    def values(self) -> list[float]:
        return [float(v) for v in self.host.tolist()]


class DeviceReadback(Generic[T]):
    """A queue of per-step vectors on their way to the host, oldest first."""

    def __init__(self) -> None:
        self._pending: list[Item[T]] = []
        self._free: dict[int, list[torch.Tensor]] = {}

    def _pinned(self, numel: int) -> torch.Tensor:
        """A pinned host buffer from a small pool: allocating pinned memory per step could synchronise."""
        pool = self._free.setdefault(numel, [])
        return pool.pop() if pool else torch.empty(numel, dtype=torch.float32, pin_memory=True)

    def push(self, step: int, vector: torch.Tensor, context: T) -> None:
        if vector.dim() != 1:
            vector = vector.reshape(-1)
        if vector.device.type == "cuda":
            host = self._pinned(vector.numel())
            host.copy_(vector, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending.append(Item(step, host, event, context))
        else:
            # A CPU tensor is already on the host; other devices copy here.
            host = vector if vector.device.type == "cpu" else vector.to("cpu")
            self._pending.append(Item(step, host, None, context))

    def poll(self, wait: bool = False, until: int | None = None) -> list[Item[T]]:
        """Completed items, oldest first. ``wait``: wait for all; ``until``: wait for those up to that step and
        return none after it (so several processes act on the same steps at the same time)."""
        done: list[Item[T]] = []
        while self._pending:
            head = self._pending[0]
            if until is not None:
                if head.step > until:
                    break
                wait = True
            elif not (wait or head.ready()):
                break
            item = self._pending.pop(0)
            if item.ready_event is not None:
                if wait:
                    item.ready_event.synchronize()
                done.append(Item(item.step, item.host.clone(), None, item.context))
                self._free.setdefault(item.host.numel(), []).append(item.host)
            else:
                done.append(item)
        return done

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    def clear(self) -> None:
        self._pending.clear()

    def __len__(self) -> int:
        return len(self._pending)


class Uploads:
    """Small host vectors (per-step limits) sent to the device without a sync: through a pool of pinned
    buffers, each reused only once its copy has completed. On a CPU a new tensor is all it takes."""

    def __init__(self) -> None:
        self._pool: list[tuple[torch.Tensor, Any]] = []
        self._constants: dict[tuple[float, int, torch.device], torch.Tensor] = {}

    def send(self, values: list[float], device: torch.device) -> torch.Tensor:
        if device.type != "cuda":
            return torch.tensor(values, dtype=torch.float32, device=device)
        host = next((buf for buf, event in self._pool if buf.numel() == len(values) and event.query()), None)
        if host is None:
            host = torch.empty(len(values), dtype=torch.float32, pin_memory=True)
            if len(self._pool) >= 16:
                self._pool.pop(0)
        else:
            self._pool = [(b, e) for b, e in self._pool if b is not host]
        host.numpy()[:] = values
        out = host.to(device, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pool.append((host, event))
        return out

    def constant(self, value: float, numel: int, device: torch.device) -> torch.Tensor:
        """A vector of one repeated value, made once per (value, length, device)."""
        key = (value, numel, device)
        if key not in self._constants:
            self._constants[key] = torch.full((numel,), value, dtype=torch.float32, device=device)
        return self._constants[key]


__all__ = ["DeviceReadback", "Item", "Uploads"]
