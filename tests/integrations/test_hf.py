"""Hugging Face Trainer: a real GPT-2 (tiny config, no hub) trained on CPU with a NaN batch at a known step."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from nanguard import Guard  # noqa: E402
from nanguard.integrations.hf import NanguardCallback, guard_trainer  # noqa: E402
from tests.conftest import read_events  # noqa: E402

BATCH = 4
STEPS = 20
BAD_STEP = 7


class Tokens(torch.utils.data.IterableDataset):
    """Embedded tokens in a fixed order (no sampler), so batch ``k`` holds items ``[4k, 4k+4)``."""

    def __init__(self, n: int, bad_item: int | None = None) -> None:
        self.n, self.bad_item = n, bad_item

    def __iter__(self):
        gen = torch.Generator().manual_seed(0)
        for i in range(self.n):
            embeds = torch.randn(8, 32, generator=gen)
            if i == self.bad_item:
                embeds[3, 5] = float("nan")
            yield {"inputs_embeds": embeds, "labels": torch.randint(0, 64, (8,), generator=gen)}


def tiny_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def make_trainer(tmp_path: Path, model: torch.nn.Module, bad_item: int | None, **args) -> transformers.Trainer:
    options = {"output_dir": str(tmp_path / "hf"), "max_steps": STEPS, "per_device_train_batch_size": BATCH,
               "report_to": [], "use_cpu": True, "logging_steps": 1, "save_strategy": "no", "disable_tqdm": True,
               "learning_rate": 1e-3, "max_grad_norm": 0.0}
    arguments = transformers.TrainingArguments(**{**options, **args})
    return transformers.Trainer(model=model, args=arguments, train_dataset=Tokens(STEPS * BATCH * 2, bad_item))


def plain_loop_events(tmp_path: Path, bad_item: int) -> list[dict]:
    """The same model, data and fault, trained by hand under a plain Guard."""
    model = tiny_gpt2()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0, fused=True)
    loader = torch.utils.data.DataLoader(Tokens(STEPS * BATCH * 2, bad_item), batch_size=BATCH)
    with Guard(model, optimizer, out_dir=tmp_path / "plain", console=False, report=False):
        for _, batch in zip(range(STEPS), loader, strict=False):
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return read_events(tmp_path / "plain")


def test_trainer_skips_the_nan_step_like_the_plain_loop(tmp_path: Path) -> None:
    bad_item = BAD_STEP * BATCH + 1
    model = tiny_gpt2()
    trainer = make_trainer(tmp_path, model, bad_item)
    callback = guard_trainer(trainer, console=False, report=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()

    events = read_events(tmp_path / "hf" / "nanguard")
    expected = plain_loop_events(tmp_path, bad_item)
    assert [(e["step"], e["trigger"], e["action"]) for e in events] == [(BAD_STEP, "nonfinite_loss", "skip")]
    assert [(e["step"], e["trigger"], e["action"]) for e in events] == [(e["step"], e["trigger"], e["action"]) for e in expected]
    assert events[0]["diagnosis"]["cause"] == expected[0]["diagnosis"]["cause"] == "input_nonfinite"
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())

    # The LR schedule did not advance for the skipped step: one fewer scheduler step than optimizer steps.
    assert trainer.lr_scheduler.last_epoch == STEPS - 1
    rows = (tmp_path / "hf" / "nanguard" / "history.csv").read_text().splitlines()[1:]
    assert len(rows) == STEPS
    assert rows[BAD_STEP].split(",")[7] == "skip"
    lr_of = {int(r.split(",")[0]): float(r.split(",")[4]) for r in rows}
    assert lr_of[BAD_STEP] == lr_of[BAD_STEP + 1] > lr_of[BAD_STEP + 2]

    # The Trainer's own log still averages the NaN away, but says that it happened.
    logged = [h for h in trainer.state.log_history if "nanguard_skipped" in h]
    assert [h["nanguard_nonfinite_loss"] for h in logged].count(1) == 1
    assert logged[-1]["nanguard_skipped"] == 1
    assert any("non-finite loss" in str(w.message) for w in caught)
    # Patches are gone once training ends.
    assert callback.guard is None
    assert not hasattr(trainer.optimizer.step, "_nanguard")
    assert not hasattr(trainer.optimizer.optimizer.step, "_nanguard")


def test_callback_added_by_hand_with_gradient_accumulation(tmp_path: Path) -> None:
    model = tiny_gpt2()
    trainer = make_trainer(tmp_path, model, bad_item=2 * BATCH * 5 + 6, gradient_accumulation_steps=2)
    trainer.add_callback(NanguardCallback(out_dir=tmp_path / "ng", console=False, report=False))
    trainer.train()
    events = read_events(tmp_path / "ng")
    # Items 40..47 make optimizer step 5 (two micro-batches of 4); item 46 holds the NaN.
    assert [(e["step"], e["trigger"], e["action"]) for e in events] == [(5, "nonfinite_loss", "skip")]
    rows = (tmp_path / "ng" / "history.csv").read_text().splitlines()[1:]
    assert len(rows) == STEPS
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_guard_trainer_rejects_other_objects() -> None:
    from nanguard.errors import UsageError

    with pytest.raises(UsageError, match=r"transformers\.Trainer"):
        guard_trainer(object())


def test_guard_state_is_exported_with_trainer_checkpoints_and_restored(tmp_path: Path) -> None:
    """``NanguardCallback`` is an ``ExportableState``: the guard's state goes into ``TrainerState`` (JSON) and a
    callback rebuilt from it (as the Trainer does on resume) continues the step count."""
    import json

    callback = NanguardCallback(console=False, report=False, out_dir=str(tmp_path / "ng"))
    trainer = make_trainer(tmp_path, tiny_gpt2(), None)
    trainer.add_callback(callback)
    exported: list[dict] = []

    class Snapshot(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            if state.global_step == 5:
                exported.append(json.loads(json.dumps(callback.state())))

    trainer.add_callback(Snapshot())
    trainer.train()
    (state,) = exported
    assert state["attributes"]["guard_state"]["tally"]["steps"] == 5
    rebuilt = NanguardCallback(**state["args"])
    for key, value in state["attributes"].items():
        setattr(rebuilt, key, value)
    resumed = make_trainer(tmp_path / "resumed", tiny_gpt2(), None)
    resumed.add_callback(rebuilt)
    resumed.train()
    rows = (tmp_path / "ng" / "history.csv").read_text().splitlines()[1:]
    assert int(rows[0].split(",")[0]) == 5  # the rebuilt guard counted on from the exported step


class BadLabel(Tokens):
    """Tokens whose item ``bad_item`` has a label past the vocabulary: the loss raises ``IndexError``."""

    def __iter__(self):
        for i, item in enumerate(super().__iter__()):
            if i == self.bad_label:
                item["labels"][2] = 640
            yield item


def _label_trainer(tmp_path: Path, **args) -> transformers.Trainer:
    trainer = make_trainer(tmp_path, tiny_gpt2(), None, **args)
    trainer.train_dataset = BadLabel(STEPS * BATCH * 2)
    trainer.train_dataset.bad_label = BAD_STEP * BATCH + 1
    return trainer


def test_guard_trainer_records_a_label_out_of_range_crash_as_an_exception_event(tmp_path: Path) -> None:
    """Regression (issue 13 item 9): the crash left ``status: error`` and no event."""
    trainer = _label_trainer(tmp_path)
    guard_trainer(trainer, console=False, report=False)
    with pytest.raises(IndexError):
        trainer.train()
    (event,) = read_events(tmp_path / "hf" / "nanguard")
    assert (event["step"], event["trigger"], event["action"]) == (BAD_STEP, "exception", "abort")
    assert event["diagnosis"]["cause"] == "label_out_of_range"
    summary = __import__("json").loads((tmp_path / "hf" / "nanguard" / "summary.json").read_text())
    assert summary["status"] == "error"


def test_callback_alone_records_an_uncaught_crash_through_the_excepthook(tmp_path: Path) -> None:
    """Regression (issue 13 item 9): ``Trainer(callbacks=[NanguardCallback()])`` has no exception hook of its own;
    the uncaught exception reaches ``sys.excepthook``, which writes the event before the traceback."""
    import sys

    trainer = _label_trainer(tmp_path)
    trainer.add_callback(NanguardCallback(console=False, report=False))
    try:
        trainer.train()
    except IndexError as exc:
        sys.excepthook(type(exc), exc, exc.__traceback__)  # what the interpreter does with an uncaught error
    else:
        pytest.fail("the bad label did not raise")
    (event,) = read_events(tmp_path / "hf" / "nanguard")
    assert (event["step"], event["trigger"], event["diagnosis"]["cause"]) == (BAD_STEP, "exception", "label_out_of_range")
    assert sys.excepthook is sys.__excepthook__ or "nanguard" not in repr(sys.excepthook)


def test_grad_norm_is_read_before_the_trainers_clipping_and_nothing_more_is_clipped(tmp_path: Path) -> None:
    """Regression: the callback recorded the norm after clipping (1.0 where the Trainer logged 4.5), so growth
    was invisible; it now takes the pre-clip norm ``accelerator.clip_grad_norm_`` computed, and the weights are
    bit-identical to the same run without nanguard."""
    plain = make_trainer(tmp_path / "plain", tiny_gpt2(), None, max_grad_norm=0.05, max_steps=6)
    plain.train()
    model = tiny_gpt2()
    guarded = make_trainer(tmp_path, model, None, max_grad_norm=0.05, max_steps=6)
    guarded.add_callback(NanguardCallback(console=False, report=False, history_every=1))
    guarded.train()
    logged = [h["grad_norm"] for h in guarded.state.log_history if "grad_norm" in h]
    rows = (tmp_path / "hf" / "nanguard" / "history.csv").read_text().splitlines()[1:]
    recorded = [float(r.split(",")[3]) for r in rows]
    assert min(logged) > 0.05  # every step was clipped by the Trainer
    assert recorded == pytest.approx(logged, rel=1e-5)
    for a, b in zip(plain.model.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_resumed_trainer_numbers_events_with_its_global_step(tmp_path: Path) -> None:
    """Regression (issue 17 item 3): after ``resume_from_checkpoint`` the guard counted from 0."""
    first = make_trainer(tmp_path, tiny_gpt2(), None, save_strategy="steps", save_steps=5, max_steps=5)
    first.train()
    resumed = make_trainer(tmp_path, tiny_gpt2(), bad_item=BAD_STEP * BATCH + 1, max_steps=BAD_STEP + 2)
    resumed.add_callback(NanguardCallback(out_dir=tmp_path / "ng", console=False, report=False))
    resumed.train(resume_from_checkpoint=str(tmp_path / "hf" / "checkpoint-5"))
    events = read_events(tmp_path / "ng")
    assert [(e["step"], e["trigger"]) for e in events] == [(BAD_STEP, "nonfinite_loss")]
    rows = (tmp_path / "ng" / "history.csv").read_text().splitlines()[1:]
    assert int(rows[0].split(",")[0]) == 5


def test_nan_in_the_middle_micro_batch_of_three_is_skipped_as_one_step(tmp_path: Path) -> None:
    """Issue 17 item 5: gradient accumulation 3, the NaN in the 2nd micro-batch of optimizer step 3."""
    model = tiny_gpt2()
    bad_item = (3 * 3 + 1) * BATCH + 2  # micro-batch 10 = step 3, micro-batch 1 of 0..2
    trainer = make_trainer(tmp_path, model, bad_item=bad_item, gradient_accumulation_steps=3, max_steps=6)
    trainer.add_callback(NanguardCallback(out_dir=tmp_path / "ng", console=False, report=False))
    trainer.train()
    events = read_events(tmp_path / "ng")
    assert [(e["step"], e["trigger"], e["action"]) for e in events] == [(3, "nonfinite_loss", "skip")]
    assert events[0]["diagnosis"]["cause"] == "input_nonfinite"
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
