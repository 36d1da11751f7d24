"""Guard scalars and events in TensorBoard, next to the curves people already watch.

Non-finite values are not written: TensorBoard would draw a NaN as a gap at best and rescale the
whole chart around an inf at worst; the event text at that step says what the value was. Events are
text at their step: the first of each problem in full, a repeat as one line ("same as step 31"), and
``nanguard/events`` counts them as a scalar, so they show as steps on a chart next to the loss.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from nanguard._optional import require
from nanguard.report.signature import SignatureTracker
from nanguard.report.text import event_block, repeat_line
from nanguard.sinks._safe import FailSafe

SCALAR_KEYS = (
    "loss",
    "grad_norm",
    "lr",
    "lr_multiplier",
    "loss_scale",
    "skipped_total",
    "rollbacks_total",
    "clipped_total",
)
TAG_PREFIX = "nanguard"


def finite_scalars(row: dict[str, Any]) -> dict[str, float]:
    """The row's scalars that can be plotted: present, numeric and finite."""
    out = {}
    for key in SCALAR_KEYS:
        value = row.get(key)
        if value is None or isinstance(value, bool):
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            out[key] = number
    return out


def _as_markdown_code(text: str) -> str:
    """TensorBoard renders text as Markdown; indenting makes it a literal code block (names stay intact)."""
    return "\n".join("    " + line for line in text.splitlines())


class TensorBoardSink(FailSafe):
    """A :class:`~nanguard.records.Sink` writing ``nanguard/*`` scalars and event text to ``log_dir``."""

    sink_name = "TensorBoard logging"

    def __init__(self, log_dir: str | os.PathLike[str], *, flush_secs: int = 30) -> None:
        require("tensorboard", extra="tensorboard", feature="TensorBoard logging")
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = os.fspath(log_dir)
        self.sink_path = self.log_dir
        self._writer = SummaryWriter(log_dir=self.log_dir, flush_secs=flush_secs)
        self._tracker = SignatureTracker()
        self._events = 0
        self._closed = False

    def on_step(self, row: dict[str, Any]) -> None:
        step = row.get("step")
        if step is None:
            return
        for key, value in finite_scalars(row).items():
            self._safely("scalar write", self._writer.add_scalar, f"{TAG_PREFIX}/{key}", value, int(step))

    def on_event(self, event: dict[str, Any]) -> None:
        step = int(event.get("step", 0))
        sighting = self._tracker.see(event)
        self._events += 1
        text = (event_block(event, max_evidence=None, max_fixes=None) if sighting.is_first
                else repeat_line(event, sighting.first_step, sighting.count))
        self._safely("event write", self._writer.add_text, f"{TAG_PREFIX}/events", _as_markdown_code(text), step)
        self._safely("event write", self._writer.add_scalar, f"{TAG_PREFIX}/events_total", float(self._events), step)
        self._safely("flush", self._writer.flush)

    def close(self, summary: dict[str, Any] | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        if summary:
            self._safely("summary write", self._writer.add_text, f"{TAG_PREFIX}/summary",
                         _as_markdown_code(json.dumps(summary, indent=2, default=str)), 0)
        self._safely("close", self._writer.close)
