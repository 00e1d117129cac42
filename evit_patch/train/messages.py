"""One-line messages: every error a command line prints is one line that names the key."""

from __future__ import annotations

import difflib
from typing import Any, Iterable


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the key and the fix."""


def one_line(text: Any) -> str:
    """``text`` (an exception, a message) with its whitespace runs, newlines included, as single spaces."""
    return " ".join(str(text).split())


def short(value: Any, limit: int = 80, quote: bool = True) -> str:
    """A value as one line of at most ``limit`` characters (its repr, or str for keys)."""
    text = one_line(repr(value) if quote else str(value))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def closest(word: Any, choices: Iterable[Any]) -> str | None:
    """The choice closest to ``word`` (as text), or None when none is close."""
    close = difflib.get_close_matches(str(word), [str(choice) for choice in choices], n=1)
    return close[0] if close else None
