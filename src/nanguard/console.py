"""Moved to :mod:`nanguard.sinks.console`; this name stays importable."""
from nanguard.sinks.console import LiveConsole, NullConsole, status_line  # noqa: F401
