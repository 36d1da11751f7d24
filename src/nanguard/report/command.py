"""``nanguard report DIR``: render the HTML and/or Markdown report of a run directory."""

from __future__ import annotations

import argparse
import sys
import webbrowser

from nanguard._optional import is_available
from nanguard.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="DIR", help="run directory holding events.jsonl and/or history.csv")
    parser.add_argument("--out", metavar="FILE", help="report file to write (default: DIR/report.html, DIR/report.md)")
    parser.add_argument("--format", choices=("html", "md", "both"), default="both",
                        help="which report to write (default: both)")
    parser.add_argument("--open", action="store_true", help="open the report in a web browser")


def main(args: argparse.Namespace) -> int:
    from nanguard.report.render import write_reports

    try:
        paths = write_reports(args.run_dir, args.out, args.format)
    except OSError as exc:  # --out in a missing or read-only folder, a full disk: one line, exit status 2
        target = args.out or f"{args.run_dir}/report.*"
        raise UsageError(f"could not write the report {target} ({exc.strerror or exc}): "
                         "pass --out FILE in a folder you can write to") from exc
    for path in paths:
        print(path)
    if not is_available("matplotlib"):
        print("nanguard report: note: no plots, matplotlib is missing: pip install 'nanguard[report]'", file=sys.stderr)
    if args.open:
        webbrowser.open(paths[0].resolve().as_uri())
    return 0
