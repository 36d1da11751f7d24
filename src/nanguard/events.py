"""The event record: what the guard saw at one step, what it did, and why it happened.

The vocabularies below mirror ``shared/spec/event.schema.json``; they are a public contract, so
values may be added there first and here second, never renamed. Causes come from the registry in
:mod:`nanguard.causes`.
"""

from __future__ import annotations

import datetime as _dt
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from nanguard.causes import CAUSES as _REGISTRY

TRIGGERS = (
    "nonfinite_loss",
    "nonfinite_grad",
    "nonfinite_weights",
    "nonfinite_input",
    "loss_spike",
    "grad_spike",
    "divergence",
    "exception",
    "stalled",
)
ACTIONS = ("none", "skip", "clip", "rollback", "lr_backoff", "abort")
CAUSES = tuple(_REGISTRY)
PHASES = ("data", "forward", "loss", "backward", "optimizer", "state", "unknown")


@dataclass
class Diagnosis:
    """Why a step went wrong: one cause of the taxonomy, where it arose, and what to do."""

    cause: str = "unknown"
    phase: str = "unknown"
    module: str | None = None
    op: str | None = None
    tensor: str | None = None
    reproducible: bool | None = None
    confidence: float = 0.0
    evidence: list[str] = field(default_factory=list)
    fixes: list[str] = field(default_factory=list)
    # Other causes that triggered or worsened this one: [{"cause": ..., "evidence": [...]}].
    contributing: list[dict[str, Any]] = field(default_factory=list)
    # This event carries the diagnosis of an earlier investigated event with the same signature.
    same_as_step: int | None = None

    def __post_init__(self) -> None:
        if self.cause not in CAUSES:
            raise ValueError(f"Diagnosis.cause={self.cause!r} is not one of {CAUSES}")
        if self.phase not in PHASES:
            raise ValueError(f"Diagnosis.phase={self.phase!r} is not one of {PHASES}")
        for item in self.contributing:
            if item.get("cause") not in CAUSES:
                raise ValueError(f"Diagnosis.contributing cause {item.get('cause')!r} is not one of {CAUSES}")
        self.confidence = float(min(1.0, max(0.0, self.confidence)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _json_number(value: float | None) -> float | str | None:
    """JSON has no NaN/Inf; the schema wants a number or null, so non-finite values become null.

    The exact non-finite value is kept in the event's ``loss_repr``/``grad_norm_repr`` fields.
    """
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _json_safe(value: Any) -> Any:
    """Non-finite floats as strings ("nan", "inf"): event files are strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


@dataclass
class Event:
    """One line of ``events.jsonl``."""

    step: int
    trigger: str
    action: str
    diagnosis: Diagnosis = field(default_factory=Diagnosis)
    loss: float | None = None
    grad_norm: float | None = None
    lr: float | None = None
    rank: int = 0
    time: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat())
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.trigger not in TRIGGERS:
            raise ValueError(f"Event.trigger={self.trigger!r} is not one of {TRIGGERS}")
        if self.action not in ACTIONS:
            raise ValueError(f"Event.action={self.action!r} is not one of {ACTIONS}")
        if self.step < 0:
            raise ValueError(f"Event.step={self.step} must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "step": int(self.step),
            "time": self.time,
            "rank": int(self.rank),
            "trigger": self.trigger,
            "action": self.action,
            "loss": _json_number(self.loss),
            "grad_norm": _json_number(self.grad_norm),
            "lr": _json_number(self.lr),
            "diagnosis": self.diagnosis.to_dict(),
        }
        if self.loss is not None and not math.isfinite(self.loss):
            out["loss_repr"] = repr(float(self.loss))
        if self.grad_norm is not None and not math.isfinite(self.grad_norm):
            out["grad_norm_repr"] = repr(float(self.grad_norm))
        if self.details:
            out["details"] = _json_safe(self.details)
        return out

    def summary(self) -> str:
        """One readable block for the console."""
        d = self.diagnosis
        where = ", ".join(
            f"{k} {v!r}" if k != "op" else f"op {v}"
            for k, v in (("module", d.module), ("op", d.op), ("tensor", d.tensor))
            if v not in (None,)
        )
        lines = [
            f"[nanguard] step {self.step}: {self.trigger} -> {self.action}"
            + (f" (loss={self.loss:.4g})" if self.loss is not None else ""),
            f"  cause: {d.cause} in {d.phase}" + (f"; {where}" if where else "")
            + (f" (confidence {d.confidence:.2f})" if d.confidence else ""),
        ]
        lines += [f"  evidence: {line}" for line in d.evidence[:6]]
        lines += [f"  fix: {line}" for line in d.fixes[:4]]
        return "\n".join(lines)
