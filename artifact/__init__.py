"""What the controller and the edge agents must agree on byte for byte.

Manifests and their canonical JSON, digests, names, signing, atomic file writes, and the
model-aware delta codec (artifact.delta; `homefleet artifact diff|patch` in artifact.cli).
Imports neither side, no gRPC server, no torch and no onnx: the edge agent loads it.
"""
