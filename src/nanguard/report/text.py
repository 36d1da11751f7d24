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
    "exception": "the step raised an exception",
    "stalled": "training stalled",
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
    """How a module reads: ``''`` -> "(root module)", ``'0.attn'`` -> "model[0].attn", others as named.

    A name that starts with an index (children of an ``nn.Sequential`` or ``nn.ModuleList`` root)
    would print as a bare "'0'"; written as the indexing that reaches it, it says what it is.
    ``None`` (not located) stays ``None`` so callers show their dash.
    """
    if name is None:
        return None
    if not name:
        return ROOT_MODULE
    parts = name.split(".")
    if not parts[0].isdigit():
        return name
    text = "model"
    for part in parts:
        text += f"[{part}]" if part.isdigit() else f".{part}"
    return text


LR_BACKOFFS_LABEL = "LR multiplier cuts"  # an lr_backoff, or a rollback that lowered the multiplier
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
    return CAUSE_WORDS.get(cause) or cause.replace("_", " ")


def steps_phrase(steps: tuple[int, ...] | list[int], limit: int = 4) -> str:
    """"step 120" / "steps 120, 300" / "steps 1, 2, 3, 4 and 5 more"."""
    shown = ", ".join(str(step) for step in steps[:limit])
    more = f" and {len(steps) - limit} more" if len(steps) > limit else ""
    return f"step{'s' if len(steps) > 1 else ''} {shown}{more}"


def plural(count: int, word: str, many: str | None = None) -> str:
    """"1 event", "2 events", "1 batch" / "3 batches" (``many`` for irregular plurals)."""
    return f"{count} {word if count == 1 else many or word + 's'}"


def ordinal(number: int) -> str:
    """1 -> "1st", 12 -> "12th", 22 -> "22nd"."""
    suffix = "th" if 10 <= number % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(number % 10, "th")
    return f"{number}{suffix}"


def event_value(event: Mapping[str, Any], key: str) -> float | None:
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

    The root module (name ``''``) reads "(root module)", not "module ''"; a module reached by index
    reads as the indexing ("module model[0]"), not "module '0'".
    """
    parts = []
    for key in ("module", "op", "tensor"):
        value = diagnosis.get(key)
        if value is None:
            continue
        if key == "module":
            shown = module_name(str(value)) or ""
            parts.append(shown if shown == ROOT_MODULE else f"module {shown if shown != value else repr(shown)}")
        else:
            parts.append(f"op {value}" if key == "op" else f"{key} {str(value)!r}")
    return ", ".join(parts)


def _diagnosis(event: Mapping[str, Any]) -> Mapping[str, Any]:
    diagnosis = event.get("diagnosis") or {}
    return diagnosis if isinstance(diagnosis, Mapping) else {}


def event_head(event: Mapping[str, Any]) -> str:
    """"[nanguard] step 120: nonfinite_loss -> skip (loss=NaN)"."""
    loss = event_value(event, "loss")
    head = f"[nanguard] step {event.get('step', '?')}: {event.get('trigger', '?')} -> {event.get('action', '?')}"
    return head + (f" (loss={format_number(loss)})" if loss is not None else "")


def cause_line(diagnosis: Mapping[str, Any]) -> str:
    """"masked_softmax_all_masked in forward; module 'blocks.0.attn', op aten::_softmax (confidence 0.95)"."""
    line = f"{diagnosis.get('cause', 'unknown')} in {diagnosis.get('phase', 'unknown')}"
    where = where_phrase(diagnosis)
    if where:
        line += f"; {where}"
    confidence = diagnosis.get("confidence")
    if isinstance(confidence, (int, float)) and confidence:
        line += f" (confidence {float(confidence):.2f})"
    return line


def _contributing_lines(diagnosis: Mapping[str, Any]) -> list[tuple[str, str]]:
    items = diagnosis.get("contributing")
    lines = []
    for item in items if isinstance(items, list) else []:
        if isinstance(item, Mapping) and item.get("cause"):
            evidence = [str(line) for line in item.get("evidence") or [] if line]
            lines.append(("contributing", f"{item['cause']}" + (f": {evidence[0]}" if evidence else "")))
    return lines


def event_lines(event: Mapping[str, Any], *, max_evidence: int | None = 6,
                max_fixes: int | None = 4) -> list[tuple[str, str]]:
    """An event as (kind, text) lines: kind is head, cause, note, evidence, contributing or fix.

    :func:`event_block` prints them plainly; the live console styles each kind.
    """
    diagnosis = _diagnosis(event)
    lines = [("head", event_head(event)), ("cause", cause_line(diagnosis))]
    details = event.get("details")
    if isinstance(details, Mapping) and details.get("exception"):
        lines.append(("raised", str(details["exception"])))
    pointer = diagnosis.get("same_as_step")
    if isinstance(pointer, int) and not isinstance(pointer, bool):
        lines.append(("note", f"diagnosis carried over from step {pointer} (same signature; this step was not replayed)"))
    evidence = [str(line) for line in diagnosis.get("evidence") or []]
    lines += [("evidence", line) for line in evidence[:max_evidence]]
    if max_evidence is not None and len(evidence) > max_evidence:
        lines.append(("evidence", f"... {len(evidence) - max_evidence} more in events.jsonl"))
    lines += _contributing_lines(diagnosis)
    lines += [("fix", str(line)) for line in (diagnosis.get("fixes") or [])[:max_fixes]]
    return lines


def event_block(event: Mapping[str, Any], *, max_evidence: int | None = 6, max_fixes: int | None = 4) -> str:
    """One readable block for an ``events.jsonl`` record: the console's and ``nanguard events``' wording."""
    return "\n".join(text if kind == "head" else f"  {kind}: {text}"
                     for kind, text in event_lines(event, max_evidence=max_evidence, max_fixes=max_fixes))


def repeat_line(event: Mapping[str, Any], first_step: int, count: int) -> str:
    """"[nanguard] step 97: same as step 31, skipped (NaN loss; 12th time)": a repeat, in one line."""
    loss, grad = event_value(event, "loss"), event_value(event, "grad_norm")
    what = trigger_phrase(str(event.get("trigger", "")), loss, grad)
    action = action_phrase(str(event.get("action", "none")))
    return f"[nanguard] step {event.get('step', '?')}: same as step {first_step}, {action} ({what}; {ordinal(count)} time)"
