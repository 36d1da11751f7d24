"""A GRU and a separate head, one optimizer over both, a masked mean over an all-padding batch.

Scripts often keep the recurrent encoder and the output head as two top-level modules and hand
``list(rnn.parameters()) + list(head.parameters())`` to the optimizer. The loss is a masked mean of a
per-position error, ``(err * mask).sum() / mask.sum()``. At step 17 every sequence of the batch is
padding, so the mean is 0/0: NaN born at ``aten::div`` in the loss code (fix: clamp the count).
"""

import torch
import torch.nn as nn

EXPECTED = {"step": 17, "trigger": "nonfinite_loss", "cause": "invalid_math_domain", "phase": "loss",
            "module": None, "op": "aten::div", "tensor": None}
RECOVERABLE = True
TAGS = ("gru", "fp32", "two_roots")
STEPS = 30


def main(attach=None, steps=None, fault=True):
    torch.manual_seed(0)
    steps = STEPS if steps is None else steps
    rnn, head = nn.GRU(3, 8, batch_first=True), nn.Linear(8, 1)
    optimizer = torch.optim.Adam(list(rnn.parameters()) + list(head.parameters()), lr=1e-2)
    guard = attach([rnn, head], optimizer, scheduler=None, scaler=None) if attach else None
    data = torch.rand(256, 6, 3)
    targets = data.sum(-1)
    for step in range(steps):
        idx = torch.arange(step * 8, step * 8 + 8) % len(data)
        lengths = torch.arange(8) % 6 + 1
        if fault and step == 17:
            lengths = torch.zeros(8, dtype=torch.long)  # an all-padding batch
        mask = (torch.arange(6)[None] < lengths[:, None]).float()
        out, _ = rnn(data[idx])
        err = (head(out).squeeze(-1) - targets[idx]) ** 2
        loss = (err * mask).sum() / mask.sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    if guard is not None:
        guard.close()
    with torch.no_grad():
        out, _ = rnn(data[:64])
        return float(((head(out).squeeze(-1) - targets[:64]) ** 2).mean())


if __name__ == "__main__":
    print(main())
