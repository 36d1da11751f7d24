"""``-torch.log(torch.softmax(logits / T)).gather(...)``: a -inf the gather discards, a NaN gradient.

The same temperature-sharpened classifier, written the other common way: the log of the whole softmax
matrix, then the target column. When a *non-target* probability underflows to 0, its log is -inf but
the gather never picks it, so the loss stays finite. The backward, however, multiplies the gather's
zero gradient by log's 1/0 = inf: 0 * inf = NaN. The first bad value is that forward -inf, which no
code asked for (it is not a mask fill): an invalid_math_domain of aten::log in the loss code (fix:
``log_softmax``), whatever the gather did with it afterwards.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

EXPECTED = {"step": 9, "trigger": "nonfinite_grad", "cause": "invalid_math_domain", "phase": "loss",
            "module": None, "op": "aten::log", "tensor": None}
RECOVERABLE = False
TAGS = ("mlp", "fp32")
STEPS = 40
TEMPERATURE = 0.05


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(10, 64)
        self.fc2 = nn.Linear(64, 5)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def main(attach=None, steps=None, fault=True):
    torch.manual_seed(0)
    steps = STEPS if steps is None else steps
    X = torch.randn(640, 10)
    Y = X[:, :5].argmax(1)
    Y[::17] = (Y[::17] + 1) % 5  # label noise: some targets the model will be sure are wrong
    model = Classifier()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    guard = attach(model, optimizer, scheduler=None, scaler=None) if attach else None
    for step in range(steps):
        idx = torch.arange(step * 32, step * 32 + 32) % len(X)
        x, y = X[idx], Y[idx]
        logits = model(x)
        if fault:
            probs = torch.softmax(logits / TEMPERATURE, dim=1)
            loss = -torch.log(probs).gather(1, y[:, None]).mean()
        else:
            loss = F.cross_entropy(logits / TEMPERATURE, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    if guard is not None:
        guard.close()
    with torch.no_grad():
        return float(F.cross_entropy(model(X[:256]) / TEMPERATURE, Y[:256]))


if __name__ == "__main__":
    print(main())
