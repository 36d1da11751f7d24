"""Lightning ``strategy="ddp"`` on 2 CPU processes under torchrun (launched by a test, never collected by pytest).

Rank 1 sees a NaN in batch ``--bad-step``; each rank saves its final weights and the guard's events.
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
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))

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
        if rank == 1:
            self.x[bad_step * 8 + 2, 1] = float("nan")

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):  # type: ignore[no-untyped-def]
        return self.x[i], self.y[i]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--bad-step", type=int, default=5)
    args = parser.parse_args()
    rank = int(os.environ["RANK"])
    module = Classifier()
    callback = NanguardCallback(out_dir=Path(args.out) / "nanguard", console=False, report=False)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=args.steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         use_distributed_sampler=False, default_root_dir=args.out, callbacks=[callback])
    loader = torch.utils.data.DataLoader(PerRank(rank, args.steps, args.bad_step), batch_size=8)
    trainer.fit(module, loader)
    torch.save({k: v.detach().clone() for k, v in module.named_parameters()}, Path(args.out) / f"weights{rank}.pt")


if __name__ == "__main__":
    main()
