"""``nanguard events DIR``: the events of a run, one readable block each, or JSON lines."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nanguard.errors import UsageError
from nanguard.events import CAUSES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="DIR", help="run directory holding events.jsonl")
    parser.add_argument("--json", action="store_true", help="print the matching events as JSON lines")
    parser.add_argument("--cause", metavar="C", help=f"only events with this diagnosis cause ({', '.join(CAUSES)})")
    parser.add_argument("--step", metavar="N", type=int, help="only events at this step")


def main(args: argparse.Namespace) -> int:
    from nanguard.report.load import EVENTS_FILE, load_events
    from nanguard.report.text import event_block

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"run directory {str(run_dir)!r} does not exist; pass the --out folder of a guarded run")
    events_path = run_dir / EVENTS_FILE
    if not events_path.is_file():
        raise UsageError(f"{run_dir} has no {EVENTS_FILE}; pass the --out folder of a guarded run")
    if args.cause is not None and args.cause not in CAUSES:
        raise UsageError(f"--cause {args.cause!r} is not a known cause; use one of {', '.join(CAUSES)}")
    events = [
        event for event in load_events(events_path)
        if (args.cause is None or event.cause == args.cause) and (args.step is None or event.step == args.step)
    ]
    if args.json:
        for event in events:
            print(json.dumps(dict(event.raw), default=str))
        return 0
    if not events:
        print("no events" + (" match" if args.cause or args.step is not None else ""), file=sys.stderr)
        return 0
    print("\n\n".join(event_block(event.raw, max_evidence=None, max_fixes=None) for event in events))
    return 0
