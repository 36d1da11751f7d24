"""torch.distributed as the guard needs it: ranks, sharded tensors, and replays that talk to no one.

A replay that talks to other ranks (DDP's gradient all-reduce, its buffer broadcast in ``forward``,
FSDP's parameter all-gather) hangs when only one rank replays, hence :func:`isolated_replay`. Keeping
ranks in agreement on verdicts and diagnoses is :mod:`nanguard.step.lockstep`'s job.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch


def is_distributed() -> bool:
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


def rank() -> int:
    """This process's rank; before ``init_process_group`` the launcher's RANK variable says it."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0") or 0)


def world_size() -> int:
    return torch.distributed.get_world_size() if is_distributed() else 1


# ---------------------------------------------------------------------- sharded tensors (FSDP2 / DTensor)
def is_dtensor(tensor: Any) -> bool:
    """A ``torch.distributed.tensor.DTensor`` (FSDP2 parameters and gradients), checked without importing it."""
    return type(tensor).__name__ == "DTensor" and hasattr(tensor, "full_tensor") and hasattr(tensor, "placements")


def mesh_key(tensor: torch.Tensor) -> Any:
    """Tensors that can be reduced together: same device mesh and placements (``None`` for plain tensors)."""
    if not is_dtensor(tensor):
        return None
    return (id(tensor.device_mesh), tuple(tensor.placements))  # type: ignore[attr-defined]


def materialize(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor holding a reduction's full value: a DTensor is reduced over its mesh (a collective).

    Every rank of the mesh must call this at the same point, as the guard does once per step.
    """
    if is_dtensor(tensor):
        return tensor.full_tensor()  # type: ignore[attr-defined,no-any-return]
    return tensor


def uses_sharded_parameters(models: Iterable[torch.nn.Module]) -> bool:
    """True for FSDP models (FSDP2 DTensor parameters, FSDP1 wrappers): their forward all-gathers parameters,
    so no rank may replay one alone."""
    for model in models:
        if any(type(m).__name__ == "FullyShardedDataParallel" or type(m).__name__.startswith("FSDP") for m in model.modules()):
            return True
        if any(is_dtensor(p) for p in model.parameters()):
            return True
    return False


@contextlib.contextmanager
def isolated_replay(models: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Re-run a step on this rank alone: DDP's gradient all-reduce and its buffer broadcast are switched off.

    ``no_sync()`` alone is not enough: a DDP ``forward`` broadcasts buffers (BatchNorm statistics) from
    rank 0 before it runs, unless ``require_forward_param_sync`` is off.
    """
    with contextlib.ExitStack() as stack:
        for model in models:
            for wrapper in _ddp_wrappers(model):
                stack.enter_context(wrapper.no_sync())
                saved = wrapper.require_forward_param_sync
                wrapper.require_forward_param_sync = False
                stack.callback(setattr, wrapper, "require_forward_param_sync", saved)
            no_sync = getattr(model, "no_sync", None)
            if callable(no_sync) and not isinstance(model, torch.nn.parallel.DistributedDataParallel):
                stack.enter_context(no_sync())
        yield


def _ddp_wrappers(model: torch.nn.Module) -> list[torch.nn.parallel.DistributedDataParallel]:
    return [m for m in model.modules() if isinstance(m, torch.nn.parallel.DistributedDataParallel)]


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The user's own module inside DDP / DataParallel / ``torch.compile`` wrappers, so names match theirs."""
    seen = 0
    while seen < 8:
        inner = getattr(model, "module", None) if isinstance(
            model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)) else None
        inner = inner if inner is not None else getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner
        seen += 1
    return model
