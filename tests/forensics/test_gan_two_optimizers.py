"""A GAN trained the way Lightning's manual optimization does it, in plain PyTorch (realcode gan/nan_real_image).

One module holds both nets; each optimizer has its own guard watching that module. Before each update the
other net is frozen (``requires_grad_(False)``, as ``toggle_optimizer`` does), and ``optimizer.step`` gets a
closure that does nothing (as Lightning passes one). A NaN in the real images, fed straight to the
discriminator, was ``unknown``: the closure replay re-ran nothing, and the recorded calls were not
replayable because the generator's loss region ended in a backward that was not the discriminator guard's.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nanguard
from tests.conftest import read_events


class _GAN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.generator = nn.Sequential(nn.Linear(4, 16), nn.LeakyReLU(0.2), nn.Linear(16, 8), nn.Tanh())
        self.discriminator = nn.Sequential(nn.Linear(8, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.generator(z)


def _toggle(gan: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    for p in gan.parameters():
        p.requires_grad_(False)
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.requires_grad_(True)


def _train(tmp_path, *, closure: bool, steps: int = 6, bad_step: int = 4) -> list[dict]:
    torch.manual_seed(0)
    gan = _GAN()
    opt_g = torch.optim.Adam(gan.generator.parameters(), lr=2e-4)
    opt_d = torch.optim.Adam(gan.discriminator.parameters(), lr=2e-4)
    guards = [nanguard.Guard(gan, opt, out_dir=tmp_path / name, console=False, report=False)
              for name, opt in (("g", opt_g), ("d", opt_d))]
    images = torch.rand(steps, 16, 8) * 2 - 1
    images[bad_step, 5, 3] = float("nan")

    def step(optimizer: torch.optim.Optimizer) -> None:
        if closure:
            optimizer.step(lambda: None)  # a closure that re-runs nothing
        else:
            optimizer.step()

    for imgs in images:
        z = torch.randn(16, 4)
        _toggle(gan, opt_g)
        g_loss = F.binary_cross_entropy_with_logits(gan.discriminator(gan(z)), torch.ones(16, 1))
        opt_g.zero_grad()
        g_loss.backward()
        step(opt_g)
        _toggle(gan, opt_d)
        real = F.binary_cross_entropy_with_logits(gan.discriminator(imgs), torch.ones(16, 1))
        fake = F.binary_cross_entropy_with_logits(gan.discriminator(gan(z).detach()), torch.zeros(16, 1))
        d_loss = (real + fake) / 2
        opt_d.zero_grad()
        d_loss.backward()
        step(opt_d)
    for guard in guards:
        guard.close()
    assert read_events(tmp_path / "g") == []  # the generator's steps never saw the real images
    return read_events(tmp_path / "d")


@pytest.mark.parametrize("closure", [True, False], ids=["do_nothing_closure", "no_closure"])
def test_nan_real_image_fed_to_the_discriminator_is_input_nonfinite(tmp_path, closure):
    event = _train(tmp_path, closure=closure)[0]
    d = event["diagnosis"]
    assert (event["step"], event["trigger"]) == (4, "nonfinite_loss")
    assert (d["cause"], d["phase"], d["reproducible"]) == ("input_nonfinite", "data", True)
    failures = event["details"]["failures"]
    assert any("closure given to optimizer.step() re-ran nothing" in f for f in failures) == closure


def test_previous_batch_check_with_a_do_nothing_closure_does_not_blame_the_weights(tmp_path):
    """The previous-batch re-run went through the closure too: no loss came back, which read as 'nan on the
    current weights, so the weights were damaged by the last update' (and a rollback). It re-runs the
    recorded calls instead: the previous batch is fine, this batch is the problem."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = nanguard.Guard(model, opt, out_dir=tmp_path, console=False, report=False)
    xs = torch.randn(5, 16, 8)
    for step, x in enumerate(xs):
        p = torch.sigmoid(model(x))
        loss = -torch.log(p * (0.0 if step == 3 else 1.0) + (0.0 if step == 3 else 1e-6)).mean()  # log(0) at step 3
        opt.zero_grad()
        loss.backward()
        opt.step(lambda: None)
    guard.close()
    event = read_events(tmp_path)[0]
    assert (event["step"], event["diagnosis"]["cause"], event["action"]) == (3, "invalid_math_domain", "skip")
    evidence = " ".join(event["diagnosis"]["evidence"])
    assert "this batch, not the weights, is the problem" in evidence and "damaged" not in evidence
