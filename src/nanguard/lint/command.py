"""``nanguard lint CONFIG [--fix] [--json]``: the command-line front of :mod:`nanguard.lint`.

Exit status: 0 no findings, 1 findings (with ``--fix``: findings the fixed file still has, i.e. the
ones that need a manual change), 2 unreadable or malformed input, missing file, unknown extension,
or a ``_fixed`` file that already exists without ``--force``.
"""

from __future__ import annotations

import argparse
import sys

from nanguard.errors import UsageError

EPILOG = """\
--fix writes NAME_fixed.EXT beside the input (never the input itself), keeping comments, key order
and formatting. If that file exists it is left alone and the command fails, unless --force is given
or --output names another path. A '# nanguard: ignore' or '# nanguard: ignore[rule,...]' comment on a
YAML line silences findings there. See --list-rules for every rule and its thresholds.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("config", nargs="?", metavar="CONFIG", help="training config (.yaml, .yml or .json)")
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
    from nanguard.lint.render import findings_json, findings_table, rules_table

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
        return 1 if findings else 0

    result = fix_config(args.config, output=args.output, overwrite=args.force, ignore=ignore)
    print(
        findings_json(result.findings)
        if args.json
        else findings_table(result.findings, args.config, result.shape)
    )
    summary = sys.stderr if args.json else sys.stdout
    if result.output_path is None:
        print("nothing to fix automatically" if result.findings else "nothing to fix", file=summary)
    else:
        left = len(result.remaining)
        tail = f"; {left} finding{'s' if left != 1 else ''} left need a manual change" if left else ""
        print(f"wrote {result.output_path}: {len(result.applied)} fixes applied{tail}", file=summary)
    return 1 if result.remaining else 0
