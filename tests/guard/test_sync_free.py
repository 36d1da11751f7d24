"""The always-on path with a fused optimizer never reads a device value back on the host.

On CPU a read costs nothing, so the guard normally acts at once; ``pipeline.defer_host_verdict`` makes it behave as on
CUDA (verdicts read back later) so the logic can be checked here. The CUDA test proves it for real with
``torch.cuda.set_sync_debug_mode("error")`` and runs wherever a GPU is present.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

import nanguard
from tests.conftest import read_events
from tests.guard.helpers import batches, make_mlp

_READS_ALLOWED = [False]


@contextlib.contextmanager
def _forbid_host_reads():
    """Make every way of reading a tensor's value on the host raise (except where _READS_ALLOWED says so)."""
    names = ("item", "tolist", "__bool__", "__float__", "__int__", "numpy", "cpu")
    saved = {name: getattr(torch.Tensor, name) for name in names}

    def refuse(name):
        def method(self, *args, **kwargs):
            if _READS_ALLOWED[0]:
                return saved[name](self, *args, **kwargs)
            raise AssertionError(f"host read: Tensor.{name}")

        return method

    for name in names:
        setattr(torch.Tensor, name, refuse(name))
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(torch.Tensor, name, value)


def test_fused_guarded_step_reads_nothing_back_on_the_host(tmp_path):
    model = make_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    guard = nanguard.Guard(model, opt, out_dir=tmp_path, console=False, report=False, check_weights_every=5)
    guard.pipeline.defer_host_verdict = True
    read_back = guard.pipeline.process

    def process_host_copies(*args, **kwargs):
        # Reading the pinned host copies that arrived is what the host is meant to do; on CUDA it costs no sync.
        _READS_ALLOWED[0] = True
        try:
            return read_back(*args, **kwargs)
        finally:
            _READS_ALLOWED[0] = False

    guard.pipeline.process = process_host_copies
    for step, (x, y) in enumerate(batches(30)):
        if step == 20:
            x = x.clone()
            x[0, 0] = float("nan")
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        with _forbid_host_reads():
            opt.step()
    guard.close()
    events = read_events(tmp_path)
    assert [(e["step"], e["trigger"], e["action"]) for e in events] == [(20, "nonfinite_loss", "skip")]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert int(next(iter(opt.state.values()))["step"]) == 29  # the fused kernel skipped step 20


def test_fused_path_clips_inside_the_optimizer_kernel(tmp_path):
    """Adaptive clipping reaches a fused optimizer through grad_scale: no pass over the gradients."""
    torch.manual_seed(0)
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, fused=True)
    guard = nanguard.Guard(model, opt, out_dir=tmp_path, console=False, report=False, clip_grad_norm=1e-3)
    x, y = next(batches(1))
    before = [p.detach().clone() for p in model.parameters()]
    F.cross_entropy(model(x), y).backward()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
    opt.step()
    guard.close()
    expected_coef = 1e-3 / (norm + 1e-6)
    for p, b, g in zip(model.parameters(), before, grads, strict=True):
        assert torch.allclose(p.detach(), b - 0.05 * g * expected_coef, atol=1e-7)
    assert guard.summary()["clipped"] == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_guarded_steps_do_not_synchronise_on_cuda(tmp_path):
    model = make_mlp().cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    guard = nanguard.Guard(model, opt, out_dir=tmp_path, console=False, report=False)
    data = [(x.cuda(), y.cuda()) for x, y in batches(40)]
    for x, y in data[:5]:  # warm up allocators and kernels outside the checked region
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step, (x, y) in enumerate(data[5:], start=5):
            if step == 20:
                x = x.clone()
                x[0, 0] = float("nan")
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    guard.close()
    events = read_events(tmp_path)
    assert [(e["step"], e["action"]) for e in events] == [(20, "skip")]
    assert all(torch.isfinite(p).all() for p in model.parameters())
