"""Availability flags for optional packages, checked without importing them."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from nanguard.errors import MissingExtraError


def is_available(module: str) -> bool:
    """True when ``module`` can be imported; does not import it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(module: str, *, extra: str, feature: str, package: str | None = None) -> ModuleType:
    """Import ``module`` or raise an error that names the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(package or module.split(".")[0], extra, feature) from exc
