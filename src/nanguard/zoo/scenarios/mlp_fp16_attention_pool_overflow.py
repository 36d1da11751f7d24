"""Pure fp16 model, hand-written softmax without max subtraction: exp() overflows float16.

A set-pooling classifier kept entirely in float16 (model.half(), SGD) scores each element of a set and
pools with a hand-written softmax, ``exp(s) / exp(s).sum()``. float16 tops out at 65504, so as soon as a
score passes ~11.1 the exponential is inf and inf/inf is NaN. The same step in float32 is finite: the
op overflowed its dtype (use ``torch.softmax``, which subtracts the max).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

EXPECTED = {"step": 0, "trigger": "nonfinite_loss", "cause": "forward_overflow", "phase": "forward",
            "module": "", "op": "aten::exp", "tensor": None}
RECOVERABLE = False
TAGS = ("mlp", "fp16")
STEPS = 30


class SetPooling(nn.Module):
    def __init__(self, dim: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.encode = nn.Linear(dim, 16)
        self.score = nn.Linear(16, 1)
        self.out = nn.Linear(16, classes)

    def forward(self, items):
        h = torch.relu(self.encode(items))
        s = self.score(h)
        weights = torch.exp(s) / torch.exp(s).sum(dim=1, keepdim=True)
        return self.out((weights * h).sum(dim=1))


def main(attach=None, steps=None, fault=True):
    torch.manual_seed(0)
    steps = STEPS if steps is None else steps
    items_all = torch.randn(256, 6, 8)
    labels_all = items_all[:, :, :3].mean(1).argmax(1)
    model = SetPooling()
    if fault:
        with torch.no_grad():
            model.score.bias.fill_(12.0)  # a warm-started scorer whose scores sit near 12
    model = model.half()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = attach(model, optimizer, scheduler=None, scaler=None) if attach else None
    for step in range(steps):
        idx = torch.arange(step * 16, step * 16 + 16) % len(items_all)
        items, labels = items_all[idx].half(), labels_all[idx]
        loss = F.cross_entropy(model(items).float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    if guard is not None:
        guard.close()
    with torch.no_grad():
        return float(F.cross_entropy(model(items_all[:128].half()).float(), labels_all[:128]))


if __name__ == "__main__":
    print(main())
