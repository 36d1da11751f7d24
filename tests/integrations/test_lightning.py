"""Lightning (both ``lightning.pytorch`` and ``pytorch_lightning``): a real Trainer on CPU, a NaN batch at a known step."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nanguard import Guard
from tests.conftest import read_events

STEPS = 16
BATCH = 8
BAD_STEP = 6


def dataset(bad_step: int | None) -> torch.utils.data.TensorDataset:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(STEPS * BATCH, 8, generator=gen)
    y = x[:, :4].argmax(1)
    if bad_step is not None:
        x[bad_step * BATCH + 2, 1] = float("nan")
    return torch.utils.data.TensorDataset(x, y)


def make_module(pl: object) -> object:
    class Classifier(pl.LightningModule):  # type: ignore[name-defined,misc]
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
            self.training_steps = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            self.training_steps += 1
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):  # type: ignore[no-untyped-def]
            optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.97)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    return Classifier()


def plain_loop_events(tmp_path: Path, pl: object) -> list[dict]:
    module = make_module(pl)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    loader = torch.utils.data.DataLoader(dataset(BAD_STEP), batch_size=BATCH)
    with Guard(module, optimizer, out_dir=tmp_path / "plain", console=False, report=False):
        for x, y in loader:
            F.cross_entropy(module(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
    return read_events(tmp_path / "plain")


def fit(tmp_path: Path, pl: object, callback: object, module: object, ckpt_path: str | None = None,
        bad_step: int | None = BAD_STEP, **trainer_args: object) -> object:
    trainer = pl.Trainer(  # type: ignore[attr-defined]
        accelerator="cpu", devices=1, max_steps=STEPS, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(tmp_path / "pl"), callbacks=[callback], **trainer_args,
    )
    trainer.fit(module, torch.utils.data.DataLoader(dataset(bad_step), batch_size=BATCH), ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize(("package", "class_name"), [("lightning.pytorch", "NanguardCallback"),
                                                      ("pytorch_lightning", "PLNanguardCallback")])
def test_lightning_trainer_skips_the_nan_step_like_the_plain_loop(tmp_path: Path, package: str, class_name: str) -> None:
    pl = pytest.importorskip(package)
    lightning_integration = importlib.import_module("nanguard.integrations.lightning")
    callback = getattr(lightning_integration, class_name)(console=False, report=False)
    module = make_module(pl)
    trainer = fit(tmp_path, pl, callback, module)

    events = read_events(tmp_path / "pl" / "nanguard")
    expected = plain_loop_events(tmp_path, pl)
    assert [(e["step"], e["trigger"], e["action"]) for e in events] == [(BAD_STEP, "nonfinite_loss", "skip")]
    assert [(e["step"], e["trigger"], e["action"]) for e in events] == [(e["step"], e["trigger"], e["action"]) for e in expected]
    assert events[0]["diagnosis"]["cause"] == expected[0]["diagnosis"]["cause"] == "input_nonfinite"
    assert all(bool(torch.isfinite(p).all()) for p in module.parameters())
    # The closure ran once per step; forensics replays do not go through training_step's counter twice per step
    # except on the one bad step.
    assert STEPS <= module.training_steps <= STEPS + 3
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.last_epoch == STEPS - 1
    rows = (tmp_path / "pl" / "nanguard" / "history.csv").read_text().splitlines()[1:]
    assert len(rows) == STEPS and rows[BAD_STEP].split(",")[7] == "skip"
    assert callback.guard is None  # closed at the end of fit
    assert not hasattr(trainer.optimizers[0].step, "_nanguard")


def test_lightning_closure_runs_once_per_step_and_accumulation_counts_real_steps(tmp_path: Path) -> None:
    pl = pytest.importorskip("lightning.pytorch")
    from nanguard.integrations.lightning import nanguard_callback

    module = make_module(pl)
    calls: list[int] = []
    original = module.training_step

    def counting_step(batch, batch_idx):  # type: ignore[no-untyped-def]
        calls.append(batch_idx)
        return original(batch, batch_idx)

    module.training_step = counting_step
    callback = nanguard_callback(module, console=False, report=False, forensics=False)
    fit(tmp_path, pl, callback, module, accumulate_grad_batches=2, max_epochs=1)
    # 16 batches, 2 per optimizer step: 8 guarded steps, every batch's training_step ran exactly once.
    assert sorted(calls) == list(range(STEPS))
    rows = (tmp_path / "pl" / "nanguard" / "history.csv").read_text().splitlines()[1:]
    assert len(rows) == STEPS // 2
    events = read_events(tmp_path / "pl" / "nanguard")
    assert [(e["step"], e["action"]) for e in events] == [(BAD_STEP // 2, "skip")]


def test_manual_optimization_is_guarded(tmp_path: Path) -> None:
    pl = pytest.importorskip("lightning.pytorch")
    from nanguard.integrations.lightning import NanguardCallback

    class Manual(make_module(pl).__class__):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            optimizer = self.optimizers()
            x, y = batch
            loss = F.cross_entropy(self(x), y)
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()
            return loss

    module = Manual()
    fit(tmp_path, pl, NanguardCallback(console=False, report=False), module)
    events = read_events(tmp_path / "pl" / "nanguard")
    assert [(e["step"], e["trigger"], e["action"]) for e in events] == [(BAD_STEP, "nonfinite_loss", "skip")]
    assert events[0]["diagnosis"]["cause"] == "input_nonfinite"
    assert all(bool(torch.isfinite(p).all()) for p in module.parameters())


def test_nanguard_callback_refuses_other_objects() -> None:
    from nanguard.errors import UsageError
    from nanguard.integrations.lightning import nanguard_callback

    with pytest.raises(UsageError, match="Lightning"):
        nanguard_callback(object())


def test_guard_state_travels_in_the_lightning_checkpoint(tmp_path: Path) -> None:
    """The callback's ``state_dict`` holds the guard's: ``fit(ckpt_path=...)`` resumes statistics and step count."""
    pl = pytest.importorskip("lightning.pytorch")
    from nanguard.integrations.lightning import NanguardCallback

    first = NanguardCallback(console=False, report=False, out_dir=tmp_path / "first")
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=10, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path / "pl"), callbacks=[first],
                         enable_checkpointing=False)
    module = make_module(pl)
    trainer.fit(module, torch.utils.data.DataLoader(dataset(None), batch_size=BATCH))
    checkpoint = tmp_path / "ckpt.ckpt"
    trainer.save_checkpoint(checkpoint)
    saved = torch.load(checkpoint, weights_only=False)
    (state,) = [v for k, v in saved["callbacks"].items() if "NanguardCallback" in k]
    assert state["guards"][0]["tally"]["steps"] == 10

    second = NanguardCallback(console=False, report=False, out_dir=tmp_path / "second")
    resumed = pl.Trainer(accelerator="cpu", devices=1, max_steps=STEPS, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path / "pl"), callbacks=[second],
                         enable_checkpointing=False)
    resumed.fit(make_module(pl), torch.utils.data.DataLoader(dataset(None), batch_size=BATCH), ckpt_path=str(checkpoint))
    rows = (tmp_path / "second" / "history.csv").read_text().splitlines()[1:]
    assert [int(row.split(",")[0]) for row in rows] == list(range(10, STEPS))  # the guard counted on from 10


def make_gan(pl: object) -> object:
    """Lightning's GAN template in miniature: manual optimization, generator then discriminator each batch."""

    class GAN(pl.LightningModule):  # type: ignore[name-defined,misc]
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.automatic_optimization = False
            self.generator = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8))
            self.discriminator = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return self.generator(z)

        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            imgs, _ = batch
            opt_g, opt_d = self.optimizers()
            z = torch.randn(imgs.shape[0], 4)
            ones, zeros = torch.ones(imgs.shape[0], 1), torch.zeros(imgs.shape[0], 1)
            g_loss = F.binary_cross_entropy_with_logits(self.discriminator(self(z)), ones)
            opt_g.zero_grad()
            self.manual_backward(g_loss)
            opt_g.step()
            real = F.binary_cross_entropy_with_logits(self.discriminator(imgs), ones)
            fake = F.binary_cross_entropy_with_logits(self.discriminator(self(z).detach()), zeros)
            d_loss = (real + fake) / 2
            opt_d.zero_grad()
            self.manual_backward(d_loss)
            opt_d.step()

        def configure_optimizers(self):  # type: ignore[no-untyped-def]
            return [torch.optim.Adam(self.generator.parameters(), lr=1e-3),
                    torch.optim.Adam(self.discriminator.parameters(), lr=1e-3)]

    return GAN()


def test_gan_with_two_optimizers_blames_only_the_discriminator(tmp_path: Path) -> None:
    """Regression (issue 17 item 1): the discriminator's NaN made the generator skip its healthy later steps,
    each guard's loss was g_loss + d_loss, and every diagnosis failed."""
    pl = pytest.importorskip("lightning.pytorch")
    from nanguard.integrations.lightning import NanguardCallback

    module = make_gan(pl)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path / "pl"),
                         callbacks=[NanguardCallback(console=False, report=False, history_every=1)])
    trainer.fit(module, torch.utils.data.DataLoader(dataset(BAD_STEP), batch_size=BATCH))
    generator, discriminator = tmp_path / "pl" / "nanguard" / "optimizer0", tmp_path / "pl" / "nanguard" / "optimizer1"
    assert not (generator / "events.jsonl").exists() or read_events(generator) == []
    (event,) = read_events(discriminator)
    assert (event["step"], event["trigger"], event["action"]) == (BAD_STEP, "nonfinite_loss", "skip")
    g_rows = [r.split(",") for r in (generator / "history.csv").read_text().splitlines()[1:]]
    assert [r[7] for r in g_rows] == ["none"] * STEPS  # the generator's steps all went through
    d_rows = [r.split(",") for r in (discriminator / "history.csv").read_text().splitlines()[1:]]
    assert [int(r[0]) for r in d_rows if r[7] != "none"] == [BAD_STEP]
    assert all(bool(torch.isfinite(p).all()) for p in module.parameters())


def test_gan_discriminator_nan_is_diagnosed_as_input(tmp_path: Path) -> None:
    """Regression (issue 17 item 1): the real images go straight into the discriminator, never through the
    LightningModule's forward, so the NaN entered as an unnamed tensor and every diagnosis raised
    ``Diagnosis.phase='input' is not one of ...``."""
    pl = pytest.importorskip("lightning.pytorch")
    from nanguard.integrations.lightning import NanguardCallback

    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path / "pl"),
                         callbacks=[NanguardCallback(console=False, report=False)])
    trainer.fit(make_gan(pl), torch.utils.data.DataLoader(dataset(BAD_STEP), batch_size=BATCH))
    (event,) = read_events(tmp_path / "pl" / "nanguard" / "optimizer1")
    assert (event["diagnosis"]["cause"], event["diagnosis"]["phase"]) == ("input_nonfinite", "data")
    assert not any("diagnosis failed" in line for line in event["diagnosis"]["evidence"])


def test_a_crash_in_training_step_is_recorded_as_an_exception_event(tmp_path: Path) -> None:
    """Regression (issue 17 item 4): on_exception closed the guard without recording what raised."""
    pl = pytest.importorskip("lightning.pytorch")
    from nanguard.integrations.lightning import NanguardCallback

    class BadLabel(make_module(pl).__class__):  # type: ignore[misc]
        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            x, y = batch
            if batch_idx == BAD_STEP:
                y = y.clone()
                y[2] = 40  # past the 4 classes: cross_entropy raises IndexError
            return F.cross_entropy(self(x), y)

    with pytest.raises(IndexError):
        fit(tmp_path, pl, NanguardCallback(console=False, report=False), BadLabel(), bad_step=None)
    (event,) = read_events(tmp_path / "pl" / "nanguard")
    assert (event["step"], event["trigger"], event["action"]) == (BAD_STEP, "exception", "abort")
    assert event["diagnosis"]["cause"] == "label_out_of_range"
    summary = __import__("json").loads((tmp_path / "pl" / "nanguard" / "summary.json").read_text())
    assert summary["status"] == "error"


def test_resume_from_a_checkpoint_without_guard_state_counts_from_global_step(tmp_path: Path) -> None:
    """Regression (issue 17 item 3): a checkpoint saved without the callback restarted the guard's count at 0."""
    pl = pytest.importorskip("lightning.pytorch")
    from nanguard.integrations.lightning import NanguardCallback

    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=4, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path / "pl"), enable_checkpointing=False)
    trainer.fit(make_module(pl), torch.utils.data.DataLoader(dataset(None), batch_size=BATCH))
    trainer.save_checkpoint(tmp_path / "plain.ckpt")
    callback = NanguardCallback(console=False, report=False, history_every=1)
    resumed = fit(tmp_path, pl, callback, make_module(pl), ckpt_path=str(tmp_path / "plain.ckpt"))
    assert resumed.global_step == STEPS
    (event,) = read_events(tmp_path / "pl" / "nanguard")
    # Lightning restarts the (non-resumable) loader, so the NaN batch is consumed at global_step 4 + 6 = 10;
    # the guard alone would have called it its step 6.
    assert event["step"] == 4 + BAD_STEP
    rows = (tmp_path / "pl" / "nanguard" / "history.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(4, STEPS))


def test_bf16_mixed_precision_skips_the_nan_step(tmp_path: Path) -> None:
    """Issue 17 item 5: ``precision="bf16-mixed"``: the right event, and the healthy steps as without nanguard."""
    pl = pytest.importorskip("lightning.pytorch")
    from nanguard.integrations.lightning import NanguardCallback

    module = make_module(pl)
    fit(tmp_path, pl, NanguardCallback(console=False, report=False), module, precision="bf16-mixed")
    events = read_events(tmp_path / "pl" / "nanguard")
    assert [(e["step"], e["trigger"], e["action"]) for e in events] == [(BAD_STEP, "nonfinite_loss", "skip")]
    assert events[0]["diagnosis"]["cause"] == "input_nonfinite"
    assert all(bool(torch.isfinite(p).all()) for p in module.parameters())


def test_healthy_bf16_fit_is_bit_identical_to_the_fit_without_nanguard(tmp_path: Path) -> None:
    pl = pytest.importorskip("lightning.pytorch")
    from nanguard.integrations.lightning import NanguardCallback

    plain, guarded = make_module(pl), make_module(pl)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=STEPS, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, precision="bf16-mixed",
                         default_root_dir=str(tmp_path / "plain"))
    trainer.fit(plain, torch.utils.data.DataLoader(dataset(None), batch_size=BATCH))
    fit(tmp_path, pl, NanguardCallback(console=False, report=False), guarded, bad_step=None, precision="bf16-mixed")
    for a, b in zip(plain.parameters(), guarded.parameters(), strict=True):
        assert torch.equal(a, b)
