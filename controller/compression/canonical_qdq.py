"""Static QDQ int8 files in the canonical form a device can rebuild from its FP32 model.

Why: onnxruntime's quantizer reorders nodes, folds constants and adds value_info, so
its int8 file cannot be predicted from the FP32 model it came from, and a device that
already holds that FP32 model would have to receive the whole int8 graph. The canonical
form (artifact/delta/qdq) is rebuilt exactly from the FP32 model plus a few bytes of
decisions, so the int8 version travels as a small delta (PLAID: ~930 B instead of 2.8 KB).

What is checked before the canonical bytes replace onnxruntime's file: ``analyse``
explains every node and initializer of onnxruntime's file in terms of the FP32 model
(else ``NotCanonical``), ``build`` makes the bytes, and on every calibration input
(batched as calibration feeds them) the canonical model's outputs equal onnxruntime's
file's bit for bit, both run by onnxruntime on one thread with its default
optimisations. Anything else keeps onnxruntime's file and logs one line saying why.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from numpy.typing import NDArray

from artifact.delta.qdq.analyse import NotCanonical, analyse
from artifact.delta.qdq.build import build
from artifact.files import atomic_write_bytes
from controller.compression.calibration import (
    DictCalibrationReader,
    batch_size,
    check_calibration,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CanonicalResult:
    """What ``canonicalize`` left at ``out``."""

    out: Path
    canonical: bool  # True: the canonical form; False: onnxruntime's file, unchanged
    reason: str  # why onnxruntime's file was kept ("" when canonical)
    bytes: int  # of the file at ``out``
    onnxruntime_bytes: int  # of onnxruntime's file
    samples_compared: int  # calibration samples whose outputs were compared (0: same bytes)


class _Kept(Exception):
    """onnxruntime's file stays; the message says why."""


def canonicalize(
    int8_path: Path,
    fp32_path: Path,
    calibration: Mapping[str, NDArray[np.generic]],
    out: Path,
) -> CanonicalResult:
    """Write the canonical form of onnxruntime's static QDQ file ``int8_path`` to ``out``
    when it runs bit-identically on ``calibration``; otherwise onnxruntime's bytes.

    ``fp32_path``: the float model onnxruntime quantized, as devices hold it (the
    reference of the decisions). ``out`` may be ``int8_path`` (replaced atomically).
    ``calibration`` that does not fit the model is refused (CalibrationMismatchError).
    """
    int8_path, fp32_path, out = Path(int8_path), Path(fp32_path), Path(out)
    original = int8_path.read_bytes()
    int8 = onnx.load_from_string(original)
    samples = check_calibration(int8, calibration)
    try:
        data = _canonical_bytes(int8, fp32_path)
        compared = 0 if data == original else _compare(int8, original, data, calibration)
    except _Kept as exc:
        log.info("kept onnxruntime's int8 file %s: %s", int8_path.name, exc)
        if out.resolve() != int8_path.resolve():
            atomic_write_bytes(out, original)
        return CanonicalResult(out, False, str(exc), len(original), len(original), 0)
    if out.resolve() != int8_path.resolve() or data != original:
        atomic_write_bytes(out, data)
    log.debug(
        "canonical int8 file %s: %d bytes (onnxruntime's: %d), outputs equal on %d of %d samples",
        out.name,
        len(data),
        len(original),
        compared,
        samples,
    )
    return CanonicalResult(out, True, "", len(data), len(original), compared)


def _canonical_bytes(int8: onnx.ModelProto, fp32_path: Path) -> bytes:
    fp32_bytes = fp32_path.read_bytes()
    try:
        fp32 = onnx.load_from_string(fp32_bytes)
    except Exception as exc:
        raise _Kept(f"the FP32 model {fp32_path.name} does not parse ({exc})") from exc
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in fp32.graph.initializer):
        raise _Kept("the FP32 model keeps weights in external data files")
    try:
        analysis = analyse(int8, fp32)
        return build(fp32_bytes, analysis.decisions, analysis.values)
    except NotCanonical as exc:
        raise _Kept(f"not canonical: {exc}") from exc
    except Exception as exc:  # a model nobody tried: onnxruntime's file is still good
        raise _Kept(f"canonical form failed ({type(exc).__name__}: {exc})") from exc


def _session(data: bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def _compare(
    int8: onnx.ModelProto,
    original: bytes,
    data: bytes,
    calibration: Mapping[str, NDArray[np.generic]],
) -> int:
    """Samples run; raises _Kept at the first output that is not bit-identical."""
    try:
        reference, candidate = _session(original), _session(data)
    except Exception as exc:
        raise _Kept(f"onnxruntime cannot load the canonical model ({exc})") from exc
    names = [o.name for o in reference.get_outputs()]
    if [o.name for o in candidate.get_outputs()] != names:
        raise _Kept("the canonical model's outputs are not onnxruntime's file's")
    reader = DictCalibrationReader(calibration, batch_size(int8))
    samples = 0
    while (feeds := reader.get_next()) is not None:
        count = len(next(iter(feeds.values())))
        try:
            want, got = reference.run(None, feeds), candidate.run(None, feeds)
        except Exception as exc:
            raise _Kept(f"onnxruntime cannot run the canonical model ({exc})") from exc
        for name, a, b in zip(names, want, got, strict=True):
            x, y = np.asarray(a), np.asarray(b)
            if x.dtype != y.dtype or x.shape != y.shape:
                raise _Kept(
                    f"output {name!r} is {y.dtype}{list(y.shape)}, not {x.dtype}{list(x.shape)}"
                )
            if x.tobytes() != y.tobytes():
                raise _Kept(
                    f"output {name!r} differs from onnxruntime's file's in "
                    f"{int(np.count_nonzero(x != y))} value(s) of calibration samples "
                    f"{samples}-{samples + count - 1}"
                )
        samples += count
    return samples
