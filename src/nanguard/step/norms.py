"""Device-side reductions of a step: everything here returns tensors on the device and never synchronises.

The total gradient norm is the quantity clipping computes anyway, so it doubles as the non-finite check;
the same fused norm over the parameters is the weight check.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from nanguard.distributed import materialize, mesh_key


def _grouped(tensors: Iterable[torch.Tensor]) -> dict[tuple[torch.device, torch.dtype], list[torch.Tensor]]:
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = defaultdict(list)
    for t in tensors:
        groups[(t.device, t.dtype)].append(t)
    return groups


def _dense(tensor: torch.Tensor) -> torch.Tensor:
    """The stored values of a sparse gradient (``nn.Embedding(sparse=True)``): same norm, same finiteness.

    Torch has no fused norm for sparse layouts; a COO gradient is coalesced first so that repeated
    indices add up as they do in the parameter update.
    """
    if tensor.layout == torch.strided:
        return tensor
    if tensor.layout == torch.sparse_coo:
        return tensor.coalesce().values()
    return tensor.values()  # CSR/CSC/BSR/BSC


def _foreach_norms_fp32(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per-tensor L2 norms accumulated in float32, so a float16 gradient of norm 7e4 is not called inf."""
    tensors = [_dense(t) for t in tensors]
    if tensors[0].dtype in (torch.float16, torch.bfloat16):
        try:
            return list(torch._foreach_norm(tensors, 2, dtype=torch.float32))  # type: ignore[call-arg]
        except TypeError:  # torch without the dtype argument
            return [torch.linalg.vector_norm(t, dtype=torch.float32) for t in tensors]
    norms = torch._foreach_norm(tensors, 2)
    return list(norms) if tensors[0].dtype == torch.float32 else [n.float() for n in norms]


def total_norm(tensors: Sequence[torch.Tensor], device: torch.device | None = None, *,
               plain: bool | None = None) -> torch.Tensor:
    """The L2 norm of all ``tensors`` together, in float32, on ``device`` (default: the first tensor's).

    This is the quantity gradient clipping computes; it is non-finite exactly when some element is
    non-finite (or the sum overflows float32, which is itself an explosion worth flagging).

    Sharded tensors (FSDP2 ``DTensor`` gradients) give the norm of the whole, unsharded tensor:
    sqrt of the sum over ranks of the local shards' squares. That reduction is one collective per
    device mesh, so under FSDP every rank must call this at the same point (the guard does, once a step).
    ``plain``: the caller knows whether the tensors are plain and on one device (skips the check).
    """
    if not tensors:
        return torch.zeros((), dtype=torch.float32, device=device or "cpu")
    if (plain if plain is not None else simple(tensors)) and (device is None or device == tensors[0].device):
        # The common case, in three kernels: per-tensor norms (accumulated in float32), stack, norm.
        with torch.no_grad():
            per_tensor = _foreach_norms_fp32(list(tensors))
            return torch.linalg.vector_norm(torch.stack(per_tensor)) if len(per_tensor) > 1 else per_tensor[0]
    target = device or _local_device(tensors[0])
    norms: list[torch.Tensor] = []
    for (_, dev, _), group in _grouped_by_mesh(t.detach() for t in tensors).items():
        per_tensor = _foreach_norms_fp32(group)
        group_norm = materialize(torch.linalg.vector_norm(torch.stack(per_tensor)) if len(per_tensor) > 1 else per_tensor[0])
        norms.append(group_norm.float().to(target, non_blocking=dev != target))
    return torch.linalg.vector_norm(torch.stack(norms)) if len(norms) > 1 else norms[0]


def per_tensor_norms(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor's L2 norm (float32 scalars), in one fused kernel; plain tensors on one device that do not
    require grad (gradients) only."""
    return _foreach_norms_fp32(tensors)


def simple(tensors: Sequence[torch.Tensor]) -> bool:
    """Plain tensors (no DTensor), all on one device and of one dtype: one fused norm covers them."""
    first = tensors[0]
    device, dtype = first.device, first.dtype
    return all(type(t) is torch.Tensor or type(t) is torch.nn.Parameter for t in tensors) and all(
        t.dtype == dtype and t.device == device for t in tensors)


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


def scale_grads_(grads: Sequence[torch.Tensor], coef: float) -> None:
    """Multiply gradients in place by a host number (clipping in sync mode, where the norm was read back)."""
    for group in _grouped(grads).values():
        torch._foreach_mul_(group, coef)


def all_finite(tensors: Sequence[torch.Tensor], device: torch.device | None = None) -> torch.Tensor:
    """A boolean device scalar: every element of every tensor is finite (one fused reduction).

    For sharded tensors the answer covers every rank's shards (see :func:`total_norm`), so all ranks
    agree on it, as they must when it decides a rollback.
    """
    return torch.isfinite(total_norm(tensors, device))
