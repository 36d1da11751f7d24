"""A pure-fp16 EmbeddingBag(mode="sum") over one very long document overflows float16.

A document classifier kept in float16 (model.half(), SGD) sums the embeddings of a document's tokens
and divides by the document's length (a mean computed by hand).
Documents are ~40 tokens long, until step 23 brings a 12000-token document: its sum passes float16's
65504 and becomes inf, then NaN in the loss. The token ids are all valid and the same step in float32
is finite: the sum overflowed its dtype (use mode="mean", or keep the bag in float32).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

EXPECTED = {"step": 23, "trigger": "nonfinite_loss", "cause": "forward_overflow", "phase": "forward",
            "module": "bag", "op": "aten::_embedding_bag", "tensor": None}
RECOVERABLE = True
TAGS = ("embedding_bag", "fp16")
STEPS = 45
VOCAB = 300


class DocumentClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(VOCAB, 8, mode="sum")
        self.norm = nn.LayerNorm(8)
        self.out = nn.Linear(8, 2)
        with torch.no_grad():
            self.bag.weight.mul_(0.3).add_(6.0)  # pretrained vectors with a large common component
            self.bag.weight[: VOCAB // 2, 0] += 1.0  # ... that already carry some sentiment

    def forward(self, tokens, offsets):
        lengths = torch.diff(offsets, append=torch.tensor([len(tokens)]))
        mean = self.bag(tokens, offsets) / lengths[:, None].half()  # a mean, computed by hand
        return self.out(self.norm(mean))


def make_batch(generator, docs: int = 8, long_doc: bool = False):
    lengths = torch.randint(30, 50, (docs,), generator=generator)
    if long_doc:
        lengths[5] = 12000
    bias = torch.rand(docs, generator=generator)  # each document leans positive or negative
    doc_of = torch.repeat_interleave(torch.arange(docs), lengths)
    positive = torch.rand(int(lengths.sum()), generator=generator) < bias[doc_of]
    tokens = torch.randint(0, VOCAB // 2, (int(lengths.sum()),), generator=generator) + (~positive) * (VOCAB // 2)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
    return tokens, offsets, (bias > 0.5).long()


def main(attach=None, steps=None, fault=True):
    torch.manual_seed(0)
    steps = STEPS if steps is None else steps
    generator = torch.Generator().manual_seed(1)
    model = DocumentClassifier().half()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = attach(model, optimizer, scheduler=None, scaler=None) if attach else None
    for step in range(steps):
        tokens, offsets, labels = make_batch(generator, long_doc=fault and step == 23)
        loss = F.cross_entropy(model(tokens, offsets).float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    if guard is not None:
        guard.close()
    tokens, offsets, labels = make_batch(torch.Generator().manual_seed(99), docs=64)
    with torch.no_grad():
        return float(F.cross_entropy(model(tokens, offsets).float(), labels))


if __name__ == "__main__":
    print(main())
