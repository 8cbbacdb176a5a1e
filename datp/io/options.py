"""Parsing of command-line option values shared by every command."""

from __future__ import annotations

_EXAMPLES = {int: ("integers", "30,60"), float: ("numbers", "1,1.5")}


def parse_numbers(text: str, *, kind: type = int, what: str = "--option") -> tuple:
    """"30, 60" -> (30, 60) (kind int) or "1,1.5" -> (1.0, 1.5) (kind float); "" -> ().

    Spaces are ignored and empty items skipped.

    Raises:
        ValueError: an item is not a `kind`, naming the option `what`.
    """
    if kind not in _EXAMPLES:
        raise TypeError(f"kind must be int or float, not {kind!r}")
    try:
        return tuple(kind(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        noun, example = _EXAMPLES[kind]
        raise ValueError(f"{what} {text!r} must be comma-separated {noun}, e.g. {example}") from None
