"""The reference workloads by name: one table, built here and nowhere else.

A name comes from a person (CLI flag, benchmark config), so an unknown one is refused
with the list of known names rather than a bare KeyError. Factories, not instances:
building a workload loads nothing (data and models load on first use), and every
caller gets its own instance with its own caches.
"""

from __future__ import annotations

from collections.abc import Callable

from controller.workloads.base import Workload
from controller.workloads.basic_motions import BasicMotionsWorkload, WideBasicMotionsWorkload
from controller.workloads.italy_power import ItalyPowerWorkload
from controller.workloads.minilm import MiniLMWorkload
from controller.workloads.names import WORKLOAD_NAMES, UnknownWorkloadError
from controller.workloads.plaid import PlaidWorkload

WorkloadFactory = Callable[[], Workload]

WORKLOADS: dict[str, WorkloadFactory] = {
    "plaid": PlaidWorkload,
    "italy-power": ItalyPowerWorkload,
    "basic-motions": BasicMotionsWorkload,
    "basic-motions-wide": WideBasicMotionsWorkload,
    "minilm": MiniLMWorkload,
}


if tuple(sorted(WORKLOADS)) != WORKLOAD_NAMES:  # pragma: no cover - a coding error
    raise RuntimeError(
        f"controller/workloads/names.py lists {WORKLOAD_NAMES}, the registry has "
        f"{tuple(sorted(WORKLOADS))}: keep them equal"
    )


def get_workload(name: str) -> Workload:
    """A new instance of the named workload."""
    factory = WORKLOADS.get(name)
    if factory is None:
        raise UnknownWorkloadError(name)
    return factory()


def workload_names() -> tuple[str, ...]:
    return tuple(sorted(WORKLOADS))


__all__ = ["WORKLOADS", "UnknownWorkloadError", "get_workload", "workload_names"]
