"""Device-side signals: everything here returns tensors on the device and never synchronises.

The guard folds these into one verdict tensor per step; the host reads verdicts back either at once
(sync mode, or on CPU where reading is free) or asynchronously through :class:`DeviceReadback`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from nanguard.distributed import materialize, mesh_key


def _grouped(tensors: Iterable[torch.Tensor]) -> dict[tuple[torch.device, torch.dtype], list[torch.Tensor]]:
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = defaultdict(list)
    for t in tensors:
        groups[(t.device, t.dtype)].append(t)
    return groups


def _foreach_norms_fp32(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per-tensor L2 norms accumulated in float32, so a float16 gradient of norm 7e4 is not called inf."""
    if tensors[0].dtype in (torch.float16, torch.bfloat16):
        try:
            return list(torch._foreach_norm(tensors, 2, dtype=torch.float32))  # type: ignore[call-arg]
        except TypeError:  # torch without the dtype argument
            return [torch.linalg.vector_norm(t, dtype=torch.float32) for t in tensors]
    return [n.float() for n in torch._foreach_norm(tensors, 2)]


def total_norm(tensors: Sequence[torch.Tensor], device: torch.device | None = None) -> torch.Tensor:
    """The L2 norm of all ``tensors`` together, in float32, on ``device`` (default: the first tensor's).

    This is the quantity gradient clipping computes; it is non-finite exactly when some element is
    non-finite (or the sum overflows float32, which is itself an explosion worth flagging).

    Sharded tensors (FSDP2 ``DTensor`` gradients) give the norm of the whole, unsharded tensor:
    sqrt of the sum over ranks of the local shards' squares. That reduction is one collective per
    device mesh, so under FSDP every rank must call this at the same point (the guard does, once a step).
    """
    if not tensors:
        return torch.zeros((), dtype=torch.float32, device=device or "cpu")
    target = device or _local_device(tensors[0])
    norms: list[torch.Tensor] = []
    for (_, dev, _), group in _grouped_by_mesh(t.detach() for t in tensors).items():
        per_tensor = _foreach_norms_fp32(group)
        group_norm = materialize(torch.linalg.vector_norm(torch.stack(per_tensor)) if len(per_tensor) > 1 else per_tensor[0])
        norms.append(group_norm.float().to(target, non_blocking=dev != target))
    return torch.linalg.vector_norm(torch.stack(norms)) if len(norms) > 1 else norms[0]


def _local_device(tensor: torch.Tensor) -> torch.device:
    """The device a tensor's data lives on (for a DTensor: its local shard's)."""
    local = getattr(tensor, "_local_tensor", None)
    return local.device if isinstance(local, torch.Tensor) else tensor.device


def _grouped_by_mesh(tensors: Iterable[torch.Tensor]) -> dict[tuple[Any, torch.device, torch.dtype], list[torch.Tensor]]:
    """Group for fused norms: plain tensors by (device, dtype), DTensors also by mesh and placements."""
    groups: dict[tuple[Any, torch.device, torch.dtype], list[torch.Tensor]] = defaultdict(list)
    for t in tensors:
        groups[(mesh_key(t), t.device, t.dtype)].append(t)
    return groups


def grads_of(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return [p.grad for p in params if p.grad is not None]


def scale_grads_(grads: Sequence[torch.Tensor], coef: torch.Tensor) -> None:
    """Multiply gradients in place by a device scalar (clipping without a host round trip)."""
    for (dev, dtype), group in _grouped(grads).items():
        torch._foreach_mul_(group, coef.to(device=dev, dtype=dtype if dtype.is_floating_point else coef.dtype))


def all_finite(tensors: Sequence[torch.Tensor], device: torch.device | None = None) -> torch.Tensor:
    """A boolean device scalar: every element of every tensor is finite (one fused reduction).

    For sharded tensors the answer covers every rank's shards (see :func:`total_norm`), so all ranks
    agree on it, as they must when it decides a rollback.
    """
    return torch.isfinite(total_norm(tensors, device))


@dataclass
class Readback:
    """A group of device scalars for one step, copied to host memory without blocking."""

    step: int
    host: torch.Tensor
    ready_event: Any | None

    def ready(self) -> bool:
        return self.ready_event is None or bool(self.ready_event.query())

    def values(self) -> list[float]:
        return [float(v) for v in self.host.tolist()]


class DeviceReadback:
    """Moves per-step scalars (loss, grad norm, verdict) to the host one or more steps late.

    On CUDA the copy goes to pinned memory with ``non_blocking=True`` and a CUDA event marks completion;
    :meth:`poll` returns only the groups whose event has completed, so the host never waits.
    Elsewhere (CPU) the copy is immediate and free.
    """

    def __init__(self) -> None:
        self._pending: list[Readback] = []
        self._free: dict[int, list[torch.Tensor]] = {}

    def _pinned(self, numel: int) -> torch.Tensor:
        """A pinned host buffer from a small pool: allocating pinned memory per step could synchronise."""
        pool = self._free.setdefault(numel, [])
        return pool.pop() if pool else torch.empty(numel, dtype=torch.float32, pin_memory=True)

    def push(self, step: int, scalars: Sequence[torch.Tensor]) -> None:
        packed = torch.stack([s.detach().float().reshape(()) for s in scalars])
        if packed.device.type == "cuda":
            host = self._pinned(packed.numel())
            host.copy_(packed, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending.append(Readback(step, host, event))
        else:
            # A CPU tensor is already on the host (and freshly made by stack); other devices copy here.
            host = packed if packed.device.type == "cpu" else packed.to("cpu")
            self._pending.append(Readback(step, host, None))

    def release(self, item: Readback) -> None:
        if item.ready_event is not None:
            self._free.setdefault(item.host.numel(), []).append(item.host)

    def poll(self, wait: bool = False, until: int | None = None) -> list[Readback]:
        """Completed groups, oldest first. ``wait``: wait for all; ``until``: wait for those up to that step
        and return none after it (so several processes can act on the same steps at the same time)."""
        done: list[Readback] = []
        while self._pending:
            head = self._pending[0]
            if until is not None:
                if head.step > until:
                    break
                wait = True
            elif not (wait or head.ready()):
                break
            item = self._pending.pop(0)
            if wait and item.ready_event is not None:
                item.ready_event.synchronize()
            done.append(Readback(item.step, item.host.clone(), None))
            self.release(item)
        return done

    def __len__(self) -> int:
        return len(self._pending)
