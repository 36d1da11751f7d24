"""One data file is in other units: a finite loss of ~1e15.

A regression MLP (fp32, Adam) predicts a quantity from 8 physical measurements, normalised to about
unit scale. At step 40 the batch comes from a file written in micro-units: its values are 1e6 times
larger. Nothing is NaN, but the loss jumps to ~1e15 (the 8.7e15 of the seed post-mortem). The cause is
the scale of batch field `features`, not the model.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

EXPECTED = {"step": 40, "trigger": "loss_spike", "cause": "input_extreme_scale", "phase": "data",
            "module": None, "op": None, "tensor": "features"}
RECOVERABLE = True
TAGS = ("mlp", "fp32", "regression")
STEPS = 70


class Regressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))

    def forward(self, features):
        return self.net(features).squeeze(-1)


def main(attach=None, steps=None, fault=True):
    torch.manual_seed(0)
    steps = STEPS if steps is None else steps
    X = torch.randn(1024, 8)
    target = X @ torch.linspace(-1, 1, 8) + 0.1 * torch.randn(1024)
    model = Regressor()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    guard = attach(model, optimizer, scheduler=None, scaler=None) if attach else None
    for step in range(steps):
        idx = torch.arange(step * 32, step * 32 + 32) % len(X)
        features, y = X[idx], target[idx]
        if fault and step == 40:
            features, y = features * 1e6, y * 1e6  # the micro-unit file
        loss = F.mse_loss(model(features), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    if guard is not None:
        guard.close()
    with torch.no_grad():
        return float(F.mse_loss(model(X[:256]), target[:256]))


if __name__ == "__main__":
    print(main())
