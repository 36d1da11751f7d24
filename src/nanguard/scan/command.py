"""``nanguard scan PATH...``: check dataset files before training, print a table or ``--json``.

Exit status: 0 when nothing was found, 1 when there are findings, 2 on bad usage (one line on stderr).
Field names in the output: the column or key; ``a.b`` for nested keys; ``null`` (``-`` in the
table) for a plain ``.npy`` or a bare tensor, and for findings about the file as a whole.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, NoReturn


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number greater than 1, got {text!r}") from None
    if not value > 1:
        raise argparse.ArgumentTypeError(f"expected a number greater than 1, got {text!r}")
    return value


_EPILOG = """\
checks: nonfinite (NaN/Inf, also "NaN"/"Infinity" written as text and CSV cells pandas reads as
  NaN), label_out_of_range (labels outside [0, N) or negative, ignore index allowed),
  token_out_of_range (ids outside [0, V)), extreme_scale (finite |x| > 65504, overflows fp16),
  scale_mismatch (typical |x| far from sibling files'), constant (zero-variance column),
  empty (zero-length/empty/missing rows), unreadable (corrupt or truncated file or line).
Roles are decided by the values; names only suggest them. Fields named like label, target, y, class
(or --label-field) are class labels when they hold whole numbers, and a measurement (compared for
scale across files) when they hold other floats. Token ids: fields named like input_ids, tokens,
raw .bin files (nanoGPT), and any integer data when --vocab-size is given and nearly all of it lies in
[0, V). Integers in the Unix-time range are timestamps. Every assumption, and every check that could
not run (no --num-classes, no --vocab-size), is listed under "assumed and not checked".
Formats: .npy .npz .pt/.pth (weights_only) .csv .parquet .jsonl .json .bin; other files in a folder
are listed as skipped.
Rows are 0-based: axis 0 of arrays, data rows of CSV (after the header), lines of JSON lines.
Exit status: 0 clean, 1 findings, 2 bad usage.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = _EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "paths", nargs="+", metavar="PATH", help="dataset files or folders (searched recursively)"
    )
    parser.add_argument(
        "--num-classes", type=_positive_int, metavar="N", help="class labels must lie in [0, N)"
    )
    parser.add_argument("--vocab-size", type=_positive_int, metavar="V", help="token ids must lie in [0, V)")
    parser.add_argument(
        "--label-field",
        action="append",
        metavar="NAME",
        help="treat this column/key as class labels (besides names like label, target, y); repeatable",
    )
    parser.add_argument(
        "--ignore-index",
        type=int,
        default=-100,
        metavar="I",
        help="label value that is allowed outside [0, N) (default: -100, as in CrossEntropyLoss)",
    )
    parser.add_argument(
        "--scale-ratio",
        type=_ratio,
        default=100.0,
        metavar="R",
        help="flag a file whose typical |x| is R times off its siblings' median (default: 100)",
    )
    parser.add_argument(
        "--sibling-ratio",
        type=_ratio,
        default=5.0,
        metavar="R",
        help="tighter bound for sibling files with the same fields (one collection): flag a field whose "
        "typical |x| is R times off theirs, widened by their own spread (default: 5)",
    )
    parser.add_argument(
        "--bin-dtype",
        choices=("uint16", "uint32", "int32", "int64"),
        default="uint16",
        help="element type of raw .bin token files (nanoGPT's prepare.py writes uint16; default: uint16)",
    )
    parser.add_argument("--json", action="store_true", help="print the findings as one JSON object")
    _one_line_errors(parser)


def _one_line_errors(parser: argparse.ArgumentParser) -> None:
    """Bad usage prints a single ``nanguard scan: error: ...`` line (no usage block) and exits 2.

    Unknown flags are caught here too: argparse would otherwise hand them to the top-level parser.
    """

    def error(message: str) -> NoReturn:
        parser.exit(2, f"{parser.prog}: error: {message} (see '{parser.prog} --help')\n")

    parse_known_args = parser.parse_known_args

    def strict_parse_known_args(args: Any = None, namespace: Any = None) -> Any:
        parsed, extras = parse_known_args(args, namespace)
        if extras:
            error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras

    parser.error = error  # type: ignore[method-assign]
    parser.parse_known_args = strict_parse_known_args  # type: ignore[method-assign]


def main(args: argparse.Namespace) -> int:
    from nanguard.scan.report import render_table
    from nanguard.scan.scanner import scan_paths

    result = scan_paths(
        args.paths,
        num_classes=args.num_classes,
        vocab_size=args.vocab_size,
        label_field=args.label_field,
        ignore_index=args.ignore_index,
        scale_ratio=args.scale_ratio,
        sibling_ratio=args.sibling_ratio,
        bin_dtype=args.bin_dtype,
    )
    if args.json:
        sys.stdout.write(json.dumps(result.to_dict()) + "\n")
    else:
        sys.stdout.write(render_table(result))
    return result.exit_code
