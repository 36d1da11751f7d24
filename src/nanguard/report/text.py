"""Plain-text wording shared by the report, ``nanguard events`` and the live console.

One place decides how a trigger, an action, a cause and a number read, so the console line a person
saw during training and the report they open afterwards use the same words.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
from collections.abc import Mapping
from typing import Any

from nanguard.causes import CAUSES as _CAUSES

TRIGGER_WORDS = {
    "nonfinite_loss": "non-finite loss",
    "nonfinite_grad": "non-finite gradient",
    "nonfinite_weights": "non-finite weights",
    "nonfinite_input": "non-finite input",
    "loss_spike": "loss spike",
    "grad_spike": "gradient spike",
    "divergence": "divergence",
}

ACTION_WORDS = {
    "none": "recorded only",
    "skip": "skipped",
    "clip": "clipped",
    "rollback": "rolled back",
    "lr_backoff": "LR backed off",
    "abort": "aborted",
}

CAUSE_WORDS = {name: entry.words for name, entry in _CAUSES.items()}
"""Plain words for each cause, from the cause registry (:mod:`nanguard.causes`)."""


ROOT_MODULE = "(root module)"
"""How the model itself reads: its module name is ``''``, which would otherwise print as nothing."""


def module_name(name: str | None) -> str | None:
    """``''`` -> "(root module)"; ``None`` (not located) stays ``None`` so callers show their dash."""
    if name is None:
        return None
    return name if name else ROOT_MODULE


LR_BACKOFFS_LABEL = "LR cuts (backoffs + rollbacks)"
"""The tile/column that counts how often the LR multiplier went down, whichever action lowered it."""

_CODE_SPAN = re.compile(r"(`+)(.+?)(?<!`)\1(?!`)")


def split_code_spans(text: str) -> list[str]:
    """``"use `x` here"`` -> ``["use ", "x", " here"]``: plain text and code-span contents, alternating.

    Fixes and evidence name modules and commands in Markdown backticks; each page renders the odd
    items as code. An unmatched backtick stays plain text.
    """
    parts, position = [], 0
    for match in _CODE_SPAN.finditer(text):
        parts += [text[position : match.start()], match.group(2)]
        position = match.end()
    parts.append(text[position:])
    return parts


def format_time(text: str) -> str:
    """``2026-11-25T20:36:15.941711+00:00`` -> ``2026-11-25 20:36:15 UTC``; anything else unchanged."""
    try:
        moment = _dt.datetime.fromisoformat(text)
    except ValueError:
        return text
    if moment.tzinfo is None:
        return moment.strftime("%Y-%m-%d %H:%M:%S")
    return moment.astimezone(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def format_number(value: float | None) -> str:
    """Four significant digits; NaN/Inf spelled as people search for them; ``None`` as a dash."""
    if value is None:
        return "—"
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return f"{value:.4g}"


def summary_value(value: Any) -> str:
    """A ``summary.json`` value in words: ``True`` -> "yes", ``["a", "b"]`` -> "a, b", 0.28817 -> "0.2882"."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return format_number(value)
    if isinstance(value, list) and all(not isinstance(item, (list, dict)) for item in value):
        return ", ".join(summary_value(item) for item in value)
    if isinstance(value, (list, dict)):
        return json.dumps(value, default=str, ensure_ascii=False)
    return "—" if value is None else str(value)


def trigger_phrase(trigger: str, loss: float | None = None, grad_norm: float | None = None) -> str:
    """``nonfinite_loss`` with a NaN loss reads "NaN loss": the exact value is what people grep for."""
    if trigger == "nonfinite_loss" and loss is not None and not math.isfinite(loss):
        return f"{format_number(loss).lstrip('+')} loss"
    if trigger == "nonfinite_grad" and grad_norm is not None and not math.isfinite(grad_norm):
        return f"{format_number(grad_norm).lstrip('+')} gradient"
    return TRIGGER_WORDS.get(trigger, trigger.replace("_", " "))


def action_phrase(action: str) -> str:
    return ACTION_WORDS.get(action, action.replace("_", " "))


def cause_phrase(cause: str) -> str:
    return CAUSE_WORDS.get(cause, cause.replace("_", " "))


def steps_phrase(steps: tuple[int, ...] | list[int], limit: int = 4) -> str:
    """"step 120" / "steps 120, 300" / "steps 1, 2, 3, 4 and 5 more"."""
    shown = ", ".join(str(step) for step in steps[:limit])
    more = f" and {len(steps) - limit} more" if len(steps) > limit else ""
    return f"step{'s' if len(steps) > 1 else ''} {shown}{more}"


def _value(event: Mapping[str, Any], key: str) -> float | None:
    """The event's number, or the non-finite value its ``*_repr`` field kept (JSON has no NaN)."""
    value = event.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    text = event.get(f"{key}_repr")
    if isinstance(text, str):
        try:
            return float(text)
        except ValueError:
            return None
    return None


def where_phrase(diagnosis: Mapping[str, Any]) -> str:
    """"module 'blocks.3.attn', op aten::_softmax, tensor 'x'" — the parts that are known.

    The root module (name ``''``) reads "(root module)", not "module ''".
    """
    parts = []
    for key in ("module", "op", "tensor"):
        value = diagnosis.get(key)
        if value is None:
            continue
        if key == "module" and value == "":
            parts.append(ROOT_MODULE)
        else:
            parts.append(f"op {value}" if key == "op" else f"{key} {str(value)!r}")
    return ", ".join(parts)


def event_block(event: Mapping[str, Any], *, max_evidence: int | None = 6, max_fixes: int | None = 4) -> str:
    """One readable block for an ``events.jsonl`` record; the wording of ``Event.summary()``."""
    diagnosis = event.get("diagnosis") or {}
    if not isinstance(diagnosis, Mapping):
        diagnosis = {}
    loss = _value(event, "loss")
    head = f"[nanguard] step {event.get('step', '?')}: {event.get('trigger', '?')} -> {event.get('action', '?')}"
    if loss is not None:
        head += f" (loss={format_number(loss)})"
    cause_line = f"  cause: {diagnosis.get('cause', 'unknown')} in {diagnosis.get('phase', 'unknown')}"
    where = where_phrase(diagnosis)
    if where:
        cause_line += f"; {where}"
    confidence = diagnosis.get("confidence")
    if isinstance(confidence, (int, float)) and confidence:
        cause_line += f" (confidence {float(confidence):.2f})"
    lines = [head, cause_line]
    evidence = [str(line) for line in diagnosis.get("evidence") or []]
    fixes = [str(line) for line in diagnosis.get("fixes") or []]
    lines += [f"  evidence: {line}" for line in evidence[:max_evidence]]
    if max_evidence is not None and len(evidence) > max_evidence:
        lines.append(f"  evidence: ... {len(evidence) - max_evidence} more in events.jsonl")
    lines += [f"  fix: {line}" for line in fixes[:max_fixes]]
    return "\n".join(lines)
