"""RMSNorm with eps outside the sqrt: finite forward on zero padding, NaN gradient (backward singularity).

Like the eps-less RMSNorm, but written ``x / (torch.sqrt(x.pow(2).mean(-1)) + eps)``: the forward of
an all-zero padding vector is 0 / eps = 0, perfectly finite. The derivative of sqrt at 0 is
1/(2 sqrt(0)) = inf, and the backward turns it into NaN.
The padded positions are zeroed by multiplying with the padding mask. Batches gain padding at step 15. Fix: eps inside the sqrt.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

EXPECTED = {"step": 15, "trigger": "nonfinite_grad", "cause": "backward_singularity", "phase": "backward",
            "module": "norm", "op": "aten::sqrt", "tensor": None}
RECOVERABLE = True
TAGS = ("transformer", "fp32", "rmsnorm")
STEPS = 35
VOCAB, DIM, LENGTH, PAD = 20, 16, 8, 0


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, eps_inside: bool = False) -> None:
        super().__init__()
        self.eps, self.eps_inside = eps, eps_inside
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if self.eps_inside:
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight
        rms = torch.sqrt(x.pow(2).mean(-1, keepdim=True))
        return x / (rms + self.eps) * self.weight


class Encoder(nn.Module):
    def __init__(self, eps_inside: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.norm = RMSNorm(DIM, eps_inside=eps_inside)
        self.mix = nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, 2)

    def forward(self, ids):
        h = self.embed(ids) * (ids != PAD)[..., None]  # zero the padded positions
        h = self.norm(h)
        return self.head(F.gelu(self.mix(h)).mean(1))


def make_batch(generator, batch: int = 16, padded: bool = False):
    ids = torch.randint(1, VOCAB, (batch, LENGTH), generator=generator)
    if padded:
        ids[1::3, 5:] = PAD
    return ids, (ids[:, 0] > VOCAB // 2).long()


def main(attach=None, steps=None, fault=True):
    torch.manual_seed(0)
    steps = STEPS if steps is None else steps
    generator = torch.Generator().manual_seed(1)
    model = Encoder(eps_inside=not fault)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    guard = attach(model, optimizer, scheduler=None, scaler=None) if attach else None
    for step in range(steps):
        ids, labels = make_batch(generator, padded=step == 15)
        loss = F.cross_entropy(model(ids), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    if guard is not None:
        guard.close()
    ids, labels = make_batch(torch.Generator().manual_seed(99), batch=64)
    with torch.no_grad():
        return float(F.cross_entropy(model(ids), labels))


if __name__ == "__main__":
    print(main())
