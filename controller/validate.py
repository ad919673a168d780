"""Input checks shared by the handlers: each failure is INVALID_ARGUMENT naming field and rule."""

from __future__ import annotations

import math
import re

from artifact.digest import InvalidDigestError, check_sha256
from artifact.names import InvalidNameError, check_name
from controller.errors import invalid

MAX_INT64 = 2**63 - 1


def name(value: str, field: str) -> str:
    try:
        return check_name(value, field=field)
    except InvalidNameError as exc:
        raise invalid(str(exc)) from exc


def optional_name(value: str, field: str) -> str | None:
    return name(value, field) if value else None


def digest(value: str, field: str) -> str:
    try:
        return check_sha256(value, field=field)
    except InvalidDigestError as exc:
        raise invalid(str(exc)) from exc


def optional_digest(value: str, field: str) -> str:
    """An empty string is allowed (meaning none); anything else must be a digest."""
    return digest(value, field) if value else ""


# Control characters other than tab and line breaks: an escape sequence in a device's
# status reason would restyle the operator's terminal or forge lines in `homefleet
# devices` and `homefleet events`.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def text(value: str, field: str, max_chars: int) -> str:
    if len(value) > max_chars:
        raise invalid(f"{field} is {len(value)} characters long; at most {max_chars} are accepted")
    if found := _CONTROL.search(value):
        raise invalid(
            f"{field} holds the control character U+{ord(found.group()):04X} at position "
            f"{found.start()}; send text without control characters (tabs and line breaks "
            "are fine)"
        )
    return value


def int_range(value: int, field: str, low: int, high: int) -> int:
    if not low <= value <= high:
        raise invalid(f"{field} must be in {low}..{high}, got {value}")
    return value


def non_negative_float(value: float, field: str) -> float:
    if not math.isfinite(value) or value < 0:
        raise invalid(f"{field} must be a finite number >= 0, got {value}")
    return value
