"""A sink that writes somewhere outside nanguard's own files must never stop the training it watches.

A full disk under TensorBoard's event file, an MLflow server that went away, a W&B process that
died: the first failure is reported once (which sink, what failed, what it means) and that sink goes
quiet for the rest of the run. Training and the other sinks carry on.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any


class FailSafe:
    """Mixin: :meth:`_safely` runs one sink call; the first exception disables the sink with one warning."""

    sink_name = "sink"
    failed: str | None = None

    def _safely(self, what: str, call: Callable[..., Any], *args: Any) -> Any:
        if self.failed is not None:
            return None
        try:
            return call(*args)
        except Exception as exc:  # the user's run matters more than this record of it
            self.failed = f"{what}: {type(exc).__name__}: {exc}"
            warnings.warn(f"nanguard: {self.sink_name} stopped after a failed {what} ({type(exc).__name__}: {exc}); "
                          f"training continues without it", RuntimeWarning, stacklevel=3)
            return None
