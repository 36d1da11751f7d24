"""``import nanguard`` / ``import nanguard.integrations`` must not import any training framework."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("transformers", "lightning", "pytorch_lightning", "accelerate")


def imported_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
    return {m for m in out.strip().split(",") if m}


def test_no_framework_is_imported() -> None:
    # One interpreter for all four: what they import together is the union of what each imports alone.
    statements = ["import nanguard", "import nanguard.integrations", "import nanguard.integrations.lightning",
                  "import nanguard.distributed"]
    assert imported_after("; ".join(statements)) == set()


def test_each_integration_imports_only_its_framework() -> None:
    assert {m.split(".")[0] for m in imported_after("import nanguard.integrations.accelerate")} <= {"accelerate"}
    assert "pytorch_lightning" not in {m.split(".")[0] for m in imported_after(
        "from nanguard.integrations.lightning import NanguardCallback")}
    assert "transformers" in {m.split(".")[0] for m in imported_after("import nanguard.integrations.hf")}


def test_missing_framework_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from nanguard.errors import MissingExtraError
    from nanguard.integrations import lightning

    monkeypatch.setitem(sys.modules, "pytorch_lightning", None)  # import of it now fails
    monkeypatch.setattr(lightning, "_CLASSES", {})
    with pytest.raises(MissingExtraError, match=r"nanguard\[lightning\]"):
        lightning.PLNanguardCallback  # noqa: B018
