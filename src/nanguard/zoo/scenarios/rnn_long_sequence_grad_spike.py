"""One much longer sequence: the gradient norm jumps far above its running scale, the loss stays finite.

A tanh ``nn.RNN`` tagger (fp32, SGD) trained on sequences of 8 steps, with recurrent weights slightly
above the stable scale. At step 40 the batch holds sequences of 120 steps (a chunking bug skipped the
split): nothing in the data is out of range, but backpropagation through 120 steps makes the gradient
norm hundreds of times its usual size. Gradient explosion, caught as a spike before it is applied.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

EXPECTED = {"step": 40, "trigger": "grad_spike", "cause": "gradient_explosion", "phase": "backward",
            "module": None, "op": None, "tensor": None}
RECOVERABLE = True
TAGS = ("rnn", "fp32")
STEPS = 70


class Tagger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.RNN(3, 24, batch_first=True)
        self.head = nn.Linear(24, 2)
        with torch.no_grad():
            self.rnn.weight_hh_l0.copy_(torch.linalg.qr(torch.randn(24, 24))[0] * 1.6)  # type: ignore[operator]

    def forward(self, seq):
        return self.head(self.rnn(seq)[0])


def make_batch(generator, length: int = 8, batch: int = 16):
    seq = torch.randn(batch, length, 3, generator=generator) * 0.3
    return seq, (seq[..., 0] > 0).long()


def main(attach=None, steps=None, fault=True):
    torch.manual_seed(0)
    steps = STEPS if steps is None else steps
    generator = torch.Generator().manual_seed(1)
    model = Tagger()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = attach(model, optimizer, scheduler=None, scaler=None) if attach else None
    for step in range(steps):
        seq, tags = make_batch(generator, length=120 if fault and step == 40 else 8)
        loss = F.cross_entropy(model(seq).reshape(-1, 2), tags.reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    if guard is not None:
        guard.close()
    seq, tags = make_batch(torch.Generator().manual_seed(99), batch=128)
    with torch.no_grad():
        return float(F.cross_entropy(model(seq).reshape(-1, 2), tags.reshape(-1)))


if __name__ == "__main__":
    print(main())
