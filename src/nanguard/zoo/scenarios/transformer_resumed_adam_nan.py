"""Resuming with an optimizer state that holds NaN (Adam's second moment).

A tiny transformer language model (attention + LayerNorm, fp32, Adam). The run resumes from a
checkpoint written by an unguarded run: the weights are fine, but one entry of Adam's `exp_avg_sq` for
`head.weight` is NaN (a NaN gradient had been folded into the moments). The very first update writes
NaN into the weights. The cause is the optimizer state, not the gradients or the update rule.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

EXPECTED = {"step": 0, "trigger": "nonfinite_weights", "cause": "optimizer_state_nonfinite", "phase": "state",
            "module": "head", "op": None, "tensor": "head.weight.exp_avg_sq"}
RECOVERABLE = True
TAGS = ("transformer", "fp32")
STEPS = 60
VOCAB, DIM, LENGTH = 16, 16, 12


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.pos = nn.Parameter(torch.randn(LENGTH, DIM) * 0.02)
        self.attn = nn.MultiheadAttention(DIM, 2, batch_first=True)
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, ids):
        h = self.embed(ids) + self.pos[: ids.shape[1]]
        causal = torch.triu(torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool), 1)
        h = h + self.attn(h, h, h, attn_mask=causal, need_weights=False)[0]
        return self.head(self.norm(h))


def make_batch(generator, batch: int = 16):
    start = torch.randint(0, VOCAB, (batch, 1), generator=generator)
    return (start + torch.arange(LENGTH + 1)) % VOCAB  # counting sequences: easy to learn


def checkpoint_state(model, optimizer, fault):
    """The optimizer half of the checkpoint the run resumes from (as ``torch.load`` would return it)."""
    state = {}
    for i, p in enumerate(model.parameters()):
        state[i] = {"step": torch.tensor(200.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.full_like(p, 1e-4)}
    if fault:
        head_index = [n for n, _ in model.named_parameters()].index("head.weight")
        state[head_index]["exp_avg_sq"][3, 4] = float("nan")
    return {"state": state, "param_groups": optimizer.state_dict()["param_groups"]}


def main(attach=None, steps=None, fault=True):
    torch.manual_seed(0)
    steps = STEPS if steps is None else steps
    generator = torch.Generator().manual_seed(1)
    model = TinyLM()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    guard = attach(model, optimizer, scheduler=None, scaler=None) if attach else None
    optimizer.load_state_dict(checkpoint_state(model, optimizer, fault))
    for _ in range(steps):
        seq = make_batch(generator)
        logits = model(seq[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), seq[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    if guard is not None:
        guard.close()
    seq = make_batch(torch.Generator().manual_seed(99), batch=64)
    with torch.no_grad():
        return float(F.cross_entropy(model(seq[:, :-1]).reshape(-1, VOCAB), seq[:, 1:].reshape(-1)))


if __name__ == "__main__":
    print(main())
