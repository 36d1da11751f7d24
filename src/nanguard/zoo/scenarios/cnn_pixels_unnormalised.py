"""One image shard was stored as 0..255 bytes instead of 0..1 floats.

A small CNN (fp32, SGD + momentum, step LR schedule). At step 35 a batch from the un-normalised shard
arrives: every value is finite, but 255x the usual scale, and the loss jumps. nanguard should blame
the scale of batch field `pixels`.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

EXPECTED = {"step": 35, "trigger": "loss_spike", "cause": "input_extreme_scale", "phase": "data",
            "module": None, "op": None, "tensor": "pixels"}
RECOVERABLE = True
TAGS = ("cnn", "fp32")
STEPS = 60


class TinyConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 4 * 4, 4)

    def forward(self, pixels):
        h = F.max_pool2d(F.relu(self.conv(pixels)), 2)
        return self.fc(h.flatten(1))


def make_data(n: int = 512):
    labels = torch.randint(0, 4, (n,))
    pixels = torch.rand(n, 3, 8, 8) * 0.5
    for c in range(3):
        pixels[labels == c, c] += 0.5
    return pixels, labels


def main(attach=None, steps=None, fault=True):
    torch.manual_seed(0)
    steps = STEPS if steps is None else steps
    pixels_all, labels_all = make_data()
    model = TinyConvNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=40, gamma=0.5)
    guard = attach(model, optimizer, scheduler=scheduler, scaler=None) if attach else None
    for step in range(steps):
        idx = torch.arange(step * 32, step * 32 + 32) % len(pixels_all)
        pixels, labels = pixels_all[idx], labels_all[idx]
        if fault and step == 35:
            pixels = (pixels * 255).round()  # the byte-valued shard
        loss = F.cross_entropy(model(pixels), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    if guard is not None:
        guard.close()
    with torch.no_grad():
        return float(F.cross_entropy(model(pixels_all[:256]), labels_all[:256]))


if __name__ == "__main__":
    print(main())
