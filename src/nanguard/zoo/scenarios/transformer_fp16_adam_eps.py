"""Pure-fp16 model with Adam's default eps=1e-8: eps rounds to 0 in float16, the update divides by 0.

A tiny transformer LM converted with ``model.half()`` and trained with ``Adam(eps=1e-8)``. Its
optimizer state is float16 too; 1e-8 is below float16's smallest subnormal, so the denominator
``sqrt(v) + eps`` is exactly 0 wherever a gradient was 0 or tiny (embedding rows not in the batch, small
gradients whose square underflows). Gradients and loss are finite; the update writes NaN/inf into the
weights. Keep fp32 master weights (AMP) or use eps >= 1e-4 in fp16.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

EXPECTED = {"step": 0, "trigger": "nonfinite_weights", "cause": "update_overflow", "phase": "optimizer",
            "module": "embed", "op": None, "tensor": "embed.weight"}
RECOVERABLE = False
TAGS = ("transformer", "fp16")
STEPS = 20
VOCAB, DIM, LENGTH = 32, 16, 8


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.attn = nn.MultiheadAttention(DIM, 2, batch_first=True)
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, ids):
        h = self.embed(ids)
        causal = torch.triu(torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool), 1)
        h = self.norm(h + self.attn(h, h, h, attn_mask=causal, need_weights=False)[0])
        return self.head(h)


def main(attach=None, steps=None, fault=True):
    torch.manual_seed(0)
    steps = STEPS if steps is None else steps
    generator = torch.Generator().manual_seed(1)
    model = TinyLM().half()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-8 if fault else 1e-4)
    guard = attach(model, optimizer, scheduler=None, scaler=None) if attach else None
    for _ in range(steps):
        start = torch.randint(0, VOCAB // 2, (8, 1), generator=generator)  # only half the vocabulary is used
        seq = (start + torch.arange(LENGTH + 1)) % VOCAB
        logits = model(seq[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, VOCAB), seq[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    if guard is not None:
        guard.close()
    seq = (torch.arange(16)[:, None] + torch.arange(LENGTH + 1)) % VOCAB
    with torch.no_grad():
        return float(F.cross_entropy(model(seq[:, :-1]).float().reshape(-1, VOCAB), seq[:, 1:].reshape(-1)))


if __name__ == "__main__":
    print(main())
