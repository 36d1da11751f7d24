"""Edits to a config's text that change only the bytes of the values being fixed.

Every format's fixer works the same way: find the span of a value (or the place a new key goes),
replace those characters, leave every other byte alone. This module holds what the formats share:
the edit itself, spelling a new value like the one it replaces, and the note that keeps an
end-of-line comment from describing the old value.
"""

from __future__ import annotations

import decimal
import math
import re
from dataclasses import dataclass

_NUMBER = re.compile(r"^[+-]?(\d[\d_]*)?(\.\d*)?([eE][+-]?\d+)?$")


@dataclass(frozen=True)
class Edit:
    """Replace ``text[start:end]`` with ``replacement``."""

    start: int
    end: int
    replacement: str


def apply_edits(text: str, edits: list[Edit]) -> str:
    """``text`` with ``edits`` applied; the edits must not overlap."""
    for edit in sorted(edits, key=lambda e: (e.start, e.end), reverse=True):
        text = text[: edit.start] + edit.replacement + text[edit.end :]
    return text


def format_number(value: float | int, *, scientific: bool | None, yaml_1_1_safe: bool = False) -> str:
    """Spell ``value`` for a config file: in the style of the value it replaces when known.

    ``yaml_1_1_safe`` writes exponents as ``1.0e-6``, the one spelling PyYAML (YAML 1.1, which many
    training scripts read configs with) and YAML 1.2 readers both take as a float.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"not a number: {value!r}")
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        raise ValueError(f"refusing to write a non-finite number: {value!r}")
    if scientific is None:
        scientific = value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e4)
    if not scientific:
        text = repr(float(value))
        # repr switches to an exponent below 1e-4: keep the positional notation the old value used.
        if "e" in text:
            text = format(decimal.Decimal(text), "f")
        return text if "." in text else f"{text}.0"
    mantissa, exponent = f"{value:.6e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    power = int(exponent)
    if yaml_1_1_safe:
        if "." not in mantissa:
            mantissa += ".0"
        return f"{mantissa}e{'-' if power < 0 else '+'}{abs(power)}"
    return f"{mantissa}e{power}"


_YAML_1_1_FLOAT = re.compile(r"^[-+]?\d[\d_]*\.\d*[eE][-+]\d+$")


def number_text(value: float | int, old_text: str | None, *, yaml: bool = False) -> str:
    """``value`` spelled like ``old_text`` (notation and quotes), or in a readable default style.

    A replaced value keeps the old one's notation, so a reader that took ``6e-3`` as text (PyYAML,
    which follows YAML 1.1) reads the fix the same way. With ``yaml``, an exponent is written in the
    one form both YAML 1.1 and 1.2 read as a float (``1.0e-6``) when the old value was (or there was
    none, or it was not a number, like ``-.inf``).
    """
    old = (old_text or "").strip()
    quote = old[0] if old[:1] in "\"'" and old[-1:] == old[:1] and len(old) >= 2 else ""
    bare = old[1:-1] if quote else old
    if old_text is not None and _NUMBER.match(bare) and any(ch.isdigit() for ch in bare):
        scientific: bool | None = "e" in bare.lower()
        if isinstance(value, float) and value.is_integer() and not scientific and "." not in bare:
            value = int(value)  # an integer setting stays an integer
        safe = yaml and not quote and bool(_YAML_1_1_FLOAT.match(bare))
    else:
        scientific, safe = None, yaml and not quote
    return f"{quote}{format_number(value, scientific=scientific, yaml_1_1_safe=safe)}{quote}"


def comment_edit(text: str, value_end: int, old_value: str) -> Edit | None:
    """An edit that keeps a ``# ...`` comment after a changed value from describing the old value.

    ``max_grad_norm: 0  # off`` becomes ``max_grad_norm: 1.0  # was 0 before nanguard lint --fix: off``:
    the note the user wrote survives, and so does the fact that it was about another value.
    """
    line_end = text.find("\n", value_end)
    line_end = len(text) if line_end < 0 else line_end
    rest = text[value_end:line_end]
    match = re.match(r"^(\s*,?\s*)#\s?(.*?)\s*$", rest)
    if match is None:
        return None
    note = match.group(2).rstrip("\r")
    start = value_end + match.end(1)
    carriage = "\r" if rest.endswith("\r") else ""
    return Edit(start, line_end, f"# was {old_value.strip()} before nanguard lint --fix: {note}{carriage}")
