"""A sensor dropout writes NaN into one feature of one sample.

A tabular classifier (MLP, fp32, Adam) trains on sensor readings; at step 30 the loader hands it a
batch in which sample 3 lost a reading, stored as NaN. The loss turns NaN; the batch field `x` is to
blame, not the model.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

EXPECTED = {"step": 30, "trigger": "nonfinite_loss", "cause": "input_nonfinite", "phase": "data",
            "module": None, "op": None, "tensor": "x"}
RECOVERABLE = True
TAGS = ("mlp", "fp32")
STEPS = 60


class Classifier(nn.Module):
    def __init__(self, features: int = 16, hidden: int = 32, classes: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(features, hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def main(attach=None, steps=None, fault=True):
    torch.manual_seed(0)
    steps = STEPS if steps is None else steps
    X = torch.randn(1024, 16)
    Y = (X[:, :4] + 0.5 * X[:, 4:8]).argmax(1)
    model = Classifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    guard = attach(model, optimizer, scheduler=None, scaler=None) if attach else None
    for step in range(steps):
        idx = torch.arange(step * 32, step * 32 + 32) % 1024
        x, y = X[idx].clone(), Y[idx]
        if fault and step == 30:
            x[3, 5] = float("nan")
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
