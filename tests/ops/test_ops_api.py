"""The public surface of nanguard.ops: exports, a light import, autocast, CUDA and no hidden syncs."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

import nanguard
import nanguard.ops as ops
from nanguard.errors import NanguardError

HAS_CUDA = torch.cuda.is_available()
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA")]),
]


def test_all_is_explicit_and_every_name_exists() -> None:
    assert len(ops.__all__) == len(set(ops.__all__))
    for name in ops.__all__:
        assert hasattr(ops, name), name
    public = {name for name in vars(ops) if not name.startswith("_")}
    assert set(ops.__all__) <= public
    assert nanguard.ops is ops  # the lazy attribute on the package
    for error in (ops.LabelOutOfRangeError, ops.MaskedTargetError):
        assert issubclass(error, NanguardError) and issubclass(error, ValueError)


def test_import_nanguard_ops_pulls_in_no_optional_packages() -> None:
    probe = (
        "import sys, json, nanguard.ops; "
        "print(json.dumps(sorted(m for m in ('pandas', 'matplotlib', 'transformers', 'lightning', 'hypothesis') "
        "if m in sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def _every_op(device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Each op on a small adversarial batch: all-masked row, zero row, zero denominators, -inf."""
    scores = torch.randn(3, 5, device=device, dtype=dtype)
    keep = torch.tensor([[True, True, False, False, True], [False] * 5, [True] * 5], device=device)
    activations = torch.randn(3, 8, device=device, dtype=dtype)
    activations[1] = 0
    target = torch.tensor([0, 1, -100], device=device)
    valid = torch.tensor([True, True, False, True, True], device=device)
    return {
        "masked_softmax": ops.masked_softmax(scores, keep),
        "mask_logits": ops.mask_logits(scores, valid, target),
        "rms_norm": ops.rms_norm(activations, 8, torch.ones(8, device=device, dtype=dtype)),
        "RMSNorm": ops.RMSNorm(8, device=device, dtype=dtype)(activations),
        "safe_log": ops.safe_log(activations.abs()),
        "safe_div": ops.safe_div(scores, torch.zeros_like(scores)),
        "masked_mean": ops.masked_mean(scores, keep, dim=-1),
        "checked_cross_entropy": ops.checked_cross_entropy(ops.mask_logits(scores, valid), target),
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_every_op_is_finite_on_each_device_and_dtype(device: str, dtype: torch.dtype) -> None:
    for name, result in _every_op(device, dtype).items():
        assert result.device.type == device, name
        assert torch.isfinite(result).all(), name


@pytest.mark.parametrize("device", DEVICES)
def test_ops_work_under_autocast(device: str) -> None:
    low = torch.bfloat16 if device == "cpu" else torch.float16
    layer = torch.nn.Linear(6, 5).to(device)
    inputs = torch.randn(4, 6, device=device)
    keep = torch.tensor(
        [[True] * 5, [False] * 5, [True, False] * 2 + [True], [False] * 4 + [True]], device=device
    )
    target = torch.tensor([0, 3, -100, 4], device=device)
    with torch.autocast(device_type=device, dtype=low):
        logits = layer(inputs)
        assert logits.dtype == low
        probs = ops.masked_softmax(logits, keep)
        pooled = ops.masked_mean(logits, keep, dim=-1)
        normed = ops.RMSNorm(5, device=device)(logits)
        loss = ops.checked_cross_entropy(
            ops.mask_logits(logits, torch.tensor([True] * 5, device=device)), target
        )
        total = loss + probs.float().sum() + pooled.float().sum() + normed.float().sum()
        total = total + ops.safe_log(probs).float().sum()
    total.backward()
    assert torch.isfinite(total)
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()
    assert (probs[1] == 0).all()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA")
@pytest.mark.parametrize(
    "call",
    [
        lambda x, keep: ops.masked_softmax(x, keep),
        lambda x, keep: ops.masked_mean(x, keep, dim=-1),
        lambda x, keep: ops.mask_logits(x, keep[0]),
        lambda x, keep: ops.mask_logits(
            x, keep[0], torch.zeros(4, dtype=torch.long, device=x.device), on_masked_target="unmask"
        ),
        lambda x, keep: ops.rms_norm(x, 6),
        lambda x, keep: ops.safe_log(x),
        lambda x, keep: ops.safe_div(x, x),
    ],
)
def test_sync_free_ops_do_not_synchronise_with_the_host(
    call: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> None:
    x = torch.randn(4, 6, device="cuda")
    keep = torch.rand(4, 6, device="cuda") > 0.5
    call(x, keep)  # warm up kernels outside the check
    torch.cuda.set_sync_debug_mode("error")
    try:
        call(x, keep)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_loss_from_mask_logits_matches_dropping_the_invalid_classes() -> None:
    """End to end: a two-dataset head whose second dataset lacks classes 3 and 4."""
    logits = torch.randn(6, 5, requires_grad=True)
    dataset_of_sample = torch.tensor([0, 0, 0, 1, 1, 1])
    valid_per_dataset = torch.tensor([[True] * 5, [True, True, True, False, False]])
    target = torch.tensor([4, 3, 0, 2, 1, 0])
    loss = ops.checked_cross_entropy(
        ops.mask_logits(logits, valid_per_dataset[dataset_of_sample], target), target
    )
    loss.backward()
    by_hand = torch.stack(
        [
            F.cross_entropy(logits[i, valid_per_dataset[d]], target[i])
            for i, d in enumerate(dataset_of_sample.tolist())
        ]
    ).mean()
    torch.testing.assert_close(loss, by_hand)
    assert logits.grad is not None and (logits.grad[3:, 3:] == 0).all() and torch.isfinite(logits.grad).all()
    assert not math.isnan(loss.item())
