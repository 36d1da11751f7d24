"""The fault zoo: small, ordinary PyTorch training scripts, each with one realistic numerical fault.

Every scenario is a plain script in ``nanguard/zoo/scenarios/`` (``nanguard run`` runs it unmodified)
that also exposes ``main(attach=None, steps=None, fault=True)`` so tests and benchmarks can run it
under the API, under another recipe, or without its fault. Each states what nanguard should report
about the first event (``EXPECTED``), whether a guarded run should end healthy (``RECOVERABLE``), and
its model shape and dtype (``TAGS``). The zoo is how nanguard's diagnoses are measured: see
``benchmarks/zoo_accuracy.py`` and ``benchmarks/recovery.py``.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

EXPECTED_FIELDS = ("step", "trigger", "cause", "phase", "module", "op", "tensor")
SCENARIO_PACKAGE = "nanguard.zoo.scenarios"


@dataclass(frozen=True)
class Scenario:
    """One zoo script and what nanguard is expected to say about it."""

    name: str
    path: Path
    module: ModuleType
    expected: dict[str, Any]
    recoverable: bool
    tags: tuple[str, ...]

    @property
    def cause(self) -> str:
        return str(self.expected["cause"])

    @property
    def crashes(self) -> bool:
        """The fault raises in the step itself (e.g. a CPU ``Target 7 is out of bounds``)."""
        return bool(getattr(self.module, "CRASHES", False))

    def main(self, attach: Any = None, steps: int | None = None, fault: bool = True) -> float:
        return float(self.module.main(attach=attach, steps=steps, fault=fault))


def _validate(name: str, module: ModuleType) -> None:
    """A scenario that forgets a field should fail loudly at load time, not as a confusing test."""
    for attribute in ("EXPECTED", "RECOVERABLE", "TAGS", "main"):
        if not hasattr(module, attribute):
            raise AttributeError(f"zoo scenario {name!r} lacks {attribute}")
    missing = [f for f in EXPECTED_FIELDS if f not in module.EXPECTED]
    if missing:
        raise KeyError(f"zoo scenario {name!r}: EXPECTED lacks {missing}")
    if not (module.__doc__ or "").strip():
        raise ValueError(f"zoo scenario {name!r} has no docstring describing its fault")


def _import_as_user_script(search: Any, name: str) -> ModuleType:
    """Import a scenario under a module name outside ``nanguard``, as a user's own script would be.

    nanguard tells its own frames from the user's by module name (to name batch tensors after the
    user's variables, to find tensors in a crash's traceback); a scenario must look like user code.
    """
    module_name = f"zoo_scenario_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    path = next(Path(p) / f"{name}.py" for p in search if (Path(p) / f"{name}.py").exists())
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def load_scenarios() -> dict[str, Scenario]:
    """Every scenario of the zoo, by name, sorted."""
    package = importlib.import_module(SCENARIO_PACKAGE)
    found: dict[str, Scenario] = {}
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = _import_as_user_script(package.__path__, info.name)
        _validate(info.name, module)
        found[info.name] = Scenario(
            name=info.name,
            path=Path(module.__file__ or ""),
            module=module,
            expected=dict(module.EXPECTED),
            recoverable=bool(module.RECOVERABLE),
            tags=tuple(module.TAGS),
        )
    return found


__all__ = ["EXPECTED_FIELDS", "Scenario", "load_scenarios"]
