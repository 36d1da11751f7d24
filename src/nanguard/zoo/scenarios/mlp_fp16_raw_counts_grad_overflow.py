"""fp16 autocast on raw, un-normalised counts: the gradients overflow float16 at any loss scale.

A regression MLP under CPU float16 autocast with a GradScaler. The inputs are raw counts in the
thousands (the same scale in every batch: no batch is an outlier). The forward stays below 65504, but
the weight gradient of the first Linear (counts x upstream gradient, summed over the batch) overflows
float16 even after the GradScaler has backed its scale off to below 1, so every step is skipped and the
model never trains. In float32 the gradients are finite. Normalise the inputs or train in bf16.
nanguard replays the scaler's first skip with the loss scale at 1: the gradients are still inf, so it is
reported at step 0 rather than after a run of skips.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

EXPECTED = {"step": 0, "trigger": "nonfinite_grad", "cause": "backward_overflow", "phase": "backward",
            "module": None, "op": None, "tensor": None}
RECOVERABLE = False
TAGS = ("mlp", "fp16", "autocast", "grad_scaler")
STEPS = 40


class CountRegressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.input_layer = nn.Linear(32, 64)
        self.hidden = nn.Linear(64, 1)

    def forward(self, counts):
        return self.hidden(torch.relu(self.input_layer(counts))).squeeze(-1)


def main(attach=None, steps=None, fault=True):
    torch.manual_seed(0)
    steps = STEPS if steps is None else steps
    scale = 4000.0 if fault else 1.0  # fault-free: the counts are normalised
    counts_all = torch.rand(640, 32) * scale
    target_all = counts_all.mean(1) / scale
    model = CountRegressor()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu")
    guard = attach(model, optimizer, scheduler=None, scaler=scaler) if attach else None
    for step in range(steps):
        idx = torch.arange(step * 16, step * 16 + 16) % len(counts_all)
        counts, target = counts_all[idx], target_all[idx]
        with torch.autocast("cpu", dtype=torch.float16):
            pred = model(counts)
        loss = F.mse_loss(pred.float(), target)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
    if guard is not None:
        guard.close()
    with torch.no_grad():
        return float(F.mse_loss(model(counts_all[:128]), target_all[:128]))


if __name__ == "__main__":
    print(main())
