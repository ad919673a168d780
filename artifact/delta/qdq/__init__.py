"""Predictable static QDQ int8 artifacts: a canonical form the edge agent can rebuild.

onnxruntime's quantizer reorders nodes and initializers, fuses, folds and annotates, so
its int8 file's graph cannot be predicted from the FP32 model it came from: the graph
was 2 KB of a 2.8 KB FP32 → int8 delta. The controller rewrites that file into a
canonical form (`analyse.analyse`, `analyse.canonical`: onnx, controller only) that
`build.build` (protobuf and the vendored ``hf_onnx_pb2`` only, both sides) reproduces
from the FP32 model and a few bytes of `decisions.Decisions`; a delta then carries the
packed decisions instead of the graph (skeleton method ZSTD_QDQ, which the agent
decodes with `build.predict`).

Modules: decisions (the dataclass and its bytes), build (FP32 + decisions → model),
wire (the bytes of the fields build lists, in C by ``_wire.c`` or in Python), analyse
(onnxruntime's model → decisions; imports onnx, so never import it on the agent).
"""
