"""A custom "fused" op with a race: it returns garbage on one call in a thousand, never twice in a row.

A GRU encoder (fp32, Adam) uses a hand-rolled fused activation from an extension library; the kernel
has a race that, on its 37th call, leaves part of its output unwritten (NaN here). The loss at step 36
is NaN. Replaying the same step from the same state, batch and RNG gives a finite loss: the fault is
transient (nondeterministic), and skipping the step is the right response.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

EXPECTED = {"step": 36, "trigger": "nonfinite_loss", "cause": "nondeterministic", "phase": "unknown",
            "module": None, "op": None, "tensor": None}
RECOVERABLE = True
TAGS = ("gru", "fp32")
STEPS = 150


class FusedGeluLinear(nn.Module):
    """Stands in for an extension kernel: correct, except for a race that hits its 37th call."""

    def __init__(self, dim: int, racy: bool) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        self.racy = racy
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        out = F.gelu(self.linear(x))
        if self.racy and self.calls == 37:
            out = out.clone()
            out[0, :3] = float("nan")  # the part of the tile another thread had not written yet
        return out


class Encoder(nn.Module):
    def __init__(self, racy: bool) -> None:
        super().__init__()
        self.gru = nn.GRU(4, 16, batch_first=True)
        self.fused = FusedGeluLinear(16, racy)
        self.head = nn.Linear(16, 2)

    def forward(self, seq):
        return self.head(self.fused(self.gru(seq)[0][:, -1]))


def main(attach=None, steps=None, fault=True):
    torch.manual_seed(0)
    steps = STEPS if steps is None else steps
    X = torch.randn(512, 6, 4)
    Y = (X[:, :, 1].mean(1) > 0).long()
    model = Encoder(racy=fault)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    guard = attach(model, optimizer, scheduler=None, scaler=None) if attach else None
    for step in range(steps):
        idx = torch.arange(step * 16, step * 16 + 16) % len(X)
        loss = F.cross_entropy(model(X[idx]), Y[idx])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    if guard is not None:
        guard.close()
    model.fused.racy = False
    with torch.no_grad():
        return float(F.cross_entropy(model(X[:256]), Y[:256]))


if __name__ == "__main__":
    print(main())
