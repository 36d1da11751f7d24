"""Sparse gradients (``nn.Embedding(sparse=True)`` with ``SparseAdam``) are guarded, not a torch error."""

from __future__ import annotations

import torch

import nanguard
from nanguard.step.norms import all_finite, scale_grads_, total_norm
from tests.conftest import read_events


def test_sparse_embedding_with_sparse_adam_skips_a_nan_step_and_trains_on(tmp_path):
    emb = torch.nn.Embedding(50, 8, sparse=True)
    opt = torch.optim.SparseAdam(list(emb.parameters()), lr=1e-2)
    guard = nanguard.Guard(emb, opt, out_dir=tmp_path, console=False, report=False)
    gen = torch.Generator().manual_seed(3)
    for step in range(20):
        ids = torch.randint(0, 50, (16, 3), generator=gen)
        loss = (emb(ids).sum(-1) - 1).pow(2).mean()
        if step == 8:
            loss = loss * float("nan")
        opt.zero_grad()
        loss.backward()
        opt.step()
    guard.close()
    assert [(e["step"], e["action"]) for e in read_events(tmp_path)] == [(8, "skip")]
    assert guard.summary()["steps"] == 20 and bool(torch.isfinite(emb.weight).all())


def test_sparse_gradient_norm_counts_repeated_rows_once_like_the_update():
    emb = torch.nn.Embedding(5, 3, sparse=True)
    emb(torch.tensor([1, 1, 2])).sum().backward()
    grad = emb.weight.grad
    assert torch.allclose(total_norm([grad, torch.ones(2)]), torch.cat([grad.to_dense().flatten(), torch.ones(2)]).norm())
    scale_grads_([grad], 0.5)
    assert torch.allclose(grad.to_dense()[1], torch.full((3,), 1.0))
    bad = torch.sparse_coo_tensor(torch.tensor([[0, 3]]), torch.tensor([[1.0, 2.0], [float("nan"), 0.0]]), (5, 2), check_invariants=True)
    assert bool(all_finite([grad])) and not bool(all_finite([grad, bad]))
