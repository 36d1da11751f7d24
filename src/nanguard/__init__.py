"""nanguard keeps PyTorch training runs finite.

    guard = nanguard.Guard(model, optimizer)   # every optimizer.step() is now checked
"""

from nanguard.config import GuardConfig
from nanguard.errors import NanguardError, TrainingAborted
from nanguard.events import Diagnosis, Event

__version__ = "0.1.0"

__all__ = ["Diagnosis", "Event", "Guard", "GuardConfig", "NanguardError", "TrainingAborted", "__version__"]


def __getattr__(name: str):  # lazy: keep `import nanguard` light
    if name == "Guard":
        from nanguard.guard import Guard

        return Guard
    if name == "ops":
        import importlib

        return importlib.import_module("nanguard.ops")
    raise AttributeError(f"module 'nanguard' has no attribute {name!r}")
