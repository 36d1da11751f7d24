"""Accelerate: prepared model/optimizer/scheduler, gradient accumulation, bf16 autocast on CPU, clip_grad_norm_."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

accelerate = pytest.importorskip("accelerate")

from nanguard.integrations.accelerate import guard_accelerator  # noqa: E402
from tests.conftest import read_events  # noqa: E402

MICRO = 2
REAL_STEPS = 10
BATCH = 8
BAD_STEP = 4


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def loader(bad_micro_batch: int | None) -> torch.utils.data.DataLoader:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(REAL_STEPS * MICRO * BATCH, 8, generator=gen)
    y = x[:, :4].argmax(1)
    if bad_micro_batch is not None:
        x[bad_micro_batch * BATCH + 3, 0] = float("inf")
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)


def history(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "history.csv").open() as fh:
        return list(csv.DictReader(fh))


def test_accumulation_bf16_skip_holds_scheduler_and_counts_real_steps(tmp_path: Path) -> None:
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=MICRO, mixed_precision="bf16")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.9 ** s)
    bad_micro = BAD_STEP * MICRO + 1
    model_p, optimizer_p, loader_p, scheduler_p = accelerator.prepare(model, optimizer, loader(bad_micro), scheduler)

    guard = guard_accelerator(accelerator, model_p, optimizer_p, scheduler=scheduler_p, out_dir=tmp_path / "run",
                              console=False, report=False)
    assert guard.optimizer is optimizer and guard.models == [model]
    micro_losses: list[float] = []
    clip_norms: list[float] = []
    skipped_flags: list[bool] = []
    with guard:
        for x, y in loader_p:
            with accelerator.accumulate(model_p):
                loss = F.cross_entropy(model_p(x), y)
                micro_losses.append(float(loss.detach()))
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    clip_norms.append(float(accelerator.clip_grad_norm_(model_p.parameters(), 100.0)))
                optimizer_p.step()
                scheduler_p.step()
                optimizer_p.zero_grad()
                if accelerator.sync_gradients:
                    skipped_flags.append(accelerator.optimizer_step_was_skipped)

    rows = history(tmp_path / "run")
    assert [int(r["step"]) for r in rows] == list(range(REAL_STEPS))  # real optimizer steps, not micro-steps
    events = read_events(tmp_path / "run")
    assert [(e["step"], e["trigger"], e["action"]) for e in events] == [(BAD_STEP, "nonfinite_loss", "skip")]
    assert events[0]["diagnosis"]["cause"] == "input_nonfinite"
    assert skipped_flags == [step == BAD_STEP for step in range(REAL_STEPS)]
    assert scheduler.last_epoch == REAL_STEPS - 1  # one scheduler step held back
    for step, row in enumerate(rows):
        accumulated = sum(micro_losses[step * MICRO:(step + 1) * MICRO]) / MICRO
        if step != BAD_STEP:
            assert float(row["loss"]) == pytest.approx(accumulated, rel=1e-5)
            assert float(row["grad_norm"]) == pytest.approx(clip_norms[step], rel=1e-5)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    # Closing the guard took the patches out again.
    assert not hasattr(optimizer_p.step, "_nanguard") and not hasattr(accelerator.clip_grad_norm_, "_nanguard")


def test_unprepared_scheduler_is_held_by_the_guard(tmp_path: Path) -> None:
    accelerator = accelerate.Accelerator(cpu=True)
    torch.manual_seed(0)
    model = nn.Linear(8, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    model_p, optimizer_p, loader_p = accelerator.prepare(model, optimizer, loader(bad_micro_batch=3))
    with guard_accelerator(accelerator, model_p, optimizer_p, scheduler=scheduler, out_dir=tmp_path / "run",
                           console=False, report=False):
        for step, (x, y) in enumerate(loader_p):
            if step == 6:
                break
            accelerator.backward(F.cross_entropy(model_p(x), y))
            optimizer_p.step()
            scheduler.step()
            optimizer_p.zero_grad()
    assert [e["step"] for e in read_events(tmp_path / "run")] == [3]
    assert scheduler.last_epoch == 5


def _prepared(bad_micro_batch: int | None = None, **accelerator_args):
    accelerator = accelerate.Accelerator(cpu=True, **accelerator_args)
    torch.manual_seed(0)
    model = nn.Linear(8, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return (accelerator, model, *accelerator.prepare(model, optimizer, loader(bad_micro_batch)))


def test_a_crash_without_with_is_recorded_through_the_excepthook(tmp_path: Path) -> None:
    """Regression (issue 17 item 4): ``guard = guard_accelerator(...)`` (no ``with``, no close) left only history.csv."""
    import json
    import sys

    accelerator, _, model_p, optimizer_p, loader_p = _prepared()
    guard = guard_accelerator(accelerator, model_p, optimizer_p, out_dir=tmp_path / "run", console=False, report=False)
    try:
        for step, (x, y) in enumerate(loader_p):
            if step == 3:
                y = y + 10  # a label past the 4 classes: IndexError in the loss
            accelerator.backward(F.cross_entropy(model_p(x), y))
            optimizer_p.step()
            optimizer_p.zero_grad()
    except IndexError as exc:
        sys.excepthook(type(exc), exc, exc.__traceback__)  # what the interpreter does with it
    (event,) = read_events(tmp_path / "run")
    assert (event["step"], event["trigger"], event["diagnosis"]["cause"]) == (3, "exception", "label_out_of_range")
    assert guard.closed and json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "error"


def test_a_crash_under_try_finally_close_is_recorded(tmp_path: Path) -> None:
    """``try: ... finally: guard.close()``: close() sees the exception on its way out and records it."""
    accelerator, _, model_p, optimizer_p, loader_p = _prepared()
    guard = guard_accelerator(accelerator, model_p, optimizer_p, out_dir=tmp_path / "run", console=False, report=False)
    with pytest.raises(IndexError):
        try:
            for step, (x, y) in enumerate(loader_p):
                accelerator.backward(F.cross_entropy(model_p(x), y + (10 if step == 2 else 0)))
                optimizer_p.step()
                optimizer_p.zero_grad()
        finally:
            guard.close()
    (event,) = read_events(tmp_path / "run")
    assert (event["step"], event["trigger"]) == (2, "exception")


def test_guard_state_travels_with_save_state_and_load_state(tmp_path: Path) -> None:
    """Issue 17 item 3: ``accelerator.register_for_checkpointing(guard)`` puts the guard's counters in
    ``save_state``; after ``load_state`` the step numbers go on from where the checkpoint was."""
    accelerator, _, model_p, optimizer_p, loader_p = _prepared()
    with guard_accelerator(accelerator, model_p, optimizer_p, out_dir=tmp_path / "first", console=False,
                           report=False) as guard:
        accelerator.register_for_checkpointing(guard)
        for step, (x, y) in enumerate(loader_p):
            if step == 5:
                break
            accelerator.backward(F.cross_entropy(model_p(x), y))
            optimizer_p.step()
            optimizer_p.zero_grad()
        accelerator.save_state(str(tmp_path / "ckpt"))
    AcceleratorState = __import__("accelerate.state", fromlist=["AcceleratorState"]).AcceleratorState
    AcceleratorState._reset_state(True)
    accelerator, _, model_p, optimizer_p, loader_p = _prepared(bad_micro_batch=7)
    with guard_accelerator(accelerator, model_p, optimizer_p, out_dir=tmp_path / "second", console=False,
                           report=False, history_every=1) as guard:
        accelerator.register_for_checkpointing(guard)
        accelerator.load_state(str(tmp_path / "ckpt"))
        for x, y in accelerator.skip_first_batches(loader_p, 5):
            accelerator.backward(F.cross_entropy(model_p(x), y))
            optimizer_p.step()
            optimizer_p.zero_grad()
    assert int(history(tmp_path / "second")[0]["step"]) == 5
    assert [e["step"] for e in read_events(tmp_path / "second")] == [7]


def test_accelerate_clip_grad_norm_is_not_doubled_and_healthy_run_is_bit_identical(tmp_path: Path) -> None:
    """Issue 17 item 5: the guard reads the pre-clip norm of ``accelerator.clip_grad_norm_`` and clips nothing more."""
    def train(guarded: bool) -> tuple[torch.Tensor, list[float]]:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(True)
        accelerator, model, model_p, optimizer_p, loader_p = _prepared()
        norms: list[float] = []
        guard = guard_accelerator(accelerator, model_p, optimizer_p, out_dir=tmp_path / "run", console=False,
                                  report=False) if guarded else None
        for x, y in loader_p:
            accelerator.backward(F.cross_entropy(model_p(x), y) * 50)
            norms.append(float(accelerator.clip_grad_norm_(model_p.parameters(), 0.5)))
            optimizer_p.step()
            optimizer_p.zero_grad()
        if guard is not None:
            guard.close()
        return torch.cat([p.detach().flatten() for p in model.parameters()]), norms

    plain, plain_norms = train(False)
    assert len(plain_norms) == REAL_STEPS * MICRO
    guarded, norms = train(True)
    assert torch.equal(plain, guarded)
    assert min(norms) > 0.5  # every step was clipped by the script
    assert [float(r["grad_norm"]) for r in history(tmp_path / "run")] == pytest.approx(norms, rel=1e-5)
    assert not (tmp_path / "run" / "events.jsonl").exists() or read_events(tmp_path / "run") == []


class TinyClassifier(nn.Module):
    """``model(input_ids=..., labels=...)`` as a transformers sequence classifier is called."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(16, 8), nn.Linear(8, 2)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.head(self.embed(input_ids).mean(1)), labels)


def test_a_label_out_of_range_is_named_labels_not_input_ids(tmp_path: Path) -> None:
    """Regression (real-code accel_ga): the bad label value 5 also occurs among the token ids, and the
    diagnosis named ``input_ids`` as the field holding it."""
    accelerator = accelerate.Accelerator(cpu=True)
    torch.manual_seed(0)
    model = TinyClassifier()
    model_p, optimizer_p = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(IndexError), guard_accelerator(accelerator, model_p, optimizer_p, out_dir=tmp_path / "run",
                                                      console=False, report=False):
        for step in range(3):
            input_ids = torch.arange(12).reshape(3, 4)  # holds 5
            labels = torch.tensor([0, 5 if step == 2 else 1, 1])
            accelerator.backward(model_p(input_ids=input_ids, labels=labels))
            optimizer_p.step()
            optimizer_p.zero_grad()
    (event,) = read_events(tmp_path / "run")
    assert (event["step"], event["trigger"], event["diagnosis"]["cause"]) == (2, "exception", "label_out_of_range")
    assert event["diagnosis"]["tensor"] == "labels"


UNCLOSED = """
import sys, torch, accelerate, torch.nn.functional as F
from nanguard.integrations.accelerate import guard_accelerator
accelerator = accelerate.Accelerator(cpu=True)
torch.manual_seed(0)
model = torch.nn.Linear(8, 4)
model_p, optimizer_p = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
guard = guard_accelerator(accelerator, model_p, optimizer_p, out_dir=sys.argv[1], console=False, report=False)
for step in range(4):
    x = torch.randn(8, 8)
    y = x[:, :4].argmax(1) + (10 if step == int(sys.argv[2]) else 0)
    accelerator.backward(F.cross_entropy(model_p(x), y))
    optimizer_p.step()
    optimizer_p.zero_grad()
"""


@pytest.mark.parametrize("crash_step", [2, -1], ids=["uncaught-raise", "no-close-at-all"])
def test_a_guard_nobody_closes_still_writes_its_records(tmp_path: Path, crash_step: int) -> None:
    """The interpreter itself: an uncaught raise goes through nanguard's ``sys.excepthook`` (event, then the
    user's traceback and exit status 1); a script that never calls ``close()`` gets its summary at exit."""
    import json
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(repo / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", UNCLOSED, str(tmp_path / "run"), str(crash_step)], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    if crash_step < 0:
        assert done.returncode == 0, done.stderr[-2000:]
        assert summary["status"] == "finished" and summary["steps"] == 4
        return
    assert done.returncode == 1 and "IndexError" in done.stderr  # the user's traceback, unchanged
    (event,) = read_events(tmp_path / "run")
    assert (event["step"], event["trigger"], event["diagnosis"]["cause"]) == (2, "exception", "label_out_of_range")
    assert summary["status"] == "error"
