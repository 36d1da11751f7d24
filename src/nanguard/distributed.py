"""Keeping every rank in lockstep: one verdict for all, decided together.

Under DDP/FSDP a rank that skips while another steps leaves the replicas different forever, and a rank
that stops while another waits in a collective hangs the job. So the per-rank flags are all-gathered
(on NCCL that is one small collective enqueued on the stream, no host sync) and every rank takes the
element-wise maximum as its verdict, while rank 0 keeps the per-rank rows to say *which* rank saw it.

The event path has the same two dangers. A diagnosis that differs between ranks can make the policy
skip on one rank and roll back on another, and a replay that talks to other ranks (DDP's gradient
all-reduce, its buffer broadcast in ``forward``, FSDP's parameter all-gather) hangs when only one rank
replays. Hence :func:`diagnose_on_bad_rank` (one rank diagnoses, every rank gets its answer) and
:func:`isolated_replay` (a DDP replay that issues no collective).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import torch

T = TypeVar("T")


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


def gather_flags(flags: torch.Tensor) -> torch.Tensor:
    """All-gather a 1-D flag vector from every rank: returns ``[world, len(flags)]`` on every rank."""
    if not is_distributed():
        return flags.unsqueeze(0)
    backend = torch.distributed.get_backend()
    device = flags.device
    if backend == "nccl" and device.type != "cuda":
        flags = flags.cuda()
    elif backend == "gloo" and device.type != "cpu":
        flags = flags.cpu()
    out = [torch.empty_like(flags) for _ in range(world_size())]
    torch.distributed.all_gather(out, flags.contiguous())
    return torch.stack(out).to(device)


def broadcast_object(obj: object, src: int) -> object:
    """Send a small picklable object (a diagnosis) from one rank to all; event path only."""
    if not is_distributed():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if is_distributed():
        torch.distributed.barrier()


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


# ---------------------------------------------------------------------- the event path
def diagnose_on_bad_rank(bad_rank: int | None, diagnose: Callable[[], T], fallback: Callable[[], T],
                         *, all_ranks: bool = False) -> T:
    """One diagnosis for every rank: the rank that saw the fault computes it, the others receive it.

    ``diagnose`` runs on ``bad_rank`` only (so a replay there must be collective-free, see
    :func:`isolated_replay`), unless ``all_ranks`` is set: then every rank runs it in lockstep, for
    models whose every access is itself a collective (FSDP). If it raises, ``fallback`` answers instead,
    so the broadcast always happens and no rank is left waiting.
    """
    if not is_distributed():
        return _safely(diagnose, fallback)
    source = bad_rank if bad_rank is not None else 0
    local: T | None = None
    if all_ranks or rank() == source:
        local = _safely(diagnose, fallback)
    return broadcast_object(local, src=source)  # type: ignore[return-value]


def _safely(diagnose: Callable[[], T], fallback: Callable[[], T]) -> T:
    try:
        return diagnose()
    except Exception:  # the other ranks are waiting for an answer: never leave them without one
        return fallback()


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
