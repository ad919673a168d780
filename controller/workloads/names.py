"""The reference workloads' names, importable without torch.

The controller checks a compression request's workload name in the server process,
which must not load torch (jobs run in a process pool); ``registry.WORKLOADS`` holds the
factories and is checked against this list when it is imported.
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
