"""The last batch of the epoch holds one sample: BatchNorm1d in train mode cannot normalise it.

A CNN with a BatchNorm1d in its classifier head (fp32, SGD + momentum) iterates over a dataset of 161
images in batches of 32 without ``drop_last``: the sixth batch (step 5) has a single image. After
global pooling the head's BatchNorm sees one value per channel and raises ``Expected more than 1 value
per channel when training``. Use drop_last=True or a norm without batch statistics.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

EXPECTED = {"step": 5, "trigger": "exception", "cause": "batchnorm_degenerate", "phase": "forward",
            "module": "head_norm", "op": "aten::batch_norm", "tensor": None}
RECOVERABLE = False
CRASHES = True
TAGS = ("cnn", "fp32", "batchnorm")
STEPS = 12


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head_norm = nn.BatchNorm1d(8)
        self.out = nn.Linear(8, 3)

    def forward(self, images):
        h = self.pool(F.relu(self.conv(images))).flatten(1)
        return self.out(F.relu(self.head_norm(h)))


def main(attach=None, steps=None, fault=True):
    torch.manual_seed(0)
    steps = STEPS if steps is None else steps
    n = 161 if fault else 160
    images_all = torch.randn(n, 1, 8, 8)
    labels_all = torch.randint(0, 3, (n,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images_all, labels_all), batch_size=32)
    model = ConvNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    guard = attach(model, optimizer, scheduler=None, scaler=None) if attach else None
    step = 0
    while step < steps:
        for images, labels in loader:
            loss = F.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if step >= steps:
                break
    if guard is not None:
        guard.close()
    model.eval()
    with torch.no_grad():
        return float(F.cross_entropy(model(images_all), labels_all))


if __name__ == "__main__":
    print(main())
