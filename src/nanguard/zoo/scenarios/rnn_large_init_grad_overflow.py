"""A deep vanilla RNN with too large a recurrent init: gradients explode through time until they overflow.

A 3-layer ``nn.RNN`` (ReLU, fp32, SGD) whose recurrent weights were initialised with std 0.6 instead
of 1/sqrt(hidden): backpropagation through 40 time steps multiplies the gradient by more than 1 at
every step. The loss is finite; the gradients overflow float32 at step 0. Gradient explosion: clip,
re-initialise (orthogonal / identity-scaled), or use a GRU/LSTM.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

EXPECTED = {"step": 0, "trigger": "nonfinite_grad", "cause": "gradient_explosion", "phase": "backward",
            "module": "rnn", "op": None, "tensor": None}
RECOVERABLE = False
TAGS = ("rnn", "fp32")
STEPS = 20


class DeepRNN(nn.Module):
    def __init__(self, init_std: float) -> None:
        super().__init__()
        self.rnn = nn.RNN(4, 32, num_layers=3, nonlinearity="relu", batch_first=True)
        self.head = nn.Linear(32, 1)
        with torch.no_grad():
            for name, p in self.rnn.named_parameters():
                if name.startswith("weight_hh"):
                    p.normal_(0.0, init_std)

    def forward(self, seq):
        return self.head(self.rnn(seq)[0][:, -1]).squeeze(-1)


def main(attach=None, steps=None, fault=True):
    torch.manual_seed(0)
    steps = STEPS if steps is None else steps
    seq_all = torch.randn(256, 40, 4)
    target_all = seq_all[:, :, 0].mean(1)
    model = DeepRNN(init_std=0.6 if fault else 0.05)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    guard = attach(model, optimizer, scheduler=None, scaler=None) if attach else None
    for step in range(steps):
        idx = torch.arange(step * 16, step * 16 + 16) % len(seq_all)
        loss = F.mse_loss(model(seq_all[idx]), target_all[idx])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    if guard is not None:
        guard.close()
    with torch.no_grad():
        return float(F.mse_loss(model(seq_all[:64]), target_all[:64]))


if __name__ == "__main__":
    print(main())
