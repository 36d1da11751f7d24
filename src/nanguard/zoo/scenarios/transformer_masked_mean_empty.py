"""0/0 in a masked mean: a batch in which no position counts toward the loss.

A small causal transformer LM (attention + LayerNorm, fp32, AdamW) averages its token losses over the
positions where `loss_mask` is 1: ``(loss * mask).sum() / mask.sum()``. At step 19 a batch holds only
prompt tokens (every loss_mask entry is 0), so the mean is 0/0 = NaN. Use ``mask.sum().clamp_min(1)``.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

EXPECTED = {"step": 19, "trigger": "nonfinite_loss", "cause": "invalid_math_domain", "phase": "loss",
            "module": None, "op": "aten::div", "tensor": None}
RECOVERABLE = True
TAGS = ("transformer", "fp32", "layernorm")
STEPS = 40
VOCAB, DIM, LENGTH = 16, 16, 10


class CausalLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.layer = nn.TransformerEncoderLayer(DIM, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, input_ids):
        causal = nn.Transformer.generate_square_subsequent_mask(input_ids.shape[1])
        return self.head(self.layer(self.embed(input_ids), src_mask=causal, is_causal=True))


def make_batch(generator, batch: int = 8):
    start = torch.randint(0, VOCAB, (batch, 1), generator=generator)
    seq = (start + 2 * torch.arange(LENGTH + 1)) % VOCAB
    loss_mask = torch.ones(batch, LENGTH)
    loss_mask[:, :3] = 0  # prompt tokens do not count
    return seq[:, :-1], seq[:, 1:], loss_mask


def main(attach=None, steps=None, fault=True):
    torch.manual_seed(0)
    steps = STEPS if steps is None else steps
    generator = torch.Generator().manual_seed(1)
    model = CausalLM()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    guard = attach(model, optimizer, scheduler=None, scaler=None) if attach else None
    for step in range(steps):
        input_ids, labels, loss_mask = make_batch(generator)
        if fault and step == 19:
            loss_mask.zero_()  # a batch of prompts only
        logits = model(input_ids)
        token_loss = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), reduction="none")
        mask = loss_mask.reshape(-1)
        denominator = mask.sum() if fault else mask.sum().clamp_min(1)
        loss = (token_loss * mask).sum() / denominator
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    if guard is not None:
        guard.close()
    input_ids, labels, _ = make_batch(torch.Generator().manual_seed(99), batch=64)
    with torch.no_grad():
        return float(F.cross_entropy(model(input_ids).reshape(-1, VOCAB), labels.reshape(-1)))


if __name__ == "__main__":
    print(main())
