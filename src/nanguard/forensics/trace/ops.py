"""Operator vocabularies the tracer and the rules share (aten names), and how an op's arguments read."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from nanguard.forensics.trace.births import scalar_repr, tensors_in

# Memory straight from the allocator: whatever bits it holds are not a value anyone computed.
ALLOCATION_OPS = frozenset(
    {
        "aten::empty",
        "aten::empty_like",
        "aten::empty_strided",
        "aten::empty_permuted",
        "aten::new_empty",
        "aten::new_empty_strided",
        "aten::resize_",
        "aten::resize_as_",
        "aten::set_",
    }
)
# In-place ops that overwrite ``self`` entirely: its old contents are not an input.
OVERWRITE_OPS = frozenset(
    {
        "aten::copy_",
        "aten::fill_",
        "aten::zero_",
        "aten::normal_",
        "aten::uniform_",
        "aten::bernoulli_",
        "aten::random_",
        "aten::exponential_",
        "aten::geometric_",
        "aten::cauchy_",
        "aten::log_normal_",
    }
)
# Loss operators whose targets are recorded so label checks work without knowing the batch layout.
CLASS_TARGET_LOSS_OPS = frozenset(
    {
        "aten::nll_loss_forward",
        "aten::nll_loss2d_forward",
        "aten::nll_loss",
        "aten::nll_loss_nd",
        "aten::nll_loss2d",
        "aten::multi_margin_loss",
        "aten::cross_entropy_loss",
    }
)
OTHER_LOSS_OPS = frozenset(
    {
        "aten::binary_cross_entropy",
        "aten::binary_cross_entropy_with_logits",
        "aten::mse_loss",
        "aten::l1_loss",
        "aten::smooth_l1_loss",
        "aten::huber_loss",
        "aten::kl_div",
        "aten::soft_margin_loss",
        "aten::poisson_nll_loss",
        "aten::_ctc_loss",
        "aten::ctc_loss",
    }
)
LOSS_OPS = CLASS_TARGET_LOSS_OPS | OTHER_LOSS_OPS
SOFTMAX_OPS = frozenset({"aten::_softmax", "aten::_log_softmax", "aten::_safe_softmax", "aten::softmax"})
MAX_BIRTHS = 64
MAX_RECORDS = 64


@dataclass
class Bound:
    tensors: list[tuple[str, torch.Tensor, str]] = field(default_factory=list)
    scalars: dict[str, Any] = field(default_factory=dict)

    def by_name(self) -> dict[str, torch.Tensor]:
        return {arg: t for arg, t, role in self.tensors if role != "write"}


def bind(func: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> Bound:
    """Tensor arguments with their role (read, mutated, write) and the scalar arguments by name."""
    name = func._schema.name
    bound = Bound()
    positional = 0
    for arg in func._schema.arguments:
        if arg.kwarg_only:
            if arg.name not in kwargs:
                continue
            value = kwargs[arg.name]
        elif positional < len(args):
            value = args[positional]
            positional += 1
        elif arg.name in kwargs:
            value = kwargs[arg.name]
        else:
            continue
        role = "read"
        alias = arg.alias_info
        if alias is not None and alias.is_write:
            role = (
                "write"
                if (arg.kwarg_only or (name in OVERWRITE_OPS and arg.name == "self"))
                else "mutated"
            )
        tensors = list(tensors_in(value))
        for t in tensors:
            bound.tensors.append((arg.name, t, role))
        if not tensors:
            rendered = scalar_repr(value)
            if rendered is not None:
                bound.scalars[arg.name] = rendered
    return bound
