"""nn.MultiheadAttention with a key_padding_mask that masks a whole sequence: NaN.

An encoder built from ``nn.MultiheadAttention`` and ``nn.LayerNorm`` (fp32, Adam). At step 11 a batch
holds a sequence that is padding from start to end; its `key_padding_mask` row is all True, so every
attention row of that sequence is fully masked and the softmax returns NaN.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

EXPECTED = {"step": 11, "trigger": "nonfinite_loss", "cause": "masked_softmax_all_masked", "phase": "forward",
            "module": "attn", "op": None, "tensor": None}
RECOVERABLE = True
TAGS = ("transformer", "fp32", "layernorm")
STEPS = 30
VOCAB, DIM, LENGTH = 12, 16, 8


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.attn = nn.MultiheadAttention(DIM, 4, batch_first=True)
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, 3)

    def forward(self, tokens, key_padding_mask):
        h = self.embed(tokens)
        h = self.norm(h + self.attn(h, h, h, key_padding_mask=key_padding_mask)[0])
        return self.head(h.mean(1))


def make_batch(generator, batch: int = 12):
    lengths = torch.randint(2, LENGTH + 1, (batch,), generator=generator)
    tokens = torch.randint(1, VOCAB, (batch, LENGTH), generator=generator)
    padding = torch.arange(LENGTH)[None, :] >= lengths[:, None]
    return tokens.masked_fill(padding, 0), padding, tokens[:, 0] % 3


def main(attach=None, steps=None, fault=True):
    torch.manual_seed(0)
    steps = STEPS if steps is None else steps
    generator = torch.Generator().manual_seed(1)
    model = Encoder()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    guard = attach(model, optimizer, scheduler=None, scaler=None) if attach else None
    for step in range(steps):
        tokens, padding, labels = make_batch(generator)
        if fault and step == 11:
            tokens[4], padding[4] = 0, True  # a sequence that is all padding
        loss = F.cross_entropy(model(tokens, padding), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    if guard is not None:
        guard.close()
    tokens, padding, labels = make_batch(torch.Generator().manual_seed(99), batch=96)
    with torch.no_grad():
        return float(F.cross_entropy(model(tokens, padding), labels))


if __name__ == "__main__":
    print(main())
