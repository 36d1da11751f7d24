"""RMSNorm without eps divides zero padding by a zero norm: 0 * rsqrt(0) = NaN in the forward.

A small transformer encoder with a hand-written RMSNorm, ``x * torch.rsqrt(x.pow(2).mean(-1))`` (the
eps was dropped "because it changes the output"), fp32, Adam. The padding embedding is all zeros
(``padding_idx``). Batches had no padding until step 13: a padded position has norm 0, rsqrt(0) = inf
and 0 * inf = NaN.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

EXPECTED = {"step": 13, "trigger": "nonfinite_loss", "cause": "invalid_math_domain", "phase": "forward",
            "module": "norm", "op": "aten::rsqrt", "tensor": None}
RECOVERABLE = True
TAGS = ("transformer", "fp32", "rmsnorm")
STEPS = 35
VOCAB, DIM, LENGTH, PAD = 20, 16, 8, 0


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 0.0) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if self.eps:
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True)) * self.weight


class Encoder(nn.Module):
    def __init__(self, eps: float) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM, padding_idx=PAD)
        self.norm = RMSNorm(DIM, eps)
        self.attn = nn.MultiheadAttention(DIM, 2, batch_first=True)
        self.head = nn.Linear(DIM, 2)

    def forward(self, ids):
        h = self.norm(self.embed(ids))
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.head(h.mean(1))


def make_batch(generator, batch: int = 16, padded: bool = False):
    ids = torch.randint(1, VOCAB, (batch, LENGTH), generator=generator)
    if padded:
        ids[::4, 6:] = PAD
    return ids, (ids[:, 0] > VOCAB // 2).long()


def main(attach=None, steps=None, fault=True):
    torch.manual_seed(0)
    steps = STEPS if steps is None else steps
    generator = torch.Generator().manual_seed(1)
    model = Encoder(eps=0.0 if fault else 1e-6)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    guard = attach(model, optimizer, scheduler=None, scaler=None) if attach else None
    for step in range(steps):
        ids, labels = make_batch(generator, padded=step == 13)
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
