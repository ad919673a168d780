"""The energy source a telemetry window names: written by agents, read by the controller.

A source is one of METERS (edge_agent/meters.py), or ``"<meter>*F"`` from an agent run
with ``--emulate-slowdown F`` (demos and tests), whose latency, CPU time and energy are F
times what it measured. F is above 1, at most MAX_EMULATED_SLOWDOWN, with at most one
decimal place, written in its shortest form (``"2.5"``, ``"10"``): each source is a rollup
row and a Prometheus series per class and artifact, so the values a device can make up
stay few. Both sides use this one rule: an agent refuses at start a factor the
controller would refuse on every window it sends.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

METERS = ("estimate", "hwmon", "none", "rapl")
NO_METER = "none"  # no meter and no power model: the window's joules are 0, not a reading
MAX_EMULATED_SLOWDOWN = 100.0
FACTOR_RULE = (
    f"a factor above 1, at most {MAX_EMULATED_SLOWDOWN:g}, with at most one decimal place "
    "(e.g. 2.5 or 10)"
)
SLOWDOWN_RULE = f"1 (a real device) or {FACTOR_RULE}"
_FACTOR = re.compile(r"[0-9]{1,3}(?:\.[0-9])?")  # ASCII digits only: float() takes more


class EnergySourceError(ValueError):
    """A meter or emulated slowdown outside the rule above; the message says what is."""


@dataclass(frozen=True)
class EnergySource:
    meter: str
    slowdown: float = 1.0  # 1: a real device's own measurements


def _factor(text: str) -> float | None:
    """F of ``"<meter>*F"`` when ``text`` is one the rule accepts, written as agents write it."""
    if not _FACTOR.fullmatch(text):
        return None
    value = float(text)
    if f"{value:g}" != text or not 1 < value <= MAX_EMULATED_SLOWDOWN:
        return None
    return value


def check_slowdown(slowdown: float) -> None:
    """Refuse a slowdown whose ``"<meter>*F"`` the controller would not accept.

    Also a value that is not exactly the factor it would be written as (2.0000001 is
    written "2"): the numbers reported would not be the ones the source names.
    """
    if slowdown != 1.0 and _factor(f"{slowdown:g}") != slowdown:
        raise EnergySourceError(f"expected {SLOWDOWN_RULE}, got {slowdown!r}")


def format_energy_source(meter: str, slowdown: float = 1.0) -> str:
    """``meter``, or ``"<meter>*F"`` for an emulated slowdown F; refuses what parsing would."""
    if meter not in METERS:
        raise EnergySourceError(f"meter {meter!r} is not one of {', '.join(METERS)}")
    check_slowdown(slowdown)
    return meter if slowdown == 1.0 else f"{meter}*{slowdown:g}"


def parse_energy_source(source: str) -> EnergySource:
    """The meter and slowdown ``source`` names; EnergySourceError if the rule refuses it."""
    meter, star, text = source.partition("*")
    if meter in METERS:
        if not star:
            return EnergySource(meter)
        factor = _factor(text)
        if factor is not None:
            return EnergySource(meter, factor)
    raise EnergySourceError(
        f"{source[:40]!r} is not an energy source: expected one of {', '.join(METERS)}, or "
        f"'<meter>*F' with F {FACTOR_RULE}"
    )
