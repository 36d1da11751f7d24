"""``torch.where(x > 0, torch.log(x), 0)``: the untaken branch is -inf, its gradient NaN.

A regression MLP (fp32, Adam) with a hand-written "safe log" feature, ``torch.where(x > 0, log(x),
0)``, on a non-negative input column. When a 0 arrives (step 21) the forward is finite, because where
discards log(0) = -inf, but the backward multiplies the where's zero gradient by log's 1/0 = inf:
0 * inf = NaN. The loss stays finite, the gradients do not.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

EXPECTED = {"step": 21, "trigger": "nonfinite_grad", "cause": "backward_singularity", "phase": "backward",
            "module": "", "op": "aten::log", "tensor": None}
RECOVERABLE = True
TAGS = ("mlp", "fp32", "regression")
STEPS = 45


class SafeLogRegressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))

    def forward(self, amount, other):
        scaled = amount * self.scale
        log_amount = torch.where(scaled > 0, torch.log(scaled), torch.zeros_like(scaled))
        return self.net(torch.cat([log_amount, other], dim=1)).squeeze(-1)


def main(attach=None, steps=None, fault=True):
    torch.manual_seed(0)
    steps = STEPS if steps is None else steps
    amount_all = torch.rand(720, 1) * 10 + 0.1
    other_all = torch.randn(720, 3)
    target_all = torch.log(amount_all[:, 0]) - other_all[:, 1]
    model = SafeLogRegressor()
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    guard = attach(model, optimizer, scheduler=None, scaler=None) if attach else None
    for step in range(steps):
        idx = torch.arange(step * 24, step * 24 + 24) % len(amount_all)
        amount, other, target = amount_all[idx].clone(), other_all[idx], target_all[idx]
        if fault and step == 21:
            amount[6] = 0.0  # a refund row with amount 0
        loss = F.mse_loss(model(amount, other), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    if guard is not None:
        guard.close()
    with torch.no_grad():
        return float(F.mse_loss(model(amount_all[:256], other_all[:256]), target_all[:256]))


if __name__ == "__main__":
    print(main())
