"""``nanguard events DIR``: the events of a run, readably, grouped by problem, or as JSON lines.

By default each problem (signature) is explained in full at its first event and every repeat is one
line, the way the live console printed them. ``--short`` is one line per event (a table), ``--full``
every event in full, ``--json`` the records themselves.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from nanguard.errors import UsageError
from nanguard.events import CAUSES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="DIR", help="run directory holding events.jsonl")
    style = parser.add_mutually_exclusive_group()
    style.add_argument("--short", action="store_true", help="one line per event (a table)")
    style.add_argument("--full", action="store_true", help="every event in full, repeats included")
    style.add_argument("--json", action="store_true", help="print the matching events as JSON lines")
    parser.add_argument("--cause", metavar="C", help=f"only events with this diagnosis cause ({', '.join(CAUSES)})")
    parser.add_argument("--step", metavar="N", type=int, help="only events at this step (shown in full)")
    parser.add_argument("--problem", metavar="LETTER",
                        help="only events of this problem (the letters of the report's cards: A, B, ...)")


def _load(args: argparse.Namespace) -> tuple[list[Any], dict[int, Any]]:
    """The matching events and, for every event of the run, its group (grouping sees the whole run)."""
    from nanguard.report.load import EVENTS_FILE, load_events
    from nanguard.report.signature import group_events, group_of_index

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"run directory {str(run_dir)!r} does not exist; pass the --out folder of a guarded run")
    events_path = run_dir / EVENTS_FILE
    if not events_path.is_file():
        raise UsageError(f"{run_dir} has no {EVENTS_FILE}; pass the --out folder of a guarded run")
    if args.cause is not None and args.cause not in CAUSES:
        raise UsageError(f"--cause {args.cause!r} is not a known cause; use one of {', '.join(CAUSES)}")
    events = load_events(events_path)
    groups = group_events(events)
    if args.problem is not None and args.problem.upper() not in {group.label for group in groups}:
        letters = ", ".join(group.label for group in groups) or "none: the run has no events"
        raise UsageError(f"--problem {args.problem!r} is not a problem of this run; its problems are {letters}")
    group_of = group_of_index(groups)
    chosen = [
        index for index, event in enumerate(events, start=1)
        if (args.cause is None or event.cause == args.cause) and (args.step is None or event.step == args.step)
        and (args.problem is None or group_of[index].label == args.problem.upper())
    ]
    return [(index, events[index - 1]) for index in chosen], group_of


def _short_table(chosen: Sequence[tuple[int, Any]], group_of: dict[int, Any], stream: TextIO) -> None:
    """One row per event; plain columns when piped (grep-able), a rule under the header on a terminal."""
    from rich import box
    from rich.table import Table

    from nanguard.report.text import action_phrase, cause_phrase, trigger_phrase, where_phrase
    from nanguard.sinks._rich import is_tty, make_console, wants_color

    tty = is_tty(stream)
    table = Table(box=box.SIMPLE_HEAD if tty else None, show_edge=False, pad_edge=False, header_style="bold")
    for column, justify in (("step", "right"), ("problem", "left"), ("what", "left"), ("action", "left"),
                            ("cause", "left"), ("where", "left")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for index, event in chosen:
        group = group_of[index]
        problem = group.label if group.first is event else f"{group.label}, same as step {group.first.step}"
        table.add_row(str(event.step), problem, trigger_phrase(event.trigger, event.loss, event.grad_norm),
                      action_phrase(event.action), f"{event.cause}: {cause_phrase(event.cause)}" if tty else event.cause,
                      where_phrase(event.raw.get("diagnosis") or {}) or "—")
    if tty:
        make_console(stream, tty=True, color=wants_color(True)).print(table)
        return
    buffer = io.StringIO()
    make_console(buffer, tty=False, color=False, width=100_000).print(table)
    stream.write("\n".join(line.rstrip() for line in buffer.getvalue().splitlines()) + "\n")


def _grouped(chosen: Sequence[tuple[int, Any]], group_of: dict[int, Any], full: bool) -> str:
    """Full blocks set apart by a blank line; a run of repeats stays one line each."""
    from nanguard.report.text import event_block, repeat_line

    items: list[tuple[str, bool]] = []
    for index, event in chosen:
        group = group_of[index]
        if full or group.first is event:
            items.append((event_block(event.raw, max_evidence=None, max_fixes=None), True))
        else:
            items.append((repeat_line(event.raw, group.first.step, group.indices.index(index) + 1), False))
    parts = []
    for position, (text, is_full) in enumerate(items):
        if position:
            parts.append("\n\n" if is_full or items[position - 1][1] else "\n")
        parts.append(text)
    return "".join(parts)


def main(args: argparse.Namespace) -> int:
    chosen, group_of = _load(args)
    if args.json:
        for _, event in chosen:
            print(json.dumps(dict(event.raw), default=str))
        return 0
    if not chosen:
        filtered = args.cause or args.step is not None or args.problem
        print("no events" + (" match" if filtered else ""), file=sys.stderr)
        return 0
    if args.short:
        _short_table(chosen, group_of, sys.stdout)
        return 0
    print(_grouped(chosen, group_of, full=args.full or args.step is not None))
    return 0
