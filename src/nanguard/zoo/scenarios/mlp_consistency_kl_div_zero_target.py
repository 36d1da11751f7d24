"""Consistency training: the model is called three times per step and ``kl_div``'s target has exact zeros.

A semi-supervised classifier calls the model on a weak view, a strong view and the labelled batch in one
step, and adds ``kl_div(log_softmax(model(strong)), softmax(model(weak)))`` to the cross-entropy. The
target is not detached. At step 19 a sharpening bug zeroes one class of the target: the forward stays
finite (0 * log 0 is taken as 0), but the derivative of ``xlogy`` in the target at 0 is infinite, so
the gradients are NaN: a backward singularity of ``aten::xlogy`` (fix: detach or clamp the target).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

EXPECTED = {"step": 19, "trigger": "nonfinite_grad", "cause": "backward_singularity", "phase": "backward",
            "module": None, "op": "aten::xlogy", "tensor": None}
RECOVERABLE = True
TAGS = ("mlp", "fp32", "multi_call")
STEPS = 30


def main(attach=None, steps=None, fault=True):
    torch.manual_seed(0)
    steps = STEPS if steps is None else steps
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = attach(model, optimizer, scheduler=None, scaler=None) if attach else None
    data = torch.randn(512, 8)
    labels = data[:, :4].argmax(1)
    for step in range(steps):
        idx = torch.arange(step * 16, step * 16 + 16) % len(data)
        x = data[idx]
        weak, strong = x + 0.05 * torch.randn_like(x), x + 0.3 * torch.randn_like(x)
        target = F.softmax(model(weak), dim=-1)
        if fault and step == 19:
            target = target * (torch.arange(4) != 2)  # the bug: one class's probability set to exactly 0
        consistency = F.kl_div(F.log_softmax(model(strong), dim=-1), target, reduction="batchmean")
        loss = F.cross_entropy(model(x), labels[idx]) + consistency
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    if guard is not None:
        guard.close()
    with torch.no_grad():
        return float(F.cross_entropy(model(data[:128]), labels[:128]))


if __name__ == "__main__":
    print(main())
