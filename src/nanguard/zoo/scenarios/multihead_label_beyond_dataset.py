"""Multi-dataset head: a label beyond its own dataset's classes lands on a -inf masked logit.

One classifier head serves two datasets: dataset A has 6 classes, dataset B only the first 4, so B's
rows mask logits 4 and 5 with ``-inf`` (the `_apply_logits_masking` of the seed post-mortem). At step
25 a B batch carries label 4: B's label map was built from A's. The loss is inf. The mask is
deliberate; the label is wrong: it is outside B's class range.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

EXPECTED = {"step": 25, "trigger": "nonfinite_loss", "cause": "label_out_of_range", "phase": "data",
            "module": None, "op": None, "tensor": "labels"}
RECOVERABLE = True
TAGS = ("mlp", "fp32", "multi-dataset")
STEPS = 60
CLASSES = {"A": 6, "B": 4}


class MultiDatasetClassifier(nn.Module):
    def __init__(self, features: int = 10, total_classes: int = 6) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(features, 32), nn.GELU())
        self.head = nn.Linear(32, total_classes)

    def forward(self, x, valid):
        logits = self.head(self.backbone(x))
        return logits.masked_fill(~valid, float("-inf"))


def make_data(name: str, n: int = 512):
    x = torch.randn(n, 10)
    return x, x[:, : CLASSES[name]].argmax(1)


def main(attach=None, steps=None, fault=True):
    torch.manual_seed(0)
    steps = STEPS if steps is None else steps
    data = {name: make_data(name) for name in CLASSES}
    model = MultiDatasetClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    guard = attach(model, optimizer, scheduler=None, scaler=None) if attach else None
    for step in range(steps):
        name = "A" if step % 2 == 0 else "B"
        xs, ys = data[name]
        idx = torch.arange(step * 16, step * 16 + 16) % len(xs)
        x, labels = xs[idx], ys[idx].clone()
        valid = torch.zeros(len(idx), 6, dtype=torch.bool)
        valid[:, : CLASSES[name]] = True
        if fault and step == 25:
            labels[7] = 4  # B's label map was copied from A's
        loss = F.cross_entropy(model(x, valid), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    if guard is not None:
        guard.close()
    x, y = data["A"]
    with torch.no_grad():
        return float(F.cross_entropy(model(x[:256], torch.ones(256, 6, dtype=torch.bool)), y[:256]))


if __name__ == "__main__":
    print(main())
