"""A token id beyond the vocabulary crashes an EmbeddingBag text classifier.

Bag-of-words sentiment model (EmbeddingBag mean, Adagrad). The tokenizer was updated with new tokens
but the model's vocabulary was not resized: at step 9 a document holds id 500 of a 500-row table and
``embedding_bag`` raises ``index out of range``. nanguard should name the field `tokens`.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

EXPECTED = {"step": 9, "trigger": "exception", "cause": "label_out_of_range", "phase": "data",
            "module": "embed", "op": None, "tensor": "tokens"}
RECOVERABLE = False
CRASHES = True
TAGS = ("embedding_bag", "fp32")
STEPS = 30
VOCAB = 500


class BagOfWords(nn.Module):
    def __init__(self, vocab: int = VOCAB, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.EmbeddingBag(vocab, dim, mode="mean")
        self.out = nn.Linear(dim, 2)

    def forward(self, tokens, offsets):
        return self.out(self.embed(tokens, offsets))


def make_batch(generator, docs: int = 16):
    lengths = torch.randint(3, 12, (docs,), generator=generator)
    tokens = torch.randint(0, VOCAB, (int(lengths.sum()),), generator=generator)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
    doc_of = torch.repeat_interleave(torch.arange(docs), lengths)
    positive = torch.zeros(docs).index_add_(0, doc_of, (tokens < VOCAB // 2).float()) / lengths
    return tokens, offsets, (positive > 0.5).long()


def main(attach=None, steps=None, fault=True):
    torch.manual_seed(0)
    steps = STEPS if steps is None else steps
    generator = torch.Generator().manual_seed(1)
    model = BagOfWords()
    optimizer = torch.optim.Adagrad(model.parameters(), lr=0.1)
    guard = attach(model, optimizer, scheduler=None, scaler=None) if attach else None
    for step in range(steps):
        tokens, offsets, labels = make_batch(generator)
        if fault and step == 9:
            tokens[4] = VOCAB  # a token the new tokenizer added
        loss = F.cross_entropy(model(tokens, offsets), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    if guard is not None:
        guard.close()
    tokens, offsets, labels = make_batch(torch.Generator().manual_seed(99), docs=64)
    with torch.no_grad():
        return float(F.cross_entropy(model(tokens, offsets), labels))


if __name__ == "__main__":
    print(main())
