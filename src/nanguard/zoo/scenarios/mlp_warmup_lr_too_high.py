"""A learning rate ten times too high, reached at the end of warmup: the loss climbs for hundreds of steps.

A linear-warmup schedule ramps SGD to a peak LR of 0.5 where 0.05 was intended (a config typo). The
regression MLP (fp32) trains well while the LR is small; past the stability limit the loss turns and
rises steadily, step after step, without ever spiking or going NaN. Divergence: lower the LR.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

EXPECTED = {"step": 82, "trigger": "divergence", "cause": "divergence", "phase": "optimizer",
            "module": None, "op": None, "tensor": None}
RECOVERABLE = False
TAGS = ("mlp", "fp32", "regression", "scheduler")
STEPS = 400


class Regressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))

    def forward(self, x):
        return self.net(x).squeeze(-1)


def main(attach=None, steps=None, fault=True):
    torch.manual_seed(0)
    steps = STEPS if steps is None else steps
    X = torch.randn(512, 6) * 2
    target = X @ torch.tensor([1.0, -2.0, 0.5, 0.0, 1.5, -1.0])
    model = Regressor()
    peak = 0.5 if fault else 0.05
    optimizer = torch.optim.SGD(model.parameters(), lr=peak)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 300))
    guard = attach(model, optimizer, scheduler=scheduler, scaler=None) if attach else None
    for step in range(steps):
        idx = torch.arange(step * 64, step * 64 + 64) % len(X)
        loss = F.mse_loss(model(X[idx]), target[idx])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    if guard is not None:
        guard.close()
    with torch.no_grad():
        return float(F.mse_loss(model(X), target))


if __name__ == "__main__":
    print(main())
