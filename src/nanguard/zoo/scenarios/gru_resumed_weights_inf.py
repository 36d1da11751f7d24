"""Resuming from a checkpoint whose recurrent weights hold +inf.

A GRU sequence classifier (fp32, RMSprop). At step 80 the script reloads the "best" checkpoint to
continue from it; the checkpoint was written by a run whose weights had already overflowed in one
entry of `gru.weight_hh_l0`. The loss turns NaN at once. The weights were non-finite before the step.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

EXPECTED = {"step": 80, "trigger": "nonfinite_loss", "cause": "weights_nonfinite", "phase": "state",
            "module": "gru", "op": None, "tensor": "gru.weight_hh_l0"}
RECOVERABLE = True
TAGS = ("gru", "fp32")
STEPS = 160


class SequenceClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(3, 12, batch_first=True)
        self.head = nn.Linear(12, 2)

    def forward(self, seq):
        return self.head(self.gru(seq)[0][:, -1])


def main(attach=None, steps=None, fault=True):
    torch.manual_seed(0)
    steps = STEPS if steps is None else steps
    X = torch.randn(512, 10, 3)
    Y = (X[:, :, 0].sum(1) > 0).long()
    model = SequenceClassifier()
    optimizer = torch.optim.RMSprop(model.parameters(), lr=3e-3)
    guard = attach(model, optimizer, scheduler=None, scaler=None) if attach else None
    best = None
    for step in range(steps):
        if step == 60:
            best = {k: v.clone() for k, v in model.state_dict().items()}
            if fault:
                best["gru.weight_hh_l0"][5, 2] = float("inf")  # written by an overflowed run
        if step == 80:
            model.load_state_dict(best)  # type: ignore[arg-type]
        idx = torch.arange(step * 32, step * 32 + 32) % len(X)
        loss = F.cross_entropy(model(X[idx]), Y[idx])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    if guard is not None:
        guard.close()
    with torch.no_grad():
        return float(F.cross_entropy(model(X[:256]), Y[:256]))


if __name__ == "__main__":
    print(main())
