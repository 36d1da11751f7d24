"""Weight surgery writes NaN into the classifier: an inf/NaN already sits in the weights.

A CNN classifier (fp32, Adam) is extended mid-run with prototype initialisation: each class row of
`head.weight` is reset to the mean feature of that class's examples in the current batch. At step 70
class 3 has no example in the batch, so its row becomes 0/0 = NaN. The next forward is NaN everywhere;
the cause is the parameter, already non-finite before the step.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

EXPECTED = {"step": 70, "trigger": "nonfinite_loss", "cause": "weights_nonfinite", "phase": "state",
            "module": "head", "op": None, "tensor": "head.weight"}
RECOVERABLE = True
TAGS = ("cnn", "fp32")
STEPS = 250


class ConvClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(8, 4)

    def forward(self, images):
        return self.head(self.features(images))


def make_data(n: int = 512):
    labels = torch.randint(0, 4, (n,))
    images = torch.randn(n, 1, 6, 6) * 1.0 + labels.view(-1, 1, 1, 1) * 0.3
    return images, labels


def main(attach=None, steps=None, fault=True):
    torch.manual_seed(0)
    steps = STEPS if steps is None else steps
    images_all, labels_all = make_data()
    model = ConvClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    guard = attach(model, optimizer, scheduler=None, scaler=None) if attach else None
    for step in range(steps):
        idx = torch.arange(step * 24, step * 24 + 24) % len(images_all)
        images, labels = images_all[idx], labels_all[idx]
        if fault and step == 70:
            with torch.no_grad():  # prototype re-initialisation of class 3 from this batch
                feats = model.features(images)
                chosen = (labels == 3) & (labels == -1)  # the bug: an empty selection
                model.head.weight[3] = feats[chosen].sum(0) / chosen.sum()
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    if guard is not None:
        guard.close()
    with torch.no_grad():
        return float(F.cross_entropy(model(images_all[:256]), labels_all[:256]))


if __name__ == "__main__":
    print(main())
