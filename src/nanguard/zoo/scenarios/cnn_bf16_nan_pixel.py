"""A failed image decode leaves NaN pixels, in a bf16 autocast CNN.

A small CNN (BatchNorm, bf16 CPU autocast, SGD with momentum) classifies 8x8 images. At step 18 one
image of the batch comes from a file the decoder could not read: its pixels are NaN. The batch field
`images` holds the NaN; nothing in the model is at fault.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

EXPECTED = {"step": 18, "trigger": "nonfinite_loss", "cause": "input_nonfinite", "phase": "data",
            "module": None, "op": None, "tensor": "images"}
RECOVERABLE = True
TAGS = ("cnn", "bf16")
STEPS = 40


class SmallCNN(nn.Module):
    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1)
        self.head = nn.Linear(8, classes)

    def forward(self, images):
        h = F.relu(self.bn1(self.conv1(images)))
        h = F.relu(self.conv2(F.max_pool2d(h, 2)))
        return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))


def make_data(n: int = 384):
    labels = torch.randint(0, 3, (n,))
    images = torch.randn(n, 1, 8, 8) * 0.3
    images[labels == 0, :, :4] += 1.0
    images[labels == 1, :, 4:] += 1.0
    return images, labels


def main(attach=None, steps=None, fault=True):
    torch.manual_seed(0)
    steps = STEPS if steps is None else steps
    images_all, labels_all = make_data()
    model = SmallCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    guard = attach(model, optimizer, scheduler=None, scaler=None) if attach else None
    for step in range(steps):
        idx = torch.arange(step * 24, step * 24 + 24) % len(images_all)
        images, labels = images_all[idx].clone(), labels_all[idx]
        if fault and step == 18:
            images[9] = float("nan")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    if guard is not None:
        guard.close()
    model.eval()
    with torch.no_grad():
        return float(F.cross_entropy(model(images_all[:128]), labels_all[:128]))


if __name__ == "__main__":
    print(main())
