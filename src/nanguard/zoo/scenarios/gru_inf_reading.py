"""A corrupt log line parses as +inf inside one time series.

A GRU forecaster (fp32, AdamW, cosine schedule) predicts the next value of sensor sequences. At step
22 one sequence in the batch holds +inf (a parser turned "1e999" into a float). The GRU's gates
saturate, so the loss stays finite while the gradients turn NaN; the cause is the batch field `seq`.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

EXPECTED = {"step": 22, "trigger": "nonfinite_grad", "cause": "input_nonfinite", "phase": "data",
            "module": None, "op": None, "tensor": "seq"}
RECOVERABLE = True
TAGS = ("gru", "fp32")
STEPS = 50


class Forecaster(nn.Module):
    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.gru = nn.GRU(2, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, seq):
        out, _ = self.gru(seq)
        return self.head(out[:, -1]).squeeze(-1)


def make_data(n: int = 512, length: int = 12):
    t = torch.linspace(0, 6.28, length + 1)
    phase = torch.rand(n, 1) * 6.28
    wave = torch.sin(t + phase)
    seq = torch.stack([wave[:, :-1], torch.cos(t[:-1] + phase)], dim=-1)
    return seq, wave[:, -1]


def main(attach=None, steps=None, fault=True):
    torch.manual_seed(0)
    steps = STEPS if steps is None else steps
    seqs, targets = make_data()
    model = Forecaster()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    guard = attach(model, optimizer, scheduler=scheduler, scaler=None) if attach else None
    for step in range(steps):
        idx = torch.arange(step * 16, step * 16 + 16) % len(seqs)
        seq, target = seqs[idx].clone(), targets[idx]
        if fault and step == 22:
            seq[5, 7, 0] = float("inf")
        loss = F.mse_loss(model(seq), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    if guard is not None:
        guard.close()
    with torch.no_grad():
        return float(F.mse_loss(model(seqs[:128]), targets[:128]))


if __name__ == "__main__":
    print(main())
