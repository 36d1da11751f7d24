"""``nanguard lint CONFIG [--fix] [--json]``: the command-line front of :mod:`nanguard.lint`.

Exit status: 0 no errors or warnings (questions and notes, severity ``info``, never fail), 1 errors or
warnings (with ``--fix``: the ones the fixed file still has, i.e. that need a manual change), 2
unreadable, malformed or oversized input, missing file, unknown extension, an output path that cannot
be written, or a ``_fixed`` file that already exists without ``--force``.
"""

from __future__ import annotations

import argparse
import sys

from nanguard.errors import UsageError

EPILOG = """\
Formats: YAML, JSON, TOML (torchtitan) and Python configs (nanoGPT's config/*.py, read without
running them). --fix writes NAME_fixed.EXT beside the input (never the input itself); only the changed
values' characters differ, and it lists every value it changed. If that file exists it is left alone
and the command fails, unless --force is given or --output names another path. A '# nanguard: ignore'
or '# nanguard: ignore[rule,...]' comment on a line silences findings there. Findings of severity
info are questions or notes: they never make the exit status 1. See --list-rules for every rule.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("config", nargs="?", metavar="CONFIG", help="training config (.yaml, .yml, .json, .toml or .py)")
    parser.add_argument(
        "--fix", action="store_true", help="write NAME_fixed.EXT with every fixable finding applied"
    )
    parser.add_argument("--json", action="store_true", help='print {"findings": [...]} as JSON')
    parser.add_argument("--force", action="store_true", help="with --fix: overwrite an existing output file")
    parser.add_argument(
        "-o", "--output", metavar="PATH", help="with --fix: write the fixed config here instead"
    )
    parser.add_argument(
        "--ignore", metavar="RULE[,RULE]", action="append", default=[], help="skip these rules (repeatable)"
    )
    parser.add_argument("--list-rules", action="store_true", help="describe every rule and exit")


def main(args: argparse.Namespace) -> int:
    from nanguard.lint.api import config_shape, fix_config, lint_config, load
    from nanguard.lint.render import changes_text, findings_json, findings_table, problems, rules_table

    if args.list_rules:
        print(rules_table())
        return 0
    if not args.config:
        raise UsageError("a CONFIG file is required (e.g. nanguard lint train.yaml)")
    if (args.output or args.force) and not args.fix:
        raise UsageError("--output and --force only apply with --fix")
    ignore = [name for group in args.ignore for name in group.split(",")]

    if not args.fix:
        loaded = load(args.config)
        findings = lint_config(loaded, ignore=ignore)
        shape = config_shape(loaded)
        print(findings_json(findings) if args.json else findings_table(findings, args.config, shape))
        return 1 if problems(findings) else 0

    result = fix_config(args.config, output=args.output, overwrite=args.force, ignore=ignore)
    print(
        findings_json(result.findings)
        if args.json
        else findings_table(result.findings, args.config, result.shape)
    )
    print(changes_text(result), file=sys.stderr if args.json else sys.stdout)
    return 1 if problems(result.remaining) else 0
