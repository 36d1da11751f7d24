"""``nanguard report DIR``: render the HTML and/or Markdown report of a run directory."""

from __future__ import annotations

import argparse
import sys
import webbrowser

from nanguard._optional import is_available


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="DIR", help="run directory holding events.jsonl and/or history.csv")
    parser.add_argument("--out", metavar="FILE", help="report file to write (default: DIR/report.html, DIR/report.md)")
    parser.add_argument("--format", choices=("html", "md", "both"), default="both",
                        help="which report to write (default: both)")
    parser.add_argument("--open", action="store_true", help="open the report in a web browser")


def main(args: argparse.Namespace) -> int:
    from nanguard.report.render import write_reports

    paths = write_reports(args.run_dir, args.out, args.format)
    for path in paths:
        print(path)
    if not is_available("matplotlib"):
        print("nanguard report: note: no plots, matplotlib is missing: pip install 'nanguard[report]'", file=sys.stderr)
    if args.open:
        webbrowser.open(paths[0].resolve().as_uri())
    return 0
