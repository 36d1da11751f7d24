"""Keeping every rank in lockstep: one verdict for all, one diagnosis for all.

Under DDP/FSDP a rank that skips while another steps leaves the replicas different forever, and a rank
that stops while another waits in a collective hangs the job. So each step's vector is all-gathered (on
NCCL one small collective enqueued on the stream, no host sync), every rank decides from the same
``[world, len]`` matrix, and the host keeps the rows to say *which* rank saw the fault.

The event path has the same danger: a diagnosis that differs between ranks can make the policy skip on
one rank and roll back on another. :func:`decide_together` has one rank (the one that saw the fault)
compute an answer and every rank receive it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

from nanguard.distributed import is_distributed, rank, world_size

T = TypeVar("T")


def gather(vector: torch.Tensor) -> torch.Tensor:
    """All-gather a 1-D vector from every rank: ``[world, len]`` (``[1, len]`` in a single process)."""
    if not is_distributed():
        return vector.unsqueeze(0)
    backend = torch.distributed.get_backend()
    device = vector.device
    if backend == "nccl" and device.type != "cuda":
        vector = vector.cuda()
    elif backend == "gloo" and device.type != "cpu":
        vector = vector.cpu()
    out = [torch.empty_like(vector) for _ in range(world_size())]
    torch.distributed.all_gather(out, vector.contiguous())
    return torch.stack(out).to(device)


def broadcast_object(obj: object, src: int) -> object:
    """Send a small picklable object (a diagnosis) from one rank to all; event path only."""
    if not is_distributed():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def decide_together(source: int | None, decide: Callable[[], T], fallback: Callable[[], T], *,
                    all_ranks: bool = False) -> T:
    """One answer for every rank: rank ``source`` computes it, the others receive it.

    ``decide`` runs on ``source`` only (so a replay there must be collective-free), unless ``all_ranks`` is
    set: then every rank runs it in lockstep, for models whose every access is itself a collective (FSDP).
    If it raises, ``fallback`` answers instead, so the broadcast always happens and no rank is left waiting.
    """
    if not is_distributed():
        return _safely(decide, fallback)
    src = source if source is not None else 0
    local: T | None = None
    if all_ranks or rank() == src:
        local = _safely(decide, fallback)
    return broadcast_object(local, src=src)  # type: ignore[return-value]


def _safely(decide: Callable[[], T], fallback: Callable[[], T]) -> T:
    try:
        return decide()
    except Exception:  # the other ranks are waiting for an answer: never leave them without one
        return fallback()


__all__ = ["broadcast_object", "decide_together", "gather"]
