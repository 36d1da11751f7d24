"""Multi-dataset head: a row's own target class is masked to -inf, so its loss is inf.

One head over 9 classes serves two datasets: "animals" owns classes 0-4 and "plants" owns classes
5-8; each row masks the other dataset's logits with -inf. At step 21 a plants batch carries a row whose
sample was merged from the animals source and keeps its animal label 2. Its target logit is -inf, the
loss is inf while every gradient stays finite. The fault is the -inf on the target logit.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

EXPECTED = {"step": 21, "trigger": "nonfinite_loss", "cause": "masked_target_logit", "phase": "loss",
            "module": None, "op": "aten::nll_loss_forward", "tensor": "targets"}
RECOVERABLE = True
TAGS = ("mlp", "fp32", "multi-dataset")
STEPS = 50
OWNED = {"animals": range(0, 5), "plants": range(5, 9)}


class SharedHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
        self.head = nn.Linear(32, 9)

    def forward(self, x):
        return self.head(self.trunk(x))


def make_data(name: str, n: int = 400):
    x = torch.randn(n, 12)
    classes = list(OWNED[name])
    return x, torch.tensor(classes)[x[:, : len(classes)].argmax(1)]


def main(attach=None, steps=None, fault=True):
    torch.manual_seed(0)
    steps = STEPS if steps is None else steps
    data = {name: make_data(name) for name in OWNED}
    model = SharedHead()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    guard = attach(model, optimizer, scheduler=None, scaler=None) if attach else None
    for step in range(steps):
        name = "animals" if step % 2 == 0 else "plants"
        xs, ys = data[name]
        idx = torch.arange(step * 16, step * 16 + 16) % len(xs)
        x, targets = xs[idx], ys[idx].clone()
        if fault and step == 21:
            targets[3] = 2  # an animals sample merged into the plants shard
        mask = torch.full((9,), float("-inf"))
        mask[list(OWNED[name])] = 0.0
        loss = F.cross_entropy(model(x) + mask, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    if guard is not None:
        guard.close()
    x, y = data["plants"]
    mask = torch.full((9,), float("-inf"))
    mask[list(OWNED["plants"])] = 0.0
    with torch.no_grad():
        return float(F.cross_entropy(model(x[:200]) + mask, y[:200]))


if __name__ == "__main__":
    print(main())
