"""Checks on a compression request made before anything is recorded: each refusal is a
FleetError naming the field and what is accepted, and none of them loads torch.

A device class arrives as the operator's YAML text; budget overrides tighten it for
this job only; calibration arrays arrive as an ``.npz`` and must fit the model's inputs.
"""

from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import yaml
from google.protobuf.message import DecodeError
from numpy.typing import NDArray
from pydantic import ValidationError

from controller.compression.calibration import check_calibration
from controller.compression.errors import CalibrationMismatchError
from controller.device_classes import DeviceClass, read_yaml, validation_problems, yaml_problem
from controller.errors import invalid
from controller.records import BudgetOverrides

MAX_DEVICE_CLASS_YAML = 64 * 1024
MAX_CALIBRATION_ARRAYS = 256
# A compressed .npz may expand: refuse one that would exceed this many times its bytes.
MAX_EXPANSION = 64


@dataclass(frozen=True)
class Budgeted:
    """The device class with the job's overrides applied, and the size ratio (applied by
    the job once it knows the source model's size)."""

    device_class: DeviceClass
    max_size_ratio: float | None


def parse_device_class(text: str) -> DeviceClass:
    """The operator's device-class YAML, validated like `homefleet compress` validates a file."""
    if not text.strip():
        raise invalid(
            "device_class_yaml is empty; send the device-class file's text "
            "(name, arch, cores, relative_speed, memory_bytes, model_storage_bytes, power, "
            "budgets), e.g. deploy/device-classes/home-hub.yaml"
        )
    if len(text) > MAX_DEVICE_CLASS_YAML:
        raise invalid(
            f"device_class_yaml is {len(text)} characters; at most {MAX_DEVICE_CLASS_YAML} "
            "are accepted"
        )
    try:
        raw = read_yaml(text)  # a duplicate key is refused, not silently the last
    except yaml.YAMLError as exc:
        raise invalid(f"the device-class file is not valid YAML: {yaml_problem(exc)}") from exc
    if not isinstance(raw, dict):
        raise invalid(
            "device_class_yaml must hold a mapping with name, arch, cores, relative_speed, "
            "memory_bytes, model_storage_bytes, power and budgets"
        )
    try:
        return DeviceClass.model_validate(raw)
    except ValidationError as exc:
        raise invalid(
            f"device_class_yaml is not a valid device class: {validation_problems(exc)}"
        ) from exc


def device_class_yaml(device_class: DeviceClass) -> str:
    """The YAML text ``parse_device_class`` reads back as ``device_class``."""
    return yaml.safe_dump(device_class.model_dump(mode="json"), sort_keys=False)


def _check_fraction(value: float | None, field: str, *, zero_ok: bool) -> None:
    if value is None:
        return
    low_ok = value >= 0 if zero_ok else value > 0
    if not math.isfinite(value) or not low_ok or value > 1:
        interval = "[0, 1]" if zero_ok else "(0, 1]"
        raise invalid(f"budgets.{field} must be in {interval}, got {value}")


def apply_overrides(device_class: DeviceClass, budgets: BudgetOverrides) -> Budgeted:
    """Replace the class's budgets for one job; a bad or contradictory override is refused."""
    _check_fraction(budgets.min_fidelity, "min_fidelity", zero_ok=False)
    _check_fraction(budgets.max_accuracy_drop, "max_accuracy_drop", zero_ok=True)
    _check_fraction(budgets.max_size_ratio, "max_size_ratio", zero_ok=False)
    if budgets.max_bytes is not None and budgets.max_bytes <= 0:
        raise invalid(f"budgets.max_bytes must be > 0, got {budgets.max_bytes}")
    if budgets.p95_ms is not None and (not math.isfinite(budgets.p95_ms) or budgets.p95_ms <= 0):
        raise invalid(f"budgets.p95_ms must be a number > 0, got {budgets.p95_ms}")
    if budgets.max_bytes is not None and budgets.max_size_ratio is not None:
        raise invalid("set budgets.max_bytes or budgets.max_size_ratio, not both")
    try:
        tightened = device_class.with_budgets(
            max_artifact_bytes=budgets.max_bytes,
            p95_latency_ms=budgets.p95_ms,
            min_fidelity=budgets.min_fidelity,
            max_accuracy_drop=budgets.max_accuracy_drop,
        )
        DeviceClass.model_validate(tightened.model_dump())  # re-run the cross-field checks
    except ValidationError as exc:
        raise invalid(
            f"the budget overrides do not fit device class: {validation_problems(exc)}"
        ) from exc
    return Budgeted(tightened, budgets.max_size_ratio)


def load_calibration_file(path: Path) -> dict[str, NDArray[np.generic]]:
    """Arrays from an uploaded ``.npz``: no pickles, bounded expansion, one per input."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise invalid(
            "the calibration data is not an .npz file (numpy.savez): one array per model "
            f"input, named after it ({exc})"
        ) from exc
    if not members:
        raise invalid("the calibration .npz holds no arrays; give one per model input")
    if len(members) > MAX_CALIBRATION_ARRAYS:
        raise invalid(
            f"the calibration .npz holds {len(members)} arrays; at most "
            f"{MAX_CALIBRATION_ARRAYS} are accepted (one per model input)"
        )
    expanded = sum(m.file_size for m in members)
    limit = MAX_EXPANSION * max(path.stat().st_size, 1)
    if expanded > limit:
        raise invalid(
            f"the calibration .npz expands to {expanded} bytes, more than {MAX_EXPANSION} "
            "times its size; save it with numpy.savez (uncompressed)"
        )
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: np.asarray(archive[name]) for name in archive.files}
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise invalid(
            f"the calibration .npz cannot be read as numeric arrays (no pickled objects): {exc}"
        ) from exc


def check_calibration_file(calibration: Path, model: Path) -> int:
    """Refuse calibration arrays that do not fit the model's inputs; return the sample count."""
    arrays = load_calibration_file(calibration)
    try:
        proto = onnx.load(str(model), load_external_data=False)
    except (DecodeError, ValueError, OSError) as exc:  # it was checked when it was added
        raise invalid(f"the registered model cannot be read any more: {exc}") from exc
    try:
        return check_calibration(proto, arrays, label="calibration")
    except CalibrationMismatchError as exc:
        raise invalid(str(exc)) from exc
