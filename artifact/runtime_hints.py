"""onnxruntime session settings an artifact asks for, carried in its own ONNX metadata.

Why: onnxruntime leaves a DequantizeLinear of a constant weight unfolded, so that it can
fuse Q/DQ groups into integer kernels. A Conv with INT4 weights has no integer kernel,
so the weights are dequantized again at every call: PLAID's learned 4-bit model ran at
0.54 ms against FP32's 0.27. With ``session.disable_quant_qdq`` the dequantization is
folded once at load (0.29 ms). Only the artifact knows which case it is, so the
compression step that makes it writes the setting into the model's ``metadata_props``
(covered by the artifact's sha256 and signed manifest), and every place that runs it —
the planner's measurements and the edge agent — applies the same settings. Keys outside
``ALLOWED`` are ignored with a warning: an artifact cannot turn on arbitrary behaviour.
"""

from __future__ import annotations

import json
import logging
import mmap
from collections.abc import Mapping
from pathlib import Path

from artifact.delta.onnx_wire import model_metadata

log = logging.getLogger(__name__)

METADATA_KEY = "homefleet.session_config"
FOLD_WEIGHT_DEQUANTIZE = {"session.disable_quant_qdq": "1"}
ALLOWED: Mapping[str, frozenset[str]] = {"session.disable_quant_qdq": frozenset({"0", "1"})}


class InvalidHintError(ValueError):
    """A session setting outside ``ALLOWED``."""


def encode(config: Mapping[str, str]) -> str:
    """The metadata value for ``config``; InvalidHintError names what is not allowed."""
    for key, value in config.items():
        if value not in ALLOWED.get(key, frozenset()):
            allowed = ", ".join(f"{k} in {sorted(v)}" for k, v in ALLOWED.items())
            raise InvalidHintError(f"session setting {key}={value!r} is not one of: {allowed}")
    return json.dumps(dict(sorted(config.items())), separators=(",", ":"))


def session_config(model: bytes | memoryview) -> dict[str, str]:
    """The allowed session settings ``model`` (ONNX bytes) asks for; {} when none."""
    raw = model_metadata(model).get(METADATA_KEY)
    if raw is None:
        return {}
    try:
        asked = json.loads(raw)
    except ValueError:
        log.warning("ignoring %s: not JSON (%.60r)", METADATA_KEY, raw)
        return {}
    if not isinstance(asked, dict):
        log.warning("ignoring %s: not a JSON object", METADATA_KEY)
        return {}
    config = {}
    for key, value in asked.items():
        if isinstance(value, str) and value in ALLOWED.get(key, frozenset()):
            config[key] = value
        else:
            log.warning("ignoring session setting %s=%.40r: not allowed", key, value)
    return config


def session_config_of_file(path: Path) -> dict[str, str]:
    """`session_config` of an ONNX file, read through a memory map (no copy)."""
    with open(path, "rb") as f:
        if f.seek(0, 2) == 0:
            return {}
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            view = memoryview(mapped)
            try:
                return session_config(view)
            finally:
                view.release()
