"""A record never stops the run it records: a write that fails (``/dev/full`` gives a real ENOSPC) is warned
about once, that sink stops, training goes on, and the summary says what is missing."""

from __future__ import annotations

import errno
import json
import os
import warnings

import pytest
import torch

import nanguard
from nanguard.records import EventLog, HistoryLog
from tests.guard.helpers import make_mlp, train

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")


def _nan_at(bad: int):
    def corrupt(step, x, y):
        return (torch.full_like(x, float("nan")) if step == bad else x), y
    return corrupt


def test_full_disk_under_events_and_history_warns_once_and_training_goes_on(tmp_path):
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sinks = [EventLog("/dev/full"), HistoryLog("/dev/full", flush_every=2)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        guard = nanguard.Guard(model, opt, out_dir=tmp_path, console=False, report=False, sinks=sinks)
        train(model, opt, 12, corrupt=_nan_at(4))
        guard.close()
    stopped = [str(w.message) for w in caught if "stopped after" in str(w.message)]
    assert len(stopped) == 2, stopped  # one per sink, not one per write
    assert all(f"errno {errno.ENOSPC}" in line and "/dev/full" in line for line in stopped)
    assert guard.step_count == 12 and guard.summary()["skipped"] == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["records_incomplete"]) == 2
    assert len((tmp_path / "history.csv").read_text().splitlines()) == 13  # the run's own files are complete


def test_a_callers_sink_that_raises_is_dropped_and_named_in_the_summary(tmp_path):
    class Broken:
        calls = 0

        def on_step(self, row):
            Broken.calls += 1
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")

        def on_event(self, event):
            pass

        def close(self, summary=None):
            pass

    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(RuntimeWarning, match="Broken stopped after a failed history row"):
        guard = nanguard.Guard(model, opt, out_dir=tmp_path, console=False, report=False, sinks=[Broken()])
        train(model, opt, 5)
        guard.close()
    assert Broken.calls == 1
    assert "Broken" in json.loads((tmp_path / "summary.json").read_text())["records_incomplete"][0]


def test_warnings_as_errors_do_not_turn_a_failed_write_into_a_crash(tmp_path, capsys):
    log = EventLog("/dev/full")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        log.on_event({"step": 1})
        log.on_event({"step": 2})
        log.close()
    assert log.failed is not None and "No space left" in capsys.readouterr().err
