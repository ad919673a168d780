"""Names clients may choose (models, device classes, device ids), validated alike everywhere.

A name never becomes a filesystem path on its own; still, keeping them to a small
alphabet keeps logs, metrics labels and CLI output unambiguous.
"""

from __future__ import annotations

import re

NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")  # whole string: fullmatch
NAME_RULE = (
    "1-64 characters: lowercase letters, digits, '.', '_' or '-', starting with a letter or digit"
)


class InvalidNameError(ValueError):
    """A client-chosen name breaks NAME_RULE."""


def check_name(value: str, *, field: str) -> str:
    """Return ``value`` when it follows NAME_RULE; the error names the field and the rule."""
    if not NAME_PATTERN.fullmatch(value):
        shown = value if len(value) <= 80 else value[:77] + "..."
        raise InvalidNameError(f"{field} {shown!r} is not valid: use {NAME_RULE}")
    return value
