"""What a person watching the terminal sees while the guard runs.

On a terminal: one status line rewritten in place (at most ``max_rate`` times a second, so printing
never costs the training loop), in colour unless ``NO_COLOR`` is set, and a clear block whenever
something happens. Into a log file or a pipe: plain text, nothing per step unless asked
(``every=N``), the same blocks for events, and a closing line.

An event is explained in full the first time its problem (its signature, :mod:`nanguard.report.signature`)
shows up; a repeat is one line ("step 97: same as step 31, skipped (NaN loss; 12th time)"). After
:data:`REPEAT_LINES` repeats of one problem, skips are counted silently and shown again at 20, 50,
100, 200, 500, ... repeats; a rollback, an LR backoff or an abort is always shown.

The counts in the closing line come from :func:`nanguard.report.counts.derive_counts`, the rule the
report uses, so the terminal and the report never disagree.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from nanguard.report.counts import LastLoss, RunCounts, Tallies, derive_counts, events_phrase
from nanguard.report.signature import Sighting, SignatureTracker
from nanguard.report.text import event_lines, format_number, plural, repeat_line
from nanguard.sinks._rich import is_tty, make_console, styled_text, wants_color

PREFIX = "[nanguard]"
_CLEAR_LINE = "\r\x1b[K"
REPEAT_LINES = 10
ALWAYS_SHOWN = ("rollback", "lr_backoff", "abort")


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


def status_line(row: Mapping[str, Any], events_seen: int = 0, kinds: int = 0) -> str:
    """"[nanguard] step 120 | loss 2.31 | grad 0.87 | lr× 0.5 | skipped 1 | rollbacks 0 | events 3 (2 kinds)"."""
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
        parts.append(f"events {events_seen}" + (f" ({kinds} kinds)" if 1 < kinds < events_seen else ""))
    return " | ".join(parts)


def shown_again(count: int) -> bool:
    """Repeats printed after the first :data:`REPEAT_LINES`: the 20th, 50th, 100th, 200th, 500th, 1000th, ..."""
    if count <= REPEAT_LINES + 1:
        return True
    magnitude = 10 ** int(math.log10(count))
    return count % magnitude == 0 and count // magnitude in (1, 2, 5)


class LiveConsole:
    """The console :class:`~nanguard.records.Sink`.

    ``stream`` defaults to stderr (stdout belongs to the training script). ``tty`` overrides the
    stream's own ``isatty()``; ``every`` prints a plain line every N steps when not on a terminal
    (0, the default, prints none); ``max_rate`` caps in-place updates per second on a terminal;
    ``color`` forces colour on or off (default: on a terminal, unless ``NO_COLOR`` is set).
    """

    def __init__(self, stream: TextIO | None = None, *, every: int = 0, max_rate: float = 5.0,
                 tty: bool | None = None, clock: Callable[[], float] = time.monotonic,
                 color: bool | None = None) -> None:
        if every < 0:
            raise ValueError(f"LiveConsole(every={every}) must be >= 0 (0 = no periodic lines)")
        if max_rate <= 0:
            raise ValueError(f"LiveConsole(max_rate={max_rate}) must be > 0")
        self.stream = stream if stream is not None else sys.stderr
        self.tty = is_tty(self.stream) if tty is None else tty
        self.color = wants_color(self.tty, color)
        self.every = every
        self.min_interval = 1.0 / max_rate
        self._clock = clock
        self._console = make_console(self.stream, tty=self.tty, color=True) if self.color else None
        self._last_draw = -math.inf
        self._status_shown = False
        self._last_row: Mapping[str, Any] | None = None
        self._last_step: int | None = None
        self._last_loss: LastLoss | None = None
        self._tracker = SignatureTracker()
        self._event_actions: Counter[str] = Counter()
        self._row_actions: Counter[str] = Counter()
        self._events = 0
        self._closed = False

    # ------------------------------------------------------------------ writing
    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def _print(self, plain: str, parts: list[tuple[str, str]] | None = None, end: str = "\n") -> None:
        """``plain`` as is, or, in colour, ``parts`` ((text, style kind) pairs that make up the same text)."""
        if self._console is None:
            self._write(plain + end)
            return
        self._console.print(styled_text(parts or [(plain, "")]), end=end)
        self.stream.flush()

    def _clear_status(self) -> None:
        if self._status_shown:
            self._write(_CLEAR_LINE)
            self._status_shown = False

    def _fit(self, line: str) -> str:
        """A wrapped status line cannot be rewritten with "\\r": keep it inside the terminal width."""
        width = shutil.get_terminal_size((120, 24)).columns - 1
        return line if len(line) <= width else line[: max(1, width - 1)] + "…"

    # ------------------------------------------------------------------ the Sink protocol
    def on_step(self, row: dict[str, Any]) -> None:
        self._note_row(row)
        if self.tty:
            now = self._clock()
            if now - self._last_draw >= self.min_interval:
                self._last_draw = now
                self._write(_CLEAR_LINE)
                line = self._fit(status_line(row, self._events, self._tracker.groups))
                self._print(line, [(PREFIX, "prefix"), (line[len(PREFIX):], "")], end="")
                self._status_shown = True
            return
        step = _count(row.get("step"))
        if self.every and step is not None and step % self.every == 0:
            self._print(status_line(row, self._events, self._tracker.groups))

    def on_event(self, event: dict[str, Any]) -> None:
        self._events += 1
        action = str(event.get("action", "none"))
        self._event_actions[action] += 1
        step = _count(event.get("step"))
        if step is not None:
            self._last_step = step if self._last_step is None else max(self._last_step, step)
        sighting = self._tracker.see(event)
        if sighting.is_first:
            self._clear_status()
            self._print_block(event)
        elif action in ALWAYS_SHOWN or shown_again(sighting.count):
            self._clear_status()
            self._print_repeat(event, sighting)
        self._last_draw = -math.inf  # redraw the status line on the next step, whatever the throttle says

    def close(self, summary: dict[str, Any] | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        self._clear_status()
        line = self.closing_line(summary)
        self._print(line, [(PREFIX, "prefix"), (line[len(PREFIX):], "head")])

    # ------------------------------------------------------------------ pieces
    def _note_row(self, row: Mapping[str, Any]) -> None:
        self._last_row = row
        step = _count(row.get("step"))
        if step is not None:
            self._last_step = step if self._last_step is None else max(self._last_step, step)
            loss = _number(row.get("loss"))
            if loss is not None:
                self._last_loss = LastLoss(step, loss)
        action = str(row.get("action") or "none")
        if action != "none":
            self._row_actions[action] += 1

    def _print_block(self, event: Mapping[str, Any]) -> None:
        lines = event_lines(event)
        plain = "\n".join(text if kind == "head" else f"  {kind}: {text}" for kind, text in lines)
        parts: list[tuple[str, str]] = []
        for number, (kind, text) in enumerate(lines):
            if number:
                parts += [("\n  ", ""), (f"{kind}: ", "label"), (text, kind)]
            else:
                parts += [(PREFIX, "prefix"), (text[len(PREFIX):], str(event.get("action", "head")))]
        self._print(plain, parts)

    def _print_repeat(self, event: Mapping[str, Any], sighting: Sighting) -> None:
        line = repeat_line(event, sighting.first_step, sighting.count)
        if sighting.count == REPEAT_LINES + 1 and str(event.get("action")) not in ALWAYS_SHOWN:
            line += f"; further repeats of step {sighting.first_step}'s problem are counted, shown at 20, 50, 100, ..."
        self._print(line, [(PREFIX, "prefix"), (line[len(PREFIX):], str(event.get("action", "none")))])

    def counts(self, summary: Mapping[str, Any] | None = None) -> RunCounts:
        """What the closing line says, by the report's rule (:func:`~nanguard.report.counts.derive_counts`)."""
        return derive_counts(Tallies(
            events=self._events, event_actions=self._event_actions, signatures=self._tracker.groups,
            history_actions=self._row_actions, last_row=self._last_row, last_step=self._last_step,
            last_loss=self._last_loss, summary=summary,
        ))

    def closing_line(self, summary: Mapping[str, Any] | None = None) -> str:
        """"[nanguard] done: 400 steps; 4 events of 4 kinds (2 skipped, 2 rolled back); ...; report: ..."."""
        summary = summary or {}
        counts = self.counts(summary)
        aborted = counts.aborted > 0 or str(summary.get("status", "")).lower() == "aborted"
        interrupted = str(summary.get("status", "")).lower() == "interrupted"
        head = f"{PREFIX} {'aborted' if aborted else 'interrupted' if interrupted else 'done'}:"
        if not counts.steps and not counts.events:
            line = f"{head} no optimizer step was seen, so nothing was checked"
        else:
            steps = f" {counts.steps} steps;" if counts.steps is not None else ""
            what = events_phrase(counts) if counts.events else "no events (every checked step was finite)"
            line = f"{head}{steps} {what}"
            if counts.updates_not_applied:
                line += f"; {plural(counts.updates_not_applied, 'update')} not applied"
            if counts.clipped:
                line += f"; {counts.clipped} clipped"
            if counts.last_loss is not None:
                line += f"; last training loss {format_number(counts.last_loss.value)} (step {counts.last_loss.step})"
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

