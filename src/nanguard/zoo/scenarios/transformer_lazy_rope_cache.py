"""A lazily built rotary-position cache is wrong on the one call that (re)builds it.

A tiny transformer classifier with rotary position embeddings (fp32, AdamW). The cos/sin tables are
cached per sequence length, built eagerly for the usual length 8. Growing the cache for a new length
allocates the table with ``torch.full(nan)`` as a "not filled" sentinel and, by an off-by-one, fills it
only on the *next* call. Sequences were 8
long until step 28 brings length 12: that call uses the unfilled NaN table. A replay of the step uses
the now-filled cache and is finite: from the replay's point of view the fault is transient
(nondeterministic): state outside the model's parameters and buffers changed between the calls.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

EXPECTED = {"step": 28, "trigger": "nonfinite_loss", "cause": "nondeterministic", "phase": "unknown",
            "module": None, "op": None, "tensor": None}
RECOVERABLE = True
TAGS = ("transformer", "fp32", "layernorm")
STEPS = 50
VOCAB, DIM = 16, 16


class Rotary(nn.Module):
    def __init__(self, dim: int, buggy: bool) -> None:
        super().__init__()
        self.dim, self.buggy = dim, buggy
        self.tables: dict[int, torch.Tensor] = {8: self._angles(8)}  # built eagerly for the usual length

    def table(self, length: int) -> torch.Tensor:
        if length not in self.tables:
            fresh = torch.full((length, self.dim), float("nan"))
            if not self.buggy:
                fresh = self._angles(length)
            self.tables[length] = fresh
            return fresh
        if torch.isnan(self.tables[length]).any():
            self.tables[length] = self._angles(length)
        return self.tables[length]

    def _angles(self, length: int) -> torch.Tensor:
        freq = 1.0 / (100.0 ** (torch.arange(0, self.dim, 2).float() / self.dim))
        angles = torch.arange(length).float()[:, None] * freq[None, :]
        return torch.cat([angles, angles], dim=-1)

    def forward(self, x):
        angles = self.table(x.shape[1])
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * angles.cos() + rotated * angles.sin()


class Classifier(nn.Module):
    def __init__(self, buggy: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.rotary = Rotary(DIM, buggy)
        self.attn = nn.MultiheadAttention(DIM, 2, batch_first=True)
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, 2)

    def forward(self, ids):
        h = self.rotary(self.embed(ids))
        h = self.norm(h + self.attn(h, h, h, need_weights=False)[0])
        return self.head(h.mean(1))


def make_batch(generator, length: int, batch: int = 16):
    ids = torch.randint(0, VOCAB, (batch, length), generator=generator)
    return ids, (ids[:, 0] < ids[:, -1]).long()


def main(attach=None, steps=None, fault=True):
    torch.manual_seed(0)
    steps = STEPS if steps is None else steps
    generator = torch.Generator().manual_seed(1)
    model = Classifier(buggy=fault)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    guard = attach(model, optimizer, scheduler=None, scaler=None) if attach else None
    for step in range(steps):
        ids, labels = make_batch(generator, length=12 if step >= 28 else 8)
        loss = F.cross_entropy(model(ids), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    if guard is not None:
        guard.close()
    ids, labels = make_batch(torch.Generator().manual_seed(99), length=12, batch=128)
    with torch.no_grad():
        return float(F.cross_entropy(model(ids), labels))


if __name__ == "__main__":
    print(main())
