"""An all-padding sequence: every attention score of its rows is masked to -inf, softmax gives NaN.

A small transformer classifier with hand-written attention (``masked_fill(-inf)`` on padding, then
softmax) and RMSNorm, fp32, AdamW with warmup. At step 17 the collate function emits a batch in which
sequence 2 is empty (all padding), so every row of its score matrix is -inf and softmax returns NaN.
The -inf fill is deliberate; the fully-masked row is the fault.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

EXPECTED = {"step": 17, "trigger": "nonfinite_loss", "cause": "masked_softmax_all_masked", "phase": "forward",
            "module": "block.attn", "op": "aten::_softmax", "tensor": "pad_mask"}
RECOVERABLE = True
TAGS = ("transformer", "fp32", "rmsnorm")
STEPS = 40
VOCAB, DIM, LENGTH = 20, 16, 10


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class SelfAttention(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, pad_mask):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(~pad_mask[:, None, :], float("-inf"))
        return self.proj(torch.softmax(scores, dim=-1) @ v)


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1, self.attn = RMSNorm(dim), SelfAttention(dim)
        self.norm2, self.mlp = RMSNorm(dim), nn.Sequential(nn.Linear(dim, 32), nn.GELU(), nn.Linear(32, dim))

    def forward(self, x, pad_mask):
        x = x + self.attn(self.norm1(x), pad_mask)
        return x + self.mlp(self.norm2(x))


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM, padding_idx=0)
        self.block = Block(DIM)
        self.head = nn.Linear(DIM, 2)

    def forward(self, ids, pad_mask):
        h = self.block(self.embed(ids), pad_mask)
        pooled = (h * pad_mask[..., None]).sum(1) / pad_mask.sum(1, keepdim=True).clamp_min(1)
        return self.head(pooled)


def make_batch(generator, batch: int = 16):
    lengths = torch.randint(3, LENGTH + 1, (batch,), generator=generator)
    ids = torch.randint(1, VOCAB, (batch, LENGTH), generator=generator)
    pad_mask = torch.arange(LENGTH)[None, :] < lengths[:, None]
    ids = ids * pad_mask
    labels = ((ids >= VOCAB // 2) & pad_mask).sum(1) * 2 > lengths
    return ids, pad_mask, labels.long()


def main(attach=None, steps=None, fault=True):
    torch.manual_seed(0)
    steps = STEPS if steps is None else steps
    generator = torch.Generator().manual_seed(1)
    model = Classifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 10))
    guard = attach(model, optimizer, scheduler=scheduler, scaler=None) if attach else None
    for step in range(steps):
        ids, pad_mask, labels = make_batch(generator)
        if fault and step == 17:
            ids[2], pad_mask[2] = 0, False  # an empty document survived filtering
        loss = F.cross_entropy(model(ids, pad_mask), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    if guard is not None:
        guard.close()
    ids, pad_mask, labels = make_batch(torch.Generator().manual_seed(99), batch=128)
    with torch.no_grad():
        return float(F.cross_entropy(model(ids, pad_mask), labels))


if __name__ == "__main__":
    print(main())
