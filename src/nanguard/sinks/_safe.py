"""A record must never stop the training it records.

A full disk under ``history.csv`` or TensorBoard's event file, an MLflow server that went away, a W&B
process that died: the first failure is reported once (which sink, what failed, the path and errno
when there is one, what it means) and that sink goes quiet for the rest of the run. Training and the
other sinks carry on, and the run's summary lists what was not recorded (``RunRecords.failures``).

Every built-in sink follows this rule through :class:`FailSafe`; :class:`~nanguard.records.RunRecords`
applies the same rule to sinks a caller adds (:func:`describe_failure` and :func:`warn_once`).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from typing import Any


def describe_failure(what: str, exc: BaseException, path: str | None = None) -> str:
    """"a failed write of /run/history.csv (OSError errno 28: No space left on device)"."""
    errno = getattr(exc, "errno", None)
    reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    detail = f"{type(exc).__name__} errno {errno}: {reason}" if errno else f"{type(exc).__name__}: {reason}"
    return f"a failed {what}" + (f" of {path}" if path else "") + f" ({detail})"


def warn_once(message: str) -> None:
    """Warn; if warnings are turned into errors (``-W error``), print the line instead of raising it."""
    try:
        warnings.warn(message, RuntimeWarning, stacklevel=4)
    except Warning:
        try:
            print(message, file=sys.stderr)
        except (OSError, ValueError):  # stderr itself is gone: nothing left to tell
            pass


class FailSafe:
    """Mixin: :meth:`_safely` runs one sink call; the first exception disables the sink with one warning.

    ``sink_path`` (a file or folder the sink writes, if any) is named in the warning and in ``failed``.
    """

    sink_name = "sink"
    sink_path: str | None = None
    failed: str | None = None

    def _safely(self, what: str, call: Callable[..., Any], *args: Any) -> Any:
        if self.failed is not None:
            return None
        try:
            return call(*args)
        except Exception as exc:  # the user's run matters more than this record of it
            self._fail(what, exc)
            return None

    def _fail(self, what: str, exc: BaseException) -> None:
        self.failed = describe_failure(what, exc, self.sink_path)
        warn_once(f"nanguard: {self.sink_name} stopped after {self.failed}; training continues without it")
