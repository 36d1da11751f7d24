"""TensorBoard sink: scalars per step (finite only) and event text, read back from the event files."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from nanguard.errors import MissingExtraError
from nanguard.events import Diagnosis, Event

pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from nanguard.sinks.tensorboard import TensorBoardSink, finite_scalars


def test_scalars_and_events_round_trip(tmp_path: Path) -> None:
    sink = TensorBoardSink(tmp_path / "tb")
    for step in range(5):
        loss = math.nan if step == 2 else 1.0 / (step + 1)
        sink.on_step({"step": step, "loss": loss, "grad_norm": "inf" if step == 3 else 0.5, "lr": 1e-3,
                      "lr_multiplier": 1.0, "loss_scale": None, "action": "none", "skipped_total": int(step >= 2)})
    event = Event(step=2, trigger="nonfinite_loss", action="skip", loss=math.nan,
                  diagnosis=Diagnosis(cause="invalid_math_domain", phase="loss", module="<head>", op="aten::log",
                                      evidence=["log(0) in the loss"], fixes=["clamp before log"]))
    sink.on_event(event.to_dict())
    sink.on_event({**event.to_dict(), "step": 3})
    sink.close({"steps": 5})
    sink.close()

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = acc.Tags()
    assert set(tags["scalars"]) == {"nanguard/loss", "nanguard/grad_norm", "nanguard/lr", "nanguard/lr_multiplier",
                                    "nanguard/skipped_total", "nanguard/events_total"}
    assert [(s.step, s.value) for s in acc.Scalars("nanguard/events_total")] == [(2, 1.0), (3, 2.0)]
    assert [s.step for s in acc.Scalars("nanguard/loss")] == [0, 1, 3, 4]  # NaN at step 2 left out
    assert [s.step for s in acc.Scalars("nanguard/grad_norm")] == [0, 1, 2, 4]
    assert acc.Scalars("nanguard/skipped_total")[-1].value == 1.0
    text, repeat = acc.Tensors("nanguard/events/text_summary")
    body = text.tensor_proto.string_val[0].decode()
    assert text.step == 2 and repeat.step == 3
    assert repeat.tensor_proto.string_val[0].decode().strip() == (
        "[nanguard] step 3: same as step 2, skipped (NaN loss; 2nd time)")
    assert "step 2: nonfinite_loss -> skip" in body and "module '<head>', op aten::log" in body
    assert all(line.startswith("    ") for line in body.splitlines())  # a literal code block in TensorBoard
    assert "nanguard/summary/text_summary" in tags["tensors"]


def test_finite_scalars_drops_what_cannot_be_plotted() -> None:
    row = {"loss": "nan", "grad_norm": math.inf, "lr": "1e-3", "lr_multiplier": True, "loss_scale": "", "x": 1}
    assert finite_scalars(row) == {"lr": 1e-3}


def test_missing_tensorboard_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'nanguard\[tensorboard\]'"):
        TensorBoardSink(tmp_path / "tb")


def test_a_failing_writer_warns_once_and_never_raises(tmp_path: Path) -> None:
    """A full disk under the event file must not stop training: one warning, then the sink is quiet."""
    sink = TensorBoardSink(tmp_path / "tb")

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    sink._writer.add_scalar = full_disk
    with pytest.warns(RuntimeWarning, match=r"TensorBoard logging stopped after a failed scalar write .*No space left"):
        sink.on_step({"step": 0, "loss": 1.0, "grad_norm": 2.0})
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sink.on_step({"step": 1, "loss": 1.0})
        sink.on_event({"step": 1, "trigger": "loss_spike", "action": "skip", "diagnosis": {}})
        sink.close({})
    assert sink.failed is not None and "scalar write" in sink.failed
