"""Dataset scanner: finds NaN/Inf, out-of-range labels and token ids, fp16-overflowing values,
constant columns, empty rows, files in other units, and unreadable files — before training starts.

    from nanguard.scan import scan_paths, scan_dataset
    result = scan_paths(["data/"], num_classes=10)
    result = scan_dataset(train_dataset, vocab_size=50257)
    for finding in result.findings: print(finding.file, finding.field, finding.check, finding.examples)

The command line is ``nanguard scan PATH...`` (module :mod:`nanguard.scan.command`). Names are
imported lazily so that building the CLI parser does not import numpy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nanguard.scan.result import CHECKS, Finding, ScanResult
    from nanguard.scan.scanner import scan_dataset, scan_file, scan_paths

_EXPORTS = {
    "CHECKS": "nanguard.scan.result",
    "Finding": "nanguard.scan.result",
    "ScanResult": "nanguard.scan.result",
    "scan_dataset": "nanguard.scan.scanner",
    "scan_file": "nanguard.scan.scanner",
    "scan_paths": "nanguard.scan.scanner",
}

__all__ = ["CHECKS", "Finding", "ScanResult", "scan_dataset", "scan_file", "scan_paths"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'nanguard.scan' has no attribute {name!r}")
