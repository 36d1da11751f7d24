"""A log-transform of a count feature meets a count of 0: log(0) = -inf inside the model.

A tabular regressor (MLP, fp32, Adam) log-transforms its first input column, a click count, inside
``forward`` (``torch.log(counts)``). Counts were always >= 1 until step 27 brings a row with 0 clicks:
log(0) = -inf, the loss is NaN. The data is valid; the log needs ``log1p`` or a clamp.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

EXPECTED = {"step": 27, "trigger": "nonfinite_loss", "cause": "invalid_math_domain", "phase": "forward",
            "module": "", "op": "aten::log", "tensor": None}
RECOVERABLE = True
TAGS = ("mlp", "fp32", "regression")
STEPS = 50


class ClickModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 24), nn.ReLU(), nn.Linear(24, 1))

    def forward(self, counts, extra):
        return self.net(torch.cat([torch.log(counts), extra], dim=1)).squeeze(-1)


def main(attach=None, steps=None, fault=True):
    torch.manual_seed(0)
    steps = STEPS if steps is None else steps
    counts_all = torch.randint(1, 500, (800, 1)).float()
    extra_all = torch.randn(800, 4)
    target_all = torch.log(counts_all[:, 0]) * 0.5 + extra_all[:, 0]
    model = ClickModel()
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    guard = attach(model, optimizer, scheduler=None, scaler=None) if attach else None
    for step in range(steps):
        idx = torch.arange(step * 32, step * 32 + 32) % len(counts_all)
        counts, extra, target = counts_all[idx].clone(), extra_all[idx], target_all[idx]
        if fault and step == 27:
            counts[11] = 0.0  # an item nobody clicked
        loss = F.mse_loss(model(counts, extra), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    if guard is not None:
        guard.close()
    with torch.no_grad():
        return float(F.mse_loss(model(counts_all[:256], extra_all[:256]), target_all[:256]))


if __name__ == "__main__":
    print(main())
