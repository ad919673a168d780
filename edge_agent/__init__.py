"""The device side of HomeFleet: keep the assigned models on this device and serve them.

It registers with the controller, watches the desired artifact per model, fetches and
verifies it, loads it into onnxruntime beside the one it serves, switches only after a
self-test, and answers local inference calls. It never imports torch or onnx: a home
device cannot carry the training stack.
"""

from __future__ import annotations

from importlib import metadata

try:
    __version__ = metadata.version("homefleet")
except metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"
