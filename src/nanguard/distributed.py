"""Keeping every rank in lockstep: one verdict for all, decided together.

Under DDP/FSDP a rank that skips while another steps leaves the replicas different forever, and a rank
that stops while another waits in a collective hangs the job. So the per-rank flags are all-gathered
(on NCCL that is one small collective enqueued on the stream, no host sync) and every rank takes the
element-wise maximum as its verdict, while rank 0 keeps the per-rank rows to say *which* rank saw it.
"""

from __future__ import annotations

import os

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
