"""Calibration data: checked against the model's inputs up front, then fed in batches.

Arrays are keyed by input name with the samples on axis 0 (the layout of
``Split.inputs``); each array has the rank of its input. A mismatch is refused before
any work starts, naming the input and what the model expects, because onnxruntime's
own failure comes from deep inside a calibration run and names neither.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import onnx.helper
from numpy.typing import NDArray
from onnxruntime.quantization import CalibrationDataReader

from controller.compression.errors import CalibrationMismatchError

Calibration = Mapping[str, NDArray[np.generic]]
DEFAULT_BATCH = 16


@dataclass(frozen=True)
class InputSpec:
    """One graph input: numpy dtype and dims (an int when static, a name or None when not)."""

    name: str
    dtype: np.dtype[np.generic]
    dims: tuple[int | str | None, ...]

    def describe(self) -> str:
        shape = ", ".join("?" if d is None else str(d) for d in self.dims)
        return f"{self.dtype.name}[{shape}]"


def input_specs(model: onnx.ModelProto) -> tuple[InputSpec, ...]:
    """The graph inputs a caller must feed (initializers listed as inputs excluded)."""
    initializers = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        if value.type.WhichOneof("value") != "tensor_type":
            raise CalibrationMismatchError(
                f"model input {value.name!r} is not a tensor; only tensor inputs can be calibrated"
            )
        tensor = value.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type))
        dims: list[int | str | None] = []
        for dim in tensor.shape.dim:
            if dim.HasField("dim_value") and dim.dim_value > 0:
                dims.append(int(dim.dim_value))
            elif dim.HasField("dim_param"):
                dims.append(dim.dim_param)
            else:
                dims.append(None)
        specs.append(InputSpec(value.name, dtype, tuple(dims)))
    return tuple(specs)


def check_calibration(
    model: onnx.ModelProto, calibration: Calibration, *, label: str = "calibration"
) -> int:
    """Refuse arrays that do not fit the model's inputs; return the number of samples.

    Checks names (missing and unknown), dtype, rank, every static dim after axis 0,
    axis 0 (the sample axis) against a static batch size, symbolic dims shared between
    inputs, equal sample counts and finite values.
    """
    specs = {s.name: s for s in input_specs(model)}
    expected = ", ".join(f"{n}: {s.describe()}" for n, s in specs.items())
    missing = [n for n in specs if n not in calibration]
    if missing:
        found = sorted(calibration) or "none"
        raise CalibrationMismatchError(
            f"{label} has no array for model input(s) {missing} (arrays found: {found}); the "
            f"model expects {expected}"
        )
    unknown = [n for n in calibration if n not in specs]
    if unknown:
        raise CalibrationMismatchError(
            f"{label} has array(s) {unknown} that are not model inputs; "
            f"the model expects {expected}"
        )
    counts: dict[str, int] = {}
    symbolic: dict[str, tuple[str, int]] = {}
    for name, spec in specs.items():
        array = np.asarray(calibration[name])
        where = f"{label}[{name!r}] (shape {list(array.shape)}, {array.dtype.name})"
        if array.dtype != spec.dtype:
            raise CalibrationMismatchError(
                f"{where}: model input {name!r} expects dtype {spec.dtype.name} "
                f"({spec.describe()}); convert the array with .astype(np.{spec.dtype.name})"
            )
        if array.ndim != len(spec.dims):
            raise CalibrationMismatchError(
                f"{where}: model input {name!r} expects rank {len(spec.dims)} "
                f"({spec.describe()}), samples on axis 0"
            )
        if array.ndim == 0 or array.shape[0] == 0:
            raise CalibrationMismatchError(f"{where}: needs at least one sample on axis 0")
        for axis, (size, dim) in enumerate(zip(array.shape, spec.dims, strict=True)):
            if axis == 0:
                if isinstance(dim, int) and size % dim:
                    raise CalibrationMismatchError(
                        f"{where}: model input {name!r} has a static batch of {dim} on axis 0; "
                        f"give a multiple of {dim} samples"
                    )
                continue
            if isinstance(dim, int) and size != dim:
                raise CalibrationMismatchError(
                    f"{where}: model input {name!r} expects {dim} on axis {axis} "
                    f"({spec.describe()})"
                )
            if isinstance(dim, str):
                seen = symbolic.setdefault(dim, (name, size))
                if seen[1] != size:
                    raise CalibrationMismatchError(
                        f"{where}: axis {axis} is {size} but {seen[0]!r} gives {seen[1]} "
                        f"for the same dimension {dim!r}"
                    )
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            raise CalibrationMismatchError(f"{where}: holds NaN or infinite values")
        counts[name] = int(array.shape[0])
    if len(set(counts.values())) > 1:
        raise CalibrationMismatchError(
            f"{label} arrays hold different numbers of samples on axis 0: {counts}"
        )
    return next(iter(counts.values()), 0)


def batch_size(model: onnx.ModelProto) -> int:
    """Samples per calibration batch: the static batch if the model has one, else a default."""
    static = {s.dims[0] for s in input_specs(model) if s.dims and isinstance(s.dims[0], int)}
    if len(static) > 1:
        raise CalibrationMismatchError(f"model inputs have different static batch sizes {static}")
    return static.pop() if static else DEFAULT_BATCH


class DictCalibrationReader(CalibrationDataReader):  # type: ignore[misc]
    """Feeds checked calibration arrays to onnxruntime's calibrators, ``batch`` at a time."""

    def __init__(self, calibration: Calibration, batch: int) -> None:
        self._calibration = {k: np.asarray(v) for k, v in calibration.items()}
        self._batch = batch
        self._batches = self._iterate()

    def _iterate(self) -> Iterator[dict[str, NDArray[np.generic]]]:
        total = len(next(iter(self._calibration.values())))
        for start in range(0, total, self._batch):
            yield {k: v[start : start + self._batch] for k, v in self._calibration.items()}

    def get_next(self) -> dict[str, NDArray[np.generic]] | None:
        return next(self._batches, None)

    def rewind(self) -> None:
        self._batches = self._iterate()
