"""Language model that never predicts PAD (its logit is -inf) but is trained on PAD labels.

A GRU language model (fp32, Adam) masks the logit of the padding token with -inf so generation can
never emit it. Its labels are supposed to use -100 (ignore_index) on padded positions, but the collate
function fills them with the PAD id 0. Batches had no padding until step 16, the first one with a
shorter sequence: the PAD label's logit is -inf and the loss is inf.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

EXPECTED = {"step": 16, "trigger": "nonfinite_loss", "cause": "masked_target_logit", "phase": "loss",
            "module": None, "op": "aten::nll_loss_forward", "tensor": "labels"}
RECOVERABLE = True
TAGS = ("gru", "fp32", "language-model")
STEPS = 100
VOCAB, LENGTH, PAD = 14, 10, 0


class GRULanguageModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16, padding_idx=PAD)
        self.gru = nn.GRU(16, 32, batch_first=True)
        self.out = nn.Linear(32, VOCAB)

    def forward(self, input_ids):
        logits = self.out(self.gru(self.embed(input_ids))[0])
        logits[..., PAD] = float("-inf")  # never generate padding
        return logits


def make_batch(generator, batch: int = 16, pad_rows: int = 0):
    start = torch.randint(1, VOCAB, (batch, 1), generator=generator)
    seq = (start + torch.arange(LENGTH + 1) - 1) % (VOCAB - 1) + 1
    if pad_rows:
        seq[:pad_rows, 7:] = PAD  # shorter sequences, padded
    return seq[:, :-1], seq[:, 1:]


def main(attach=None, steps=None, fault=True):
    torch.manual_seed(0)
    steps = STEPS if steps is None else steps
    generator = torch.Generator().manual_seed(1)
    model = GRULanguageModel()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    guard = attach(model, optimizer, scheduler=None, scaler=None) if attach else None
    for step in range(steps):
        input_ids, labels = make_batch(generator, pad_rows=3 if step == 16 else 0)
        if not fault:
            labels = labels.masked_fill(labels == PAD, -100)
        logits = model(input_ids)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    if guard is not None:
        guard.close()
    input_ids, labels = make_batch(torch.Generator().manual_seed(99), batch=64)
    with torch.no_grad():
        return float(F.cross_entropy(model(input_ids).reshape(-1, VOCAB), labels.reshape(-1)))


if __name__ == "__main__":
    print(main())
