"""Lightning ``strategy="ddp"`` and FSDP2 on 2 CPU processes under torchrun (launched by a test, never collected by pytest).

One launch (the process start dominates the cost), four fits: ``ddp``, rank 1 sees a NaN in batch
``--bad-step``; then FSDP2 (``ModelParallelStrategy``, ``fully_shard`` in ``configure_model``): ``fsdp2_plain``,
healthy without nanguard, ``fsdp2_healthy``, the same with it, ``fsdp2_nan``, the NaN again. Each fit saves
every rank's final weights (``<name>_weights<rank>.pt``) and, when guarded, the guard's records in ``<name>/``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from nanguard.integrations.lightning import NanguardCallback


class Classifier(pl.LightningModule):
    def __init__(self, shard: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
        self.shard = shard

    def configure_model(self) -> None:
        if self.shard:
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for layer in (self.net[0], self.net[2]):
                fully_shard(layer, mesh=mesh)
            fully_shard(self.net, mesh=mesh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.SGD(self.parameters(), lr=0.1)


class PerRank(torch.utils.data.Dataset):
    """Each rank draws its own batches (no sampler), so only rank 1 sees the NaN."""

    def __init__(self, rank: int, steps: int, bad_step: int) -> None:
        gen = torch.Generator().manual_seed(100 + rank)
        self.x = torch.randn(steps * 8, 8, generator=gen)
        self.y = self.x[:, :4].argmax(1)
        if rank == 1 and bad_step >= 0:
            self.x[bad_step * 8 + 2, 1] = float("nan")

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):  # type: ignore[no-untyped-def]
        return self.x[i], self.y[i]


def fit(args: argparse.Namespace, name: str, *, fsdp2: bool, guarded: bool = True, bad_step: int = -1) -> None:
    """One ``Trainer.fit``; saves this rank's parameters (whole tensors) as ``<name>_weights<rank>.pt``."""
    rank = int(os.environ["RANK"])
    module = Classifier(shard=fsdp2)
    callbacks = [NanguardCallback(out_dir=Path(args.out) / name, console=False, report=False)] if guarded else []
    strategy: object = "ddp"
    if fsdp2:
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=args.steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         use_distributed_sampler=False, default_root_dir=args.out, callbacks=callbacks)
    loader = torch.utils.data.DataLoader(PerRank(rank, args.steps, bad_step), batch_size=8)
    trainer.fit(module, loader)
    weights = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in module.named_parameters()}
    torch.save(weights, Path(args.out) / f"{name}_weights{rank}.pt")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--bad-step", type=int, default=5)
    args = parser.parse_args()
    fit(args, "ddp", fsdp2=False, bad_step=args.bad_step)
    fit(args, "fsdp2_plain", fsdp2=True, guarded=False)
    fit(args, "fsdp2_healthy", fsdp2=True)
    fit(args, "fsdp2_nan", fsdp2=True, bad_step=args.bad_step)


if __name__ == "__main__":
    main()
