"""The ``nanguard`` command line.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``main(args) -> int``;
this file only dispatches, so ``nanguard --help`` stays fast and imports nothing heavy.
Every :class:`NanguardError` becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from nanguard.errors import NanguardError

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "run": ("nanguard.zero_code", "run an unmodified training script under the guard"),
    "demo": ("nanguard.demo", "train a small transformer with injected faults, with and without the guard"),
    "report": ("nanguard.report.command", "render the HTML/Markdown report of a run directory"),
    "events": ("nanguard.report.events_command", "print the events of a run directory"),
    "scan": ("nanguard.scan.command", "check dataset files for NaN/Inf, bad labels and scale problems"),
    "lint": ("nanguard.lint.command", "check a training config for settings that lead to NaN, and fix them"),
}


class _Parser(argparse.ArgumentParser):
    """argparse exits with status 2 on bad usage already; keep its one-line error format."""


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser; only ``command``'s module is imported (to add its arguments)."""
    from nanguard import __version__

    parser = _Parser(prog="nanguard", description="Keep PyTorch training runs finite.")
    parser.add_argument("--version", action="version", version=f"nanguard {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        sub_parser.set_defaults(_module=module_name)
        if name == command:
            importlib.import_module(module_name).add_arguments(sub_parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv[0] if argv and argv[0] in SUBCOMMANDS else None)
    # For `run`, everything after the script path belongs to the script, flags included.
    args = _parse_run(parser, argv) if argv and argv[0] == "run" else parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    module = importlib.import_module(args._module)
    try:
        return int(module.main(args) or 0)
    except NanguardError as exc:
        print(f"nanguard {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nanguard {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `nanguard ... | head`: the reader left; that is not an error
        sys.stderr.close()
        return 0


def _parse_run(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Split ``run [options] SCRIPT [ARGS...]`` at the first positional so script flags pass through."""
    options: list[str] = []
    i = 1
    takes_value = {"--out", "--policy", "--config"}
    while i < len(argv):
        token = argv[i]
        if token == "--":
            i += 1
            break
        if token in takes_value:
            options += argv[i : i + 2]
            i += 2
            continue
        if token.startswith("-"):
            options.append(token)
            i += 1
            continue
        break
    rest = argv[i:]
    args = parser.parse_args(["run", *options, *rest[:1]])
    args.script_args = rest[1:]
    return args


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
