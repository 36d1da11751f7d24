"""Angular loss ``acos(cos.clamp(-1, 1))`` between two views: identical views have an infinite derivative.

A self-supervised projector (MLP, fp32, SGD + momentum) pulls the embeddings of two augmented views of
each sample together with the angle between them, ``torch.acos(F.cosine_similarity(a, b).clamp(-1,
1))`` (the clamp was added after an earlier NaN). At step 24 the augmentation is skipped for one sample:
both views are the same tensor, cos = 1.0 exactly, the forward is acos(1) = 0, but
d acos/dx = -1/sqrt(1 - x^2) = -inf: the gradients are NaN. Clamp to 1 - eps instead.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

EXPECTED = {"step": 24, "trigger": "nonfinite_grad", "cause": "backward_singularity", "phase": "backward",
            "module": None, "op": "aten::acos", "tensor": None}
RECOVERABLE = True
TAGS = ("mlp", "fp32", "self-supervised")
STEPS = 45


class Projector(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 6))

    def forward(self, view_a, view_b):
        return self.net(view_a), self.net(view_b)


def main(attach=None, steps=None, fault=True):
    torch.manual_seed(0)
    steps = STEPS if steps is None else steps
    X = torch.randn(512, 6)
    model = Projector()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    guard = attach(model, optimizer, scheduler=None, scaler=None) if attach else None
    limit = 1.0 if fault else 1.0 - 1e-6
    for step in range(steps):
        idx = torch.arange(step * 16, step * 16 + 16) % len(X)
        x = X[idx]
        view_a = x + 0.1 * torch.randn_like(x)
        view_b = x + 0.1 * torch.randn_like(x)
        if step == 24:
            view_b[4] = view_a[4]  # augmentation skipped for this sample: the same view twice
        emb_a, emb_b = model(view_a, view_b)
        cos = F.cosine_similarity(emb_a, emb_b, dim=1).clamp(-limit, limit)
        loss = torch.acos(cos).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    if guard is not None:
        guard.close()
    with torch.no_grad():
        g = torch.Generator().manual_seed(99)
        x = X[:256]
        emb_a, emb_b = model(x + 0.1 * torch.randn(x.shape, generator=g), x + 0.1 * torch.randn(x.shape, generator=g))
        return float(torch.acos(F.cosine_similarity(emb_a, emb_b, dim=1).clamp(-1 + 1e-6, 1 - 1e-6)).mean())


if __name__ == "__main__":
    print(main())
