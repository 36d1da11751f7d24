"""A label outside the class range crashes the step on CPU.

A 5-class MLP classifier; the label file of one shard was written 1-based, so at step 14 a batch holds
label 5. On CPU ``cross_entropy`` raises ``IndexError: Target 5 is out of bounds`` (on a GPU it is a
device-side assert). nanguard should name the batch field `y` and the loss op.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

EXPECTED = {"step": 14, "trigger": "exception", "cause": "label_out_of_range", "phase": "data",
            "module": None, "op": "aten::nll_loss_forward", "tensor": "y"}
RECOVERABLE = False
CRASHES = True
TAGS = ("mlp", "fp32")
STEPS = 40


class Classifier(nn.Module):
    def __init__(self, features: int = 12, classes: int = 5) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(features, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
        self.out = nn.Linear(32, classes)

    def forward(self, x):
        return self.out(self.body(x))


def main(attach=None, steps=None, fault=True):
    torch.manual_seed(0)
    steps = STEPS if steps is None else steps
    X = torch.randn(640, 12)
    Y = X[:, :5].argmax(1)
    model = Classifier()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    guard = attach(model, optimizer, scheduler=None, scaler=None) if attach else None
    for step in range(steps):
        idx = torch.arange(step * 32, step * 32 + 32) % len(X)
        x, y = X[idx], Y[idx].clone()
        if fault and step == 14:
            y[y == 4] += 1  # a 1-based shard: its top class is 5, not 4
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
