"""Contrastive loss on a Euclidean distance: two identical documents give sqrt(0) in the backward.

A siamese EmbeddingBag encoder (fp32, Adam) is trained with a margin loss on
``torch.sqrt(((a - b) ** 2).sum(-1))``. At step 18 a pair holds the same document twice (a
deduplication miss): the distance is 0, finite, but d sqrt(x)/dx = 1/(2 sqrt(0)) = inf and the
gradient is NaN. Use ``sqrt(x + eps)`` or ``F.pairwise_distance`` (which adds eps).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

EXPECTED = {"step": 18, "trigger": "nonfinite_grad", "cause": "backward_singularity", "phase": "backward",
            "module": None, "op": "aten::sqrt", "tensor": None}
RECOVERABLE = True
TAGS = ("embedding_bag", "fp32")
STEPS = 40
VOCAB = 200


class Siamese(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(VOCAB, 12, mode="mean")
        self.proj = nn.Linear(12, 8)

    def forward(self, tokens_a, tokens_b):
        return self.proj(self.bag(tokens_a)), self.proj(self.bag(tokens_b))


def main(attach=None, steps=None, fault=True):
    torch.manual_seed(0)
    steps = STEPS if steps is None else steps
    generator = torch.Generator().manual_seed(1)
    model = Siamese()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    guard = attach(model, optimizer, scheduler=None, scaler=None) if attach else None
    for step in range(steps):
        tokens_a = torch.randint(0, VOCAB, (16, 6), generator=generator)
        tokens_b = torch.randint(0, VOCAB, (16, 6), generator=generator)
        same = (tokens_a[:, 0] % 2 == tokens_b[:, 0] % 2).float()
        if fault and step == 18:
            tokens_b[9] = tokens_a[9]  # the same document on both sides
        emb_a, emb_b = model(tokens_a, tokens_b)
        squared = ((emb_a - emb_b) ** 2).sum(-1)
        distance = torch.sqrt(squared) if fault else torch.sqrt(squared + 1e-8)
        loss = (same * distance ** 2 + (1 - same) * F.relu(1.0 - distance) ** 2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    if guard is not None:
        guard.close()
    g = torch.Generator().manual_seed(99)
    tokens_a, tokens_b = torch.randint(0, VOCAB, (128, 6), generator=g), torch.randint(0, VOCAB, (128, 6), generator=g)
    same = (tokens_a[:, 0] % 2 == tokens_b[:, 0] % 2).float()
    with torch.no_grad():
        emb_a, emb_b = model(tokens_a, tokens_b)
        distance = torch.sqrt(((emb_a - emb_b) ** 2).sum(-1) + 1e-8)
        return float((same * distance ** 2 + (1 - same) * F.relu(1.0 - distance) ** 2).mean())


if __name__ == "__main__":
    print(main())
