"""What a person watching the terminal sees while the guard runs.

On a terminal: one status line rewritten in place (at most ``max_rate`` times a second, so printing
never costs the training loop), and a clear block whenever something happens. Into a log file or a
pipe: nothing per step unless asked (``every=N``), the same blocks for events, and a closing line.
Both are :class:`~nanguard.record.Sink` implementations.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from nanguard.report.text import action_phrase, event_block, format_number

PREFIX = "[nanguard]"
_CLEAR_LINE = "\r\x1b[K"


def _number(value: Any) -> float | None:
    """History rows carry floats, or strings such as "nan" when they were read back from CSV."""
    if value is None or value == "" or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _count(value: Any) -> int | None:
    number = _number(value)
    return int(number) if number is not None and math.isfinite(number) else None


def status_line(row: Mapping[str, Any], events_seen: int = 0) -> str:
    """"[nanguard] step 120 | loss 2.31 | grad 0.87 | lr× 0.5 | skipped 1 | rollbacks 0"."""
    parts = [f"{PREFIX} step {row.get('step', '?')}",
             f"loss {format_number(_number(row.get('loss')))}",
             f"grad {format_number(_number(row.get('grad_norm')))}"]
    multiplier = _number(row.get("lr_multiplier"))
    if multiplier is not None:
        parts.append(f"lr× {format_number(multiplier)}")
    parts.append(f"skipped {_count(row.get('skipped_total')) or 0}")
    parts.append(f"rollbacks {_count(row.get('rollbacks_total')) or 0}")
    clipped = _count(row.get("clipped_total"))
    if clipped:
        parts.append(f"clipped {clipped}")
    if events_seen:
        parts.append(f"events {events_seen}")
    return " | ".join(parts)


def _is_tty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class LiveConsole:
    """The console :class:`~nanguard.record.Sink`.

    ``stream`` defaults to stderr (stdout belongs to the training script). ``tty`` overrides the
    stream's own ``isatty()``; ``every`` prints a plain line every N steps when not on a terminal
    (0, the default, prints none); ``max_rate`` caps in-place updates per second on a terminal.
    """

    def __init__(self, stream: TextIO | None = None, *, every: int = 0, max_rate: float = 5.0,
                 tty: bool | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        if every < 0:
            raise ValueError(f"LiveConsole(every={every}) must be >= 0 (0 = no periodic lines)")
        if max_rate <= 0:
            raise ValueError(f"LiveConsole(max_rate={max_rate}) must be > 0")
        self.stream = stream if stream is not None else sys.stderr
        self.tty = _is_tty(self.stream) if tty is None else tty
        self.every = every
        self.min_interval = 1.0 / max_rate
        self._clock = clock
        self._last_draw = -math.inf
        self._status_shown = False
        self._last_row: Mapping[str, Any] | None = None
        self._actions: Counter[str] = Counter()
        self._events = 0
        self._closed = False

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def _clear_status(self) -> None:
        if self._status_shown:
            self._write(_CLEAR_LINE)
            self._status_shown = False

    def _fit(self, line: str) -> str:
        """A wrapped status line cannot be rewritten with "\\r": keep it inside the terminal width."""
        width = shutil.get_terminal_size((120, 24)).columns - 1
        return line if len(line) <= width else line[: max(1, width - 1)] + "…"

    def on_step(self, row: dict[str, Any]) -> None:
        self._last_row = row
        if self.tty:
            now = self._clock()
            if now - self._last_draw >= self.min_interval:
                self._last_draw = now
                self._write(_CLEAR_LINE + self._fit(status_line(row, self._events)))
                self._status_shown = True
            return
        step = _count(row.get("step"))
        if self.every and step is not None and step % self.every == 0:
            self._write(status_line(row, self._events) + "\n")

    def on_event(self, event: dict[str, Any]) -> None:
        self._events += 1
        self._actions[str(event.get("action", "none"))] += 1
        self._clear_status()
        self._write(event_block(event) + "\n")
        self._last_draw = -math.inf  # redraw the status line on the next step, whatever the throttle says

    def close(self, summary: dict[str, Any] | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        self._clear_status()
        self._write(self.closing_line(summary) + "\n")

    def closing_line(self, summary: Mapping[str, Any] | None = None) -> str:
        """"[nanguard] done: 400 steps, 3 events (1 skipped, 1 rolled back); final loss 1.81; report: ..."."""
        summary = summary or {}
        last = self._last_row or {}
        last_step = _count(last.get("step"))
        steps = _count(summary.get("steps"))
        if steps is None and last_step is not None:
            steps = last_step + 1
        aborted = summary.get("aborted") is True or self._actions.get("abort", 0) > 0
        parts = [f"{PREFIX} {'aborted' if aborted else 'done'}:"]
        head = f"{steps} steps, " if steps is not None else ""
        if self._events:
            actions = ", ".join(f"{n} {action_phrase(a)}" for a, n in self._actions.items() if a != "none")
            head += f"{self._events} event{'s' if self._events != 1 else ''}" + (f" ({actions})" if actions else "")
        else:
            head += "no events, every step finite"
        parts.append(head)
        loss = _number(last.get("loss"))
        line = " ".join(parts)
        if loss is not None:
            line += f"; final loss {format_number(loss)}"
        for key in ("report", "out_dir"):
            if summary.get(key):
                line += f"; {key.replace('_', ' ')}: {summary[key]}"
                break
        return line


class NullConsole:
    """Prints nothing: for ``quiet`` runs and for ranks other than 0."""

    def on_step(self, row: dict[str, Any]) -> None:
        pass

    def on_event(self, event: dict[str, Any]) -> None:
        pass

    def close(self, summary: dict[str, Any] | None = None) -> None:
        pass
