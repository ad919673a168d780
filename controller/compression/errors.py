"""Errors the compression code raises: a bad request, never a bug.

``ValueError`` subclasses, so callers that validate input can catch one type; the
message names the layer, operator, input or parameter that was wrong.
"""

from __future__ import annotations

from pathlib import Path


class CompressionError(ValueError):
    """A compression step cannot run on this input as asked."""


class UnsupportedModelError(CompressionError):
    """The model has nothing this technique can work on (names the layer or operator)."""


class CalibrationMismatchError(CompressionError):
    """Calibration arrays do not match the model's inputs (names, shapes or dtypes)."""


def check_out_dir(out_dir: Path) -> None:
    """--out must be new or an empty directory: a result never mixes with older files."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise CompressionError(f"--out {out_dir} exists and is not empty; name a new directory")
