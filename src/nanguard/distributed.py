"""torch.distributed as the guard needs it: ranks, sharded tensors, and replays that talk to no one.

A replay that talks to other ranks (DDP's gradient all-reduce, its buffer broadcast in ``forward``,
FSDP's parameter all-gather) hangs when only one rank replays, hence :func:`isolated_replay`. Keeping
ranks in agreement on verdicts and diagnoses is :mod:`nanguard.step.lockstep`'s job.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from nanguard.config import GuardConfig
    from nanguard.events import Event


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


# ---------------------------------------------------------------------- a crash on one rank
_PEER_GONE = re.compile(
    r"connection (closed|reset) by peer|broken pipe|NCCL communicator was aborted|"
    r"(socket|connection) (timeout|closed)|remote process exited|Timed out waiting", re.IGNORECASE)


def is_peer_failure(exc: BaseException) -> bool:
    """The error a rank gets in a collective when *another* rank died (gloo: "Connection closed by peer").

    It is the consequence, not the fault: the rank that raised first writes the diagnosis.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    backend_error = getattr(torch.distributed, "DistBackendError", ())
    return isinstance(exc, backend_error) or (isinstance(exc, RuntimeError) and bool(_PEER_GONE.search(str(exc))))


def rank_out_dir(out_dir: str | os.PathLike[str], rank_: int) -> Path:
    """Where a rank other than 0 writes its own crash record: ``<out_dir>/rank<N>``."""
    return Path(out_dir) / f"rank{rank_}"


def write_rank_crash(out_dir: str | os.PathLike[str], config: GuardConfig, event: Event,
                     summary: dict[str, Any]) -> Path:
    """Write a crash event that a non-writing rank diagnosed, in a records directory of its own.

    Only rank 0 writes the run's records, but the rank that raised is the one that holds the failing
    batch and the diagnosis; the job is going down, so this rank writes ``events.jsonl``, the summary and
    the report under ``<out_dir>/rank<N>`` itself (nobody else writes there).
    """
    import dataclasses

    from nanguard.records import RunRecords

    where = rank_out_dir(out_dir, event.rank)
    quiet = dataclasses.replace(config, console=False, tensorboard=False, wandb=False, mlflow=False)
    records = RunRecords(where, quiet, writer=True)
    records.on_event(event)
    records.close({**summary, "status": "error", "rank": event.rank})
    print(f"nanguard: rank {event.rank} raised {event.details.get('exception', '')}; "
          f"its diagnosis is in {where / 'events.jsonl'}", file=sys.stderr)
    return where
