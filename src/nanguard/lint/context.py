"""The facts of one config that several rules share, each computed once, and small helpers for messages."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from nanguard.lint import vocabulary as vocab
from nanguard.lint.findings import KeyPath
from nanguard.lint.locate import (
    Precision,
    Sections,
    find_sections,
    looks_like_fine_tuning,
    optimizer_family,
    read_precision,
    uses_adapters,
)
from nanguard.lint.tree import as_number, is_deferred, key_name, walk


@dataclass(frozen=True)
class LearningRate:
    key_path: KeyPath
    value: Any
    number: float
    family: str


class Context:
    """One config's tree, its file format (``yaml``, ``json``, ``toml``, ``python``, ``mapping``) and
    the facts the rules share."""

    def __init__(
        self,
        data: Mapping[Any, Any],
        fmt: str = "mapping",
        spelling: Callable[[KeyPath], str | None] | None = None,
    ) -> None:
        self.data = data
        self.fmt = fmt
        self._spelling = spelling

    def spelled(self, key_path: KeyPath, value: Any) -> str:
        """The value at ``key_path`` as the file spells it (``1e-2`` stays ``1e-2``), quotes removed."""
        text = self._spelling(key_path) if self._spelling is not None else None
        if text:
            text = text.strip()
            if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
                text = text[1:-1]
            return text
        return written(value)

    @cached_property
    def sections(self) -> Sections:
        return find_sections(self.data, self.fmt)

    @cached_property
    def precision(self) -> Precision:
        return read_precision(self.data)

    @cached_property
    def fine_tuning(self) -> bool:
        return looks_like_fine_tuning(self.data, self.sections)

    @cached_property
    def adapters(self) -> bool:
        """LoRA/QLoRA/PEFT: only small adapter matrices train, at rates ~10x a full fine-tune's."""
        return uses_adapters(self.data)

    @cached_property
    def learning_rates(self) -> list[LearningRate]:
        rates = []
        for path, value, parent in walk(self.data):
            if not isinstance(parent, Mapping) or key_name(path) not in vocab.LR_KEYS or is_deferred(value):
                continue
            number = as_number(value)
            if number is not None and not math.isnan(number):
                rates.append(
                    LearningRate(path, value, number, optimizer_family(self.data, path, self.sections))
                )
        return rates

    def family_label(self, family: str) -> str:
        return {"adam": "an Adam-family", "unknown": "an unidentified"}.get(family, f"a {family.capitalize()}")


def show(number: float) -> str:
    """1.0 -> '1.0', 1e-08 -> '1e-08', 0.03 -> '0.03': short, and still visibly a float."""
    if isinstance(number, float) and number.is_integer() and abs(number) < 1e6:
        return f"{number:.1f}"
    return f"{number:g}"


def written(value: Any) -> str:
    """A config value as the user wrote it (``6e-3`` stays ``6e-3``; a string keeps no quotes)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        return show(value)
    return str(value)


def factor(old: float, new: float) -> str:
    """'10x lower', '17x lower': how far ``new`` is below ``old``, as a person would say it."""
    if new <= 0 or old <= new:
        return "lower"
    ratio = old / new
    return f"{ratio:.0f}x lower" if ratio >= 3 else f"{ratio:.1f}x lower"
