"""The workload registry: one table, names that match, a helpful error for a typo."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from controller.workloads.base import TaskKind, Workload, default_cache_dir
from controller.workloads.registry import (
    WORKLOADS,
    UnknownWorkloadError,
    get_workload,
    workload_names,
)


def test_every_reference_workload_is_registered_under_its_own_name() -> None:
    assert workload_names() == (
        "basic-motions",
        "basic-motions-wide",
        "italy-power",
        "minilm",
        "plaid",
    )
    for name in WORKLOADS:
        workload = get_workload(name)
        assert isinstance(workload, Workload)
        assert workload.name == name
        assert workload.input_names and workload.output_names


def test_kinds() -> None:
    assert get_workload("minilm").kind is TaskKind.EMBEDDING
    for name in ("plaid", "italy-power", "basic-motions"):
        assert get_workload(name).kind is TaskKind.CLASSIFICATION


def test_each_call_builds_a_new_instance() -> None:
    assert get_workload("plaid") is not get_workload("plaid")


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(UnknownWorkloadError) as info:
        get_workload("plaid2")
    message = str(info.value)
    assert "'plaid2'" in message
    assert "basic-motions, basic-motions-wide, italy-power, minilm, plaid" in message
    assert isinstance(info.value, ValueError)


def test_calibration_inputs_cover_every_class_of_a_sorted_split() -> None:
    """PLAID's train split is sorted by class; calibration must not be two classes of eleven."""
    workload = get_workload("plaid")
    train = workload.data().train
    assert train.labels is not None
    assert (np.diff(train.labels) >= 0).all()  # sorted, so take(64) would be biased
    spread = train.spread(64)
    assert len(spread) == 64 and spread.labels is not None
    assert set(spread.labels.tolist()) == set(train.labels.tolist())
    calib = workload.calibration_inputs(64)
    np.testing.assert_array_equal(calib["x"], spread.inputs["x"])
    assert len(train.spread(10_000)) == len(train)
    with pytest.raises(ValueError, match="n must be >= 1"):
        train.spread(0)


def test_the_torch_free_name_list_is_the_registry_and_loads_no_torch() -> None:
    from controller.workloads.base import TaskKind
    from controller.workloads.names import UNLABELLED_WORKLOADS, WORKLOAD_NAMES

    assert workload_names() == WORKLOAD_NAMES
    for name in WORKLOAD_NAMES:
        labelled = get_workload(name).kind is TaskKind.CLASSIFICATION
        assert labelled == (name not in UNLABELLED_WORKLOADS), name
    # the controller checks a job's workload name in the server process: no torch there
    probe = (
        "import sys, controller.server, controller.jobs.handlers, controller.workloads.names;"
        "print('torch' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    assert done.stdout.strip() == "False"


def test_the_cache_dir_is_the_checkout_or_the_environment_never_site_packages(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("HOMEFLEET_CACHE_DIR", raising=False)
    root = Path(__file__).resolve().parents[2]
    assert default_cache_dir() == root / ".cache" / "homefleet" / "workloads"
    monkeypatch.setenv("HOMEFLEET_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path / "workloads"
