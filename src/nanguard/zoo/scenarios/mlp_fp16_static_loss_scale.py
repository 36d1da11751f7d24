"""Pure fp16 training with a static loss scale: the scaled gradients overflow float16.

An MLP kept in float16 (model.half(), SGD) multiplies its loss by a fixed 2**16 before backward, as
old apex "static loss scaling" recipes did, and divides the gradients afterwards. With a summed loss
the scaled gradient of the last layer's weight passes 65504 from the first step: inf in the backward,
while the same step in float32 is finite. Use a dynamic GradScaler or bf16.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

EXPECTED = {"step": 0, "trigger": "nonfinite_grad", "cause": "backward_overflow", "phase": "backward",
            "module": "fc3", "op": "aten::addmm", "tensor": None}
RECOVERABLE = False
TAGS = ("mlp", "fp16", "loss_scale")
STEPS = 40
LOSS_SCALE = 2.0 ** 16


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 64)
        self.fc2 = nn.Linear(64, 64)
        self.fc3 = nn.Linear(64, 4)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def main(attach=None, steps=None, fault=True):
    torch.manual_seed(0)
    steps = STEPS if steps is None else steps
    X = torch.randn(640, 16)
    Y = X[:, :4].argmax(1)
    model = Net().half()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = attach(model, optimizer, scheduler=None, scaler=None) if attach else None
    scale = LOSS_SCALE if fault else 2.0 ** 6
    for step in range(steps):
        idx = torch.arange(step * 32, step * 32 + 32) % len(X)
        x, y = X[idx].half(), Y[idx]
        loss = F.cross_entropy(model(x).float(), y, reduction="sum")
        (loss * scale).backward()
        for p in model.parameters():
            if p.grad is not None:
                p.grad.div_(scale)
        optimizer.step()
        optimizer.zero_grad()
    if guard is not None:
        guard.close()
    with torch.no_grad():
        return float(F.cross_entropy(model(X[:256].half()).float(), Y[:256]))


if __name__ == "__main__":
    print(main())
