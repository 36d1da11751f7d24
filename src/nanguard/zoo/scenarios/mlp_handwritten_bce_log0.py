"""Hand-written binary cross-entropy: ``log(1 - sigmoid(z))`` is log(0) once sigmoid saturates to 1.

A multi-label tagger (MLP, fp32, Adam) writes its loss by hand,
``-(y * log(p) + (1 - y) * log(1 - p))`` with ``p = sigmoid(logits)``. In float32 sigmoid(z) rounds to
exactly 1.0 for z > ~17; as the model grows confident a logit passes that, log(1 - p) = log(0) = -inf,
and (1 - y) * -inf is NaN even where y = 1. The fix is ``F.binary_cross_entropy_with_logits``.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

EXPECTED = {"step": 15, "trigger": "nonfinite_loss", "cause": "invalid_math_domain", "phase": "loss",
            "module": None, "op": "aten::log", "tensor": None}
RECOVERABLE = False
TAGS = ("mlp", "fp32", "multi-label")
STEPS = 40


class Tagger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 6))

    def forward(self, x):
        return self.net(x)


def main(attach=None, steps=None, fault=True):
    torch.manual_seed(0)
    steps = STEPS if steps is None else steps
    X = torch.randn(640, 10) * 2
    tags = (X[:, :6] > 0).float()
    model = Tagger()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    guard = attach(model, optimizer, scheduler=None, scaler=None) if attach else None
    for step in range(steps):
        idx = torch.arange(step * 32, step * 32 + 32) % len(X)
        x, y = X[idx], tags[idx]
        logits = model(x)
        if fault:
            p = torch.sigmoid(logits)
            loss = -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()
        else:
            loss = F.binary_cross_entropy_with_logits(logits, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    if guard is not None:
        guard.close()
    with torch.no_grad():
        return float(F.binary_cross_entropy_with_logits(model(X[:256]), tags[:256]))


if __name__ == "__main__":
    print(main())
