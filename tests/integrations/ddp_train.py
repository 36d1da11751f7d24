"""A 2-rank training script for the torch.distributed tests (launched by torchrun, never collected by pytest).

One rank sees a NaN batch at a known step (or several steps in a row, to force a rollback). Every rank
saves its final weights and, when it owns the guard, the events it saw, so the test can compare ranks.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["run", "guard", "integration"], default="run")
    parser.add_argument("--parallel", choices=["ddp", "fsdp"], default="ddp")
    parser.add_argument("--batchnorm", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--guard-wrapper", action="store_true", help="give the guard the DDP wrapper, not the module")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--bad-steps", default="5")
    parser.add_argument("--bad-rank", type=int, default=1)
    parser.add_argument("--crash-step", type=int, default=-1, help="a label out of range on the bad rank: IndexError")
    parser.add_argument("--out", default="")
    parser.add_argument("--results", required=True)
    args = parser.parse_args()
    bad_steps = {int(s) for s in args.bad_steps.split(",") if s}

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    # BatchNorm buffers make DDP broadcast in forward: a replay on one rank must not (see isolated_replay).
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.BatchNorm1d(32) if args.batchnorm else nn.Identity(), nn.Linear(32, 4))
    if args.parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in (model[0], model[3]):
            fully_shard(layer)
        fully_shard(model)
        wrapped = model
    else:
        wrapped = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

    guard = None
    options = {"out_dir": args.out, "console": False, "report": False, "snapshot_every": 2}
    if args.mode == "guard":
        from nanguard import Guard

        guard = Guard(model, optimizer, **options)
    elif args.mode == "integration":
        from nanguard.integrations._guard import IntegrationGuard

        guard = IntegrationGuard(wrapped if args.guard_wrapper else model, optimizer, replay_wrappers=[wrapped], **options)

    gen = torch.Generator().manual_seed(100 + rank)
    reference_norms: list[float] = []
    try:
        for step in range(args.steps):
            x = torch.randn(16, 8, generator=gen)
            y = x[:, :4].argmax(1)
            if step in bad_steps and rank == args.bad_rank:
                x[2, 1] = float("nan")
            if step == args.crash_step and rank == args.bad_rank:
                y[3] = 40  # only 4 classes: the loss raises IndexError on this rank alone
            loss = F.cross_entropy(wrapped(x), y)
            loss.backward()
            norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
            reference_norms.append(float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm))
            optimizer.step()
            optimizer.zero_grad()
    finally:  # the style the issue reports: ``try/finally close()``, no ``with``
        if guard is not None:
            guard.close()

    # Parameters only: BatchNorm running statistics legitimately differ per rank after the last forward.
    state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in model.named_parameters()}
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    torch.save(state, results / f"weights{rank}.pt")
    record = {"reference_norms": reference_norms, "world": dist.get_world_size(), "env_rank": os.environ.get("RANK")}
    if guard is not None:
        record["events"] = [{"step": e.step, "action": e.action, "rank": e.rank, "cause": e.diagnosis.cause} for e in guard.events]
        record["summary"] = guard.summary()
    (results / f"rank{rank}.json").write_text(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
