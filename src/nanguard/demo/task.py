"""The demo's data: a character-level language-modelling task the package generates itself.

Each row of a batch is a few sums such as ``37+85=122;4+9=13;`` packed left to right and padded on
the right. The operands are random, the answers are not, so a small transformer's loss falls quickly
(it learns the format and the arithmetic) and then levels off at the entropy of the random operands.
Everything comes from one seeded generator: the same seed gives the same batches, bit for bit, in
every run, which is what makes "the same run with and without nanguard" a fair comparison.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PAD = "_"
VOCAB = PAD + "0123456789+=;"
PAD_ID = 0
STOI = {ch: i for i, ch in enumerate(VOCAB)}


def encode(text: str) -> list[int]:
    return [STOI[ch] for ch in text]


def decode(ids: list[int]) -> str:
    return "".join(VOCAB[i] for i in ids)


@dataclass
class Batch:
    """One batch, laid out as a Hugging Face collator would: the fields the model's ``forward`` takes.

    ``attention_mask`` is 1 for real tokens and 0 for padding; ``loss_mask`` (float) weights each
    position's next-token loss and is 0 where the target is padding.
    """

    input_ids: torch.Tensor  # (B, T) int64
    attention_mask: torch.Tensor  # (B, T) int64, 1 = real token
    labels: torch.Tensor  # (B, T) int64, input_ids shifted left by one
    loss_mask: torch.Tensor  # (B, T) float32

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                "labels": self.labels, "loss_mask": self.loss_mask}

    def clone(self) -> Batch:
        return Batch(**{name: tensor.clone() for name, tensor in self.as_dict().items()})


def _row(generator: torch.Generator, length: int) -> list[int]:
    """``length`` token ids: whole sums while they fit, then padding. Never empty."""
    ids: list[int] = []
    while True:
        a, b = (int(x) for x in torch.randint(0, 100, (2,), generator=generator))
        sum_ids = encode(f"{a}+{b}={a + b};")
        if ids and len(ids) + len(sum_ids) > length:
            break
        ids += sum_ids[: length - len(ids)]
        if len(ids) == length:
            break
    return ids + [PAD_ID] * (length - len(ids))


def make_batch(generator: torch.Generator, batch_size: int, seq_len: int) -> Batch:
    rows = torch.tensor([_row(generator, seq_len + 1) for _ in range(batch_size)], dtype=torch.long)
    input_ids, labels = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
    return Batch(
        input_ids=input_ids,
        attention_mask=(input_ids != PAD_ID).long(),
        labels=labels,
        loss_mask=(labels != PAD_ID).float(),
    )


def make_batches(seed: int, count: int, batch_size: int, seq_len: int) -> list[Batch]:
    """``count`` batches drawn from a generator seeded with ``seed``: identical on every call."""
    generator = torch.Generator().manual_seed(seed)
    return [make_batch(generator, batch_size, seq_len) for _ in range(count)]
