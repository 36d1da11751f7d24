"""A hand-written binary cross-entropy saturates on one outlier row.

A binary classifier computes its loss by hand, ``-(y log p + (1 - y) log(1 - p))`` with
``p = sigmoid(z)``. At step 23 one row of the batch arrives 10,000x out of range (a unit bug in one
sensor): its logit saturates the sigmoid to exactly 1 in float32 and ``log(1 - p)`` is -inf. The op
made the first bad value, so the cause is ``invalid_math_domain`` at ``aten::log`` in the loss code;
the outlier that pushed it there is named in ``contributing`` (DESIGN.md, precedence (3)).
"""

import torch
import torch.nn as nn

EXPECTED = {"step": 23, "trigger": "nonfinite_loss", "cause": "invalid_math_domain", "phase": "loss",
            "module": None, "op": "aten::log", "tensor": None}
RECOVERABLE = True
TAGS = ("mlp", "fp32", "outlier")
STEPS = 35


def main(attach=None, steps=None, fault=True):
    torch.manual_seed(0)
    steps = STEPS if steps is None else steps
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = attach(model, optimizer, scheduler=None, scaler=None) if attach else None
    data = torch.randn(512, 8)
    labels = (data[:, 0] + data[:, 1] > 0).float()
    for step in range(steps):
        idx = torch.arange(step * 16, step * 16 + 16) % len(data)
        x, y = data[idx].clone(), labels[idx]
        if fault and step == 23:
            x[7] = x[7] * 1e4
        p = torch.sigmoid(model(x).squeeze(-1))
        loss = -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    if guard is not None:
        guard.close()
    with torch.no_grad():
        p = torch.sigmoid(model(data[:128]).squeeze(-1)).clamp(1e-6, 1 - 1e-6)
        y = labels[:128]
        return float(-(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean())


if __name__ == "__main__":
    print(main())
