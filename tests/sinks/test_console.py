"""The live console on a terminal (in-place, throttled, in colour) and in a log file (quiet, plain lines)."""

from __future__ import annotations

import io
import math

import pytest

from nanguard.events import Diagnosis, Event
from nanguard.sinks.console import REPEAT_LINES, LiveConsole, NullConsole, shown_again, status_line


class FakeStream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def row(step: int, loss: float = 2.0, **extra) -> dict:
    return {"step": step, "loss": loss, "grad_norm": 0.5, "lr_multiplier": 1.0, "skipped_total": 0,
            "rollbacks_total": 0, "clipped_total": 0, **extra}


EVENT = Event(step=7, trigger="nonfinite_loss", action="skip", loss=math.nan,
              diagnosis=Diagnosis(cause="input_nonfinite", phase="data", tensor="x", confidence=0.95,
                                  evidence=["batch field 'x' holds 3 NaN"], fixes=["drop the bad rows"]))


def test_non_tty_is_quiet_without_events() -> None:
    stream = FakeStream(tty=False)
    console = LiveConsole(stream)
    for step in range(100):
        console.on_step(row(step))
    assert stream.getvalue() == ""
    console.close()
    assert stream.getvalue() == ("[nanguard] done: 100 steps; no events (every checked step was finite); "
                                 "last training loss 2 (step 99)\n")


def test_non_tty_periodic_lines_and_event_block() -> None:
    stream = FakeStream(tty=False)
    console = LiveConsole(stream, every=5)
    for step in range(11):
        console.on_step(row(step, skipped_total=1 if step >= 7 else 0))
        if step == 7:
            console.on_event(EVENT.to_dict())
    console.close({"report": "runs/x/report.html"})
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and "\x1b" not in stream.getvalue()
    assert lines[0] == "[nanguard] step 0 | loss 2 | grad 0.5 | lr× 1 | skipped 0 | rollbacks 0"
    assert lines[1].startswith("[nanguard] step 5 |")
    assert lines[2] == "[nanguard] step 7: nonfinite_loss -> skip (loss=NaN)"
    assert lines[3] == "  cause: input_nonfinite in data; tensor 'x' (confidence 0.95)"
    assert lines[4:6] == ["  evidence: batch field 'x' holds 3 NaN", "  fix: drop the bad rows"]
    assert lines[6] == "[nanguard] step 10 | loss 2 | grad 0.5 | lr× 1 | skipped 1 | rollbacks 0 | events 1"
    assert lines[7] == ("[nanguard] done: 11 steps; 1 event (1 skipped); 1 update not applied; "
                        "last training loss 2 (step 10); report: runs/x/report.html")
    assert len(lines) == 8


def test_tty_updates_in_place_and_throttles() -> None:
    stream, clock = FakeStream(tty=True), FakeClock()
    console = LiveConsole(stream, clock=clock, max_rate=5, color=False)
    for step in range(50):  # 50 steps in 0.49 s: at most 3 redraws at 5 per second
        clock.now = step * 0.01
        console.on_step(row(step))
    text = stream.getvalue()
    assert "\n" not in text
    draws = text.split("\r\x1b[K")[1:]
    assert [d.split(" |")[0] for d in draws] == ["[nanguard] step 0", "[nanguard] step 20", "[nanguard] step 40"]


def test_tty_event_clears_the_status_line_and_forces_a_redraw() -> None:
    stream, clock = FakeStream(tty=True), FakeClock()
    console = LiveConsole(stream, clock=clock, color=False)
    console.on_step(row(0))
    console.on_event(EVENT.to_dict())
    console.on_step(row(1))  # same instant: the throttle would skip it, but an event forces a redraw
    console.close()
    text = stream.getvalue()
    status, rest = text.split("\r\x1b[K[nanguard] step 7", 1)[0], text.split("[nanguard] step 7", 1)[1]
    assert status.endswith("[nanguard] step 0 | loss 2 | grad 0.5 | lr× 1 | skipped 0 | rollbacks 0")
    assert "\r\x1b[K[nanguard] step 1 |" in rest
    assert text.endswith("\r\x1b[K[nanguard] done: 8 steps; 1 event (1 skipped); 1 update not applied; "
                         "last training loss 2 (step 1)\n")


def test_close_is_idempotent_and_reports_abort() -> None:
    stream = FakeStream(tty=False)
    console = LiveConsole(stream)
    console.on_step(row(3, loss=math.inf))
    console.on_event({"step": 3, "trigger": "nonfinite_loss", "action": "abort", "diagnosis": {}})
    console.close()
    console.close()
    last = stream.getvalue().splitlines()[-1]
    assert last == "[nanguard] aborted: 4 steps; 1 event (1 aborted); last training loss +Inf (step 3)"
    assert stream.getvalue().count("aborted:") == 1


def test_status_line_reads_csv_strings_and_missing_values() -> None:
    line = status_line({"step": "12", "loss": "nan", "grad_norm": "", "skipped_total": "2", "clipped_total": "3"})
    assert line == "[nanguard] step 12 | loss NaN | grad — | skipped 2 | rollbacks 0 | clipped 3"


def test_defaults_to_stderr_and_validates(capsys) -> None:
    console = LiveConsole(tty=False)
    console.on_event(EVENT.to_dict())
    assert capsys.readouterr().err.startswith("[nanguard] step 7")
    with pytest.raises(ValueError, match="every=-1"):
        LiveConsole(every=-1)
    null = NullConsole()
    null.on_step(row(0))
    null.on_event(EVENT.to_dict())
    null.close({})
    assert capsys.readouterr() == ("", "")


def test_root_module_reads_as_words_in_the_event_block() -> None:
    stream = FakeStream(tty=False)
    root = Event(step=3, trigger="nonfinite_loss", action="skip", loss=math.nan,
                 diagnosis=Diagnosis(cause="input_nonfinite", phase="data", module="", tensor="loss_mask"))
    LiveConsole(stream).on_event(root.to_dict())
    cause = stream.getvalue().splitlines()[1]
    assert cause == "  cause: input_nonfinite in data; (root module), tensor 'loss_mask'"
    unlocated = Event(step=4, trigger="loss_spike", action="skip", diagnosis=Diagnosis(cause="unknown", phase="unknown"))
    LiveConsole(stream).on_event(unlocated.to_dict())
    assert stream.getvalue().splitlines()[-1] == "  cause: unknown in unknown"
    indexed = Event(step=5, trigger="nonfinite_loss", action="skip",
                    diagnosis=Diagnosis(cause="invalid_math_domain", phase="forward", module="0", op="aten::log"))
    LiveConsole(stream).on_event(indexed.to_dict())
    assert stream.getvalue().splitlines()[-1] == "  cause: invalid_math_domain in forward; module model[0], op aten::log"


def log_event(step: int, action: str = "skip") -> dict:
    return {"step": step, "trigger": "nonfinite_loss", "action": action, "loss_repr": "nan",
            "diagnosis": {"cause": "invalid_math_domain", "phase": "loss", "module": "head", "op": "aten::log",
                          "evidence": [f"{step} zeros"], "fixes": ["clamp before log"]}}


def test_a_repeat_is_one_line_with_a_running_count() -> None:
    stream = FakeStream(tty=False)
    console = LiveConsole(stream)
    for step in (31, 34, 97):
        console.on_event(log_event(step))
    console.on_event(log_event(99, action="rollback"))
    lines = stream.getvalue().splitlines()
    assert lines[0] == "[nanguard] step 31: nonfinite_loss -> skip (loss=NaN)"
    assert lines[-3:] == ["[nanguard] step 34: same as step 31, skipped (NaN loss; 2nd time)",
                          "[nanguard] step 97: same as step 31, skipped (NaN loss; 3rd time)",
                          "[nanguard] step 99: same as step 31, rolled back (NaN loss; 4th time)"]
    assert stream.getvalue().count("clamp before log") == 1


def test_a_flood_of_repeats_is_counted_and_shown_at_milestones() -> None:
    stream = FakeStream(tty=False)
    console = LiveConsole(stream)
    for step in range(1000):
        console.on_event(log_event(step, action="abort" if step == 640 else "skip"))
    repeats = [line for line in stream.getvalue().splitlines() if "same as step 0" in line]
    counts = [int(line.split("; ")[1].split()[0][:-2]) for line in repeats]
    assert counts == [*range(2, REPEAT_LINES + 2), 20, 50, 100, 200, 500, 641, 1000]
    assert "further repeats of step 0's problem are counted" in repeats[REPEAT_LINES - 1]
    assert "aborted (NaN loss; 641st time)" in repeats[-2]  # an abort is always shown
    assert [n for n in range(1, 3000) if shown_again(n)][-8:] == [11, 20, 50, 100, 200, 500, 1000, 2000]


def test_colour_on_a_terminal_plain_with_no_color(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    stream = FakeStream(tty=True)
    console = LiveConsole(stream)
    console.on_event(log_event(3))
    console.close()
    text = stream.getvalue()
    assert "\x1b[" in text and "clamp before log" in text
    monkeypatch.setenv("NO_COLOR", "1")
    plain = FakeStream(tty=True)
    console = LiveConsole(plain)
    console.on_event(log_event(3))
    console.close()
    assert "\x1b[" not in plain.getvalue().replace("\r\x1b[K", "")
    piped = FakeStream(tty=False)
    monkeypatch.delenv("NO_COLOR")
    LiveConsole(piped).on_event(log_event(3))
    assert "\x1b" not in piped.getvalue()


def test_no_step_means_nothing_was_checked() -> None:
    stream = FakeStream(tty=False)
    console = LiveConsole(stream)
    console.close({"steps": 0})
    assert stream.getvalue() == "[nanguard] done: no optimizer step was seen, so nothing was checked\n"

