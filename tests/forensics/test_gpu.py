"""The same forensics on CUDA: backward runs on the device thread, autocast casts to fp16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nanguard.forensics import investigate
from tests.forensics.helpers import bad_step, closure_for
from tests.forensics.models import MLP, TinyLM
from tests.forensics.test_investigate import NormOfPadding

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_cuda_all_masked_attention_and_state_restored() -> None:
    model = TinyLM().cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 11, (4, 5), device="cuda")
    labels = torch.randint(0, 11, (4, 5), device="cuda")
    mask = torch.ones(4, 5, dtype=torch.bool, device="cuda")
    mask[3] = False
    closure = closure_for(
        model, opt, lambda: F.cross_entropy(model(ids, mask).flatten(0, 1), labels.flatten())
    )
    request = bad_step(model, opt, closure, {"input_ids": ids, "attention_mask": mask, "labels": labels})
    grads = [p.grad.clone().view(torch.int32) for p in model.parameters()]
    d = investigate(request).diagnosis
    assert (d.cause, d.module, d.op) == ("masked_softmax_all_masked", "blocks.0.attn", "aten::_softmax")
    after = [p.grad.view(torch.int32) for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(grads, after, strict=True)), "gradients restored bitwise"


def test_cuda_backward_birth_is_attributed_on_the_device_thread() -> None:
    model = NormOfPadding().cuda()
    x, mask = torch.randn(6, 4, device="cuda"), torch.ones(6, device="cuda")
    mask[2] = 0
    request = bad_step(model, None, closure_for(model, None, lambda: model(x, mask)), {"x": x, "mask": mask})
    d = investigate(request).diagnosis
    assert (d.cause, d.op, d.module) == ("backward_singularity", "aten::sqrt", "pool")


def test_cuda_autocast_fp16_overflow_is_forward_overflow() -> None:
    model = MLP(d_in=16, hidden=16, classes=4).cuda()
    with torch.no_grad():
        model.fc1.weight.fill_(1.0)
    x, y = torch.rand(8, 16, device="cuda") * 1000 + 4500, torch.randint(0, 4, (8,), device="cuda")

    def loss() -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.float16):
            out = model(x)
        return F.cross_entropy(out.float(), y)

    request = bad_step(model, None, closure_for(model, None, loss), {"x": x, "labels": y})
    request.capture.autocast_dtype = torch.float16  # type: ignore[union-attr]
    d = investigate(request).diagnosis
    assert (d.cause, d.module) == ("forward_overflow", "fc1")
