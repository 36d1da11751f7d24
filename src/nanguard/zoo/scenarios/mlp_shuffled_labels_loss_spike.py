"""One batch whose labels were shuffled against its inputs: a one-off finite loss spike.

A converged MLP classifier (fp32, Adam). At step 60 a batch arrives from a shard whose label column
was sorted separately from its features: every value is in range and finite, labels are valid
classes, but they no longer match the inputs, and the loss jumps to many times its running level.
A loss spike with data and math in range.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

EXPECTED = {"step": 60, "trigger": "loss_spike", "cause": "loss_spike", "phase": "loss",
            "module": None, "op": None, "tensor": None}
RECOVERABLE = True
TAGS = ("mlp", "fp32")
STEPS = 90


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 48), nn.ReLU(), nn.Linear(48, 4))

    def forward(self, x):
        return self.net(x)


def main(attach=None, steps=None, fault=True):
    torch.manual_seed(0)
    steps = STEPS if steps is None else steps
    X = torch.randn(1024, 8)
    Y = (X[:, :4] * 3).argmax(1)
    model = Classifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    guard = attach(model, optimizer, scheduler=None, scaler=None) if attach else None
    for step in range(steps):
        idx = torch.arange(step * 32, step * 32 + 32) % len(X)
        x, y = X[idx], Y[idx]
        if fault and step == 60:
            y = (y + 1 + torch.arange(32) % 3) % 4  # labels that match other rows, never their own
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    if guard is not None:
        guard.close()
    with torch.no_grad():
        return float(F.cross_entropy(model(X[:256]), Y[:256]))


if __name__ == "__main__":
    print(main())
