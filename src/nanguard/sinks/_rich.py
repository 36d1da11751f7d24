"""The one place a ``rich`` console is made: colour on a terminal, plain text into a pipe, a file or NO_COLOR.

``rich`` is imported here, inside functions, so that ``import nanguard`` (and ``import nanguard.sinks``)
stays light; a sink that prints imports it when it is created.
"""

from __future__ import annotations

import os
from typing import Any, TextIO

STYLES = {
    "prefix": "dim",
    "head": "bold",
    "cause": "bold magenta",
    "raised": "bold red",
    "note": "italic",
    "evidence": "",
    "contributing": "yellow",
    "fix": "green",
    "label": "dim",
    "code": "cyan",
    "good": "green",
    "skip": "bold dark_orange",
    "clip": "yellow",
    "rollback": "bold medium_purple",
    "lr_backoff": "bold dodger_blue1",
    "abort": "bold red",
    "none": "dim",
}
"""Style per kind of text; an action's style is the colour the report gives it."""


def is_tty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def wants_color(tty: bool, color: bool | None = None) -> bool:
    """Colour only on a terminal that can show it, and never when ``NO_COLOR`` is set (https://no-color.org)."""
    if color is not None:
        return color
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    return tty


def make_console(stream: TextIO, *, tty: bool, color: bool, width: int | None = None) -> Any:
    """A ``rich.console.Console`` on ``stream`` that prints what it is given: no markup, no guessing of styles."""
    from rich.console import Console

    return Console(file=stream, force_terminal=tty, color_system="auto" if color else None, width=width,
                   highlight=False, markup=False, emoji=False, soft_wrap=True)


def styled_text(parts: list[tuple[str, str]]) -> Any:
    """``[(text, style kind), ...]`` as one ``rich.text.Text``; `backtick spans` in the text shown as code."""
    from rich.text import Text

    from nanguard.report.text import split_code_spans

    text = Text()
    for chunk, kind in parts:
        style = STYLES.get(kind, "")
        for index, piece in enumerate(split_code_spans(chunk)):
            if index % 2:
                text.append(f"`{piece}`", style=STYLES["code"])
            elif piece:
                text.append(piece, style=style)
    return text
