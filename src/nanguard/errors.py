"""The one root exception of nanguard, and the few specialisations callers may want to catch."""

from __future__ import annotations


class NanguardError(Exception):
    """Root of every error nanguard raises on purpose.

    Messages repeat the offending input and say what would fix it, so the CLI can print
    ``str(error)`` as a single line and exit non-zero without a traceback.
    """


class ConfigError(NanguardError, ValueError):
    """A configuration field holds a value nanguard cannot work with."""


class UsageError(NanguardError):
    """A command or function was called in a way that cannot work (bad path, bad argument)."""


class TrainingAborted(NanguardError):
    """The guard exhausted its escalation ladder and stopped the run.

    Carries the path of the emergency checkpoint so the caller can resume from it.
    """

    def __init__(self, message: str, checkpoint: str | None = None) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint


class CheckpointError(NanguardError):
    """A checkpoint could not be written (a full disk, a missing folder); the cause is chained."""


class MissingExtraError(NanguardError, ImportError):
    """An optional dependency is needed for the feature that was asked for."""

    def __init__(self, package: str, extra: str, feature: str) -> None:
        super().__init__(
            f"{feature} needs the '{package}' package: pip install 'nanguard[{extra}]' (or pip install {package})"
        )
        self.package = package
        self.extra = extra
