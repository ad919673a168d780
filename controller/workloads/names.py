"""The reference workloads' names, importable without torch.

The controller checks a compression request's workload name in the server process,
which must not load torch (jobs run in a process pool), and `homefleet compress` checks
its flags before it loads the compression stack (seconds of imports), so a typo is
refused at once; ``registry.WORKLOADS`` holds the factories and is checked against this
list when it is imported.
"""

from __future__ import annotations

WORKLOAD_NAMES: tuple[str, ...] = (
    "basic-motions",
    "basic-motions-wide",
    "italy-power",
    "minilm",
    "plaid",
)
# Those without labels, judged by fidelity to their source (min_fidelity); the others
# are classifiers judged by accuracy (max_accuracy_drop). tests/workloads/test_registry.py
# checks this against each workload's kind.
UNLABELLED_WORKLOADS: frozenset[str] = frozenset({"minilm"})


class UnknownWorkloadError(ValueError):
    """A workload name that is not in ``WORKLOAD_NAMES``; the message lists the known ones."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"unknown workload {name!r}; known workloads: {', '.join(WORKLOAD_NAMES)}")


def check_workload_name(name: str) -> str:
    """``name`` if it names a reference workload, else `UnknownWorkloadError`."""
    if name not in WORKLOAD_NAMES:
        raise UnknownWorkloadError(name)
    return name
