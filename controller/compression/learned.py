"""Learned step-size quantization (LSQ): quantization-aware training whose scales are trained.

Post-training static quantization picks each scale from calibration ranges and never
looks at the loss; LSQ (Esser et al., "Learned Step Size Quantization", ICLR 2020) makes
every quantizer's step size a parameter trained with the weights, so the network learns
both the weights that round well and where to clip. Activations are asymmetric uint8
with a learned zero point too (LSQ+'s offset, rounded in the forward pass so that the
trained value is exactly the integer ONNX stores).

What is quantized: every Conv and Linear layer's weight (signed, ``weight_bits``, one
step per output channel or per tensor) and its input (uint8, one step and zero point).
BatchNorm is folded into the preceding convolution first (torch.fx), as onnxruntime's
pre-processing folds it before post-training quantization, so the weights trained are
those the artifact holds.

Export: the float model is exported as usual, then each quantized layer's node gets
``DequantizeLinear(int weights, learned steps, 0)`` for its weight and a
``QuantizeLinear``/``DequantizeLinear`` pair with the learned step and zero point on its
input. 2-, 3- and 4-bit weights are stored as ONNX INT4 (two per byte, opset 21;
onnxruntime's CPU provider runs them since 1.18; 2- and 3-bit integers keep to their
narrower ``WEIGHT_RANGES`` but take four bits each in the file, as ONNX has no narrower
type), 8-bit as INT8. At 8 bits each layer's output is quantized too (Q/DQ with the next
layer's input step where only ReLU, max pooling or reshapes lie between, else with a
learned output quantizer of its own), because onnxruntime runs QLinearConv/QGemm only on
a quantized output: PLAID's learned int8 model runs ~2x faster than its FP32 one instead
of as fast. 2-4 bit weights have no integer kernel: the artifact asks (ONNX metadata,
``artifact.runtime_hints``) for their DequantizeLinear to be folded at session load, so
they run at float speed instead of being dequantized at every call. The rest of the graph
stays float, so the onnxruntime model computes what the fake-quantized torch model
computes.

Step-size gradients are scaled by g = 1/sqrt(N·Qp) (N: elements one step serves) as in
the paper, so a step that serves many weights does not move faster than the weights.
Each step is trained as a factor of its initial value: Adam moves a parameter by about
``lr`` per update whatever its size, which would be half of a 0.002 step and 2 % of a
0.05 one; as factors every step moves by the same relative amount. 8-bit weights keep
to 7 bits (``WEIGHT_RANGES``), as onnxruntime's own reduce_range does.
Initial weight steps are the paper's 2·mean|w|/sqrt(Qp), unless max|w|/Qp rounds the
channel with less error (at 8 bits the paper's is ~6x coarser than needed); activation
steps and zero points start from calibration min/max, like post-training minmax.

``learned_quantize(..., calibrate_only=True)`` exports the quantizer at those initial
steps with no training at all: post-training quantization by the same quantizer, the
like-for-like baseline at bit widths onnxruntime's quantize_static cannot store (2, 3).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx.helper
import onnx.numpy_helper
import onnx.version_converter
import onnxruntime as ort
import torch
from numpy.typing import NDArray
from torch import nn
from torch.fx.experimental.optimization import fuse
from torch.nn import functional as F

from artifact import runtime_hints
from controller.compression import quant_graph
from controller.compression.errors import CompressionError, UnsupportedModelError
from controller.compression.recipe import LearnedQuantize
from controller.compression.training import FitResult, TrainOptions, fine_tune, threads
from controller.workloads.base import Split, TaskKind, Workload

log = logging.getLogger(__name__)

QuantLayer = nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear
_LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
# ONNX storage type per weight_bits (recipe.LEARNED_WEIGHT_BITS): below 4 bits there is
# no narrower ONNX type, so 2- and 3-bit integers are stored as INT4.
WEIGHT_TYPES = {
    2: onnx.TensorProto.INT4,
    3: onnx.TensorProto.INT4,
    4: onnx.TensorProto.INT4,
    8: onnx.TensorProto.INT8,
}
_TYPE_NAMES = {onnx.TensorProto.INT4: "int4", onnx.TensorProto.INT8: "int8"}
# Integer range per weight_bits: signed two's complement, as LSQ's Qn, Qp. 8-bit weights
# keep to 7 bits, like onnxruntime's reduce_range: onnxruntime fuses Q/DQ around a Conv
# into QLinearConv, whose u8·s8 kernel saturated with full-range weights even on this
# AVX-512 VNNI host (BasicMotions: logits 0.35 from the fake-quantized model's, against
# 0.006 with 7-bit weights).
WEIGHT_RANGES = {2: (-2, 1), 3: (-4, 3), 4: (-8, 7), 8: (-64, 63)}
INT4_OPSET = 21  # first opset with INT4 in QuantizeLinear/DequantizeLinear
MIN_STEP = 1e-8  # a step is clamped here in the forward pass and in the export alike
ACT_QN, ACT_QP = 0, 255  # uint8 activations
Exporter = Callable[[nn.Module, Path], Path]


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() forward, identity backward (straight-through estimator)."""
    return (x.round() - x).detach() + x


def _grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """x forward, gradient multiplied by g backward (LSQ's step-size gradient scale).

    Exactly x forward (x + (y - y)), not (x - x·g) + x·g, which can be x ± 1 ulp: the
    step the export stores is then exactly the step the forward pass used.
    """
    scaled = x * g
    return x.detach() + (scaled - scaled.detach())


# ------------------------------------------------------------------ fake quantizers


class WeightQuantizer(nn.Module):
    """Symmetric signed fake quantizer of a weight, one learned step per output channel."""

    def __init__(self, weight: torch.Tensor, bits: int, per_channel: bool) -> None:
        super().__init__()
        self.bits = bits
        self.qn, self.qp = WEIGHT_RANGES[bits]
        channels = weight.shape[0] if per_channel else 1
        flat = weight.detach().reshape(channels, -1)
        self.per_channel = per_channel
        self.grad_scale = 1.0 / math.sqrt(flat.shape[1] * self.qp)
        self.initial: torch.Tensor
        self.register_buffer("initial", self._initial_step(flat))
        self.relative = nn.Parameter(torch.ones_like(self.initial))

    def _initial_step(self, flat: torch.Tensor) -> torch.Tensor:
        """LSQ's 2·mean|w|/sqrt(Qp), or max|w|/Qp where that rounds with less error."""
        lsq = 2 * flat.abs().mean(dim=1) / math.sqrt(self.qp)
        maxabs = flat.abs().amax(dim=1) / self.qp
        candidates = torch.stack([lsq, maxabs]).clamp_min(MIN_STEP)  # [2, C]
        errors = torch.stack([self._error(flat, s) for s in candidates])
        return candidates.gather(0, errors.argmin(dim=0, keepdim=True))[0].clone()

    def _error(self, flat: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        s = step[:, None]
        return ((flat / s).round().clamp(self.qn, self.qp) * s - flat).pow(2).mean(dim=1)

    def scale(self) -> torch.Tensor:
        """The step per channel as the forward pass uses it (and the export stores it)."""
        return (self.initial * self.relative).clamp_min(MIN_STEP)

    def _view(self, s: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return s.reshape(-1, *([1] * (weight.ndim - 1)))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        relative = _grad_scale(self.relative, self.grad_scale)
        s = self._view((self.initial * relative).clamp_min(MIN_STEP), weight)
        return _round_ste((weight / s).clamp(self.qn, self.qp)) * s

    def integers(self, weight: torch.Tensor) -> NDArray[np.int8]:
        """The stored integers: exactly those the forward pass multiplies by the step."""
        with torch.no_grad():
            s = self._view(self.scale(), weight)
            q = (weight / s).clamp(self.qn, self.qp).round()
        return q.numpy().astype(np.int8)


class ActivationQuantizer(nn.Module):
    """Asymmetric uint8 fake quantizer of a layer's input: learned step and zero point.

    Before calibration it only records the range it sees (``observe``).
    """

    def __init__(self) -> None:
        super().__init__()
        self.initial: torch.Tensor
        self.register_buffer("initial", torch.tensor(1.0))
        self.relative = nn.Parameter(torch.tensor(1.0))
        self.zero_point = nn.Parameter(torch.tensor(0.0))
        self.grad_scale = 1.0
        self.calibrated = False
        self.low, self.high, self.features = 0.0, 0.0, 0

    def observe(self, x: torch.Tensor) -> None:
        self.low = min(self.low, float(x.min()))
        self.high = max(self.high, float(x.max()))
        self.features = int(x[0].numel())

    def initialise(self) -> None:
        """Step and zero point from the observed range (0 always representable)."""
        if self.features == 0:
            raise CompressionError("an activation quantizer saw no calibration data")
        step = max((self.high - self.low) / (ACT_QP - ACT_QN), MIN_STEP)
        zero = min(max(round(ACT_QN - self.low / step), ACT_QN), ACT_QP)
        with torch.no_grad():
            self.initial.fill_(step)
            self.zero_point.fill_(float(zero))
        self.grad_scale = 1.0 / math.sqrt(self.features * ACT_QP)
        self.calibrated = True

    def scale(self) -> float:
        return float((self.initial * self.relative).detach().clamp_min(MIN_STEP))

    def integer_zero_point(self) -> int:
        return int(self.zero_point.detach().clamp(ACT_QN, ACT_QP).round())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.calibrated:
            self.observe(x.detach())
            return x
        relative = _grad_scale(self.relative, self.grad_scale)
        s = (self.initial * relative).clamp_min(MIN_STEP)
        z = _round_ste(_grad_scale(self.zero_point, self.grad_scale).clamp(ACT_QN, ACT_QP))
        # round(x/s) + z, not round(x/s + z): QuantizeLinear's order (they differ in float)
        q = (_round_ste(x / s) + z).clamp(ACT_QN, ACT_QP)
        return (q - z) * s


class LsqLayer(nn.Module):
    """A Conv or Linear layer with its weight and its input fake-quantized, and its output
    too where no later layer's input quantizer rounds it (``output_quant``)."""

    def __init__(self, layer: QuantLayer, bits: int, per_channel: bool) -> None:
        super().__init__()
        self.layer = layer
        self.weight_quant = WeightQuantizer(layer.weight, bits, per_channel)
        self.input_quant = ActivationQuantizer()
        self.output_quant: ActivationQuantizer | None = None  # see `add_output_quantizers`
        self.quantize = True  # False: the plain float layer (what the float export sees)

    def quantizers(self) -> list[nn.Module]:
        mine: list[nn.Module] = [self.weight_quant, self.input_quant]
        return mine + ([self.output_quant] if self.output_quant is not None else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quantize:
            return self.layer(x)  # type: ignore[no-any-return]
        xq = self.input_quant(x)
        weight = self.weight_quant(self.layer.weight)
        if isinstance(self.layer, nn.Linear):
            y = F.linear(xq, weight, self.layer.bias)
        else:
            y = self.layer._conv_forward(xq, weight, self.layer.bias)
        return self.output_quant(y) if self.output_quant is not None else y


@dataclass(frozen=True)
class QatModel:
    """The fake-quantized model and its quantized layers by module path."""

    model: nn.Module
    layers: dict[str, LsqLayer]
    integer_outputs: bool = False  # layer outputs quantized too (8-bit weights; see export)

    def quantized(self, on: bool) -> None:
        for layer in self.layers.values():
            layer.quantize = on

    def steps(self) -> dict[str, tuple[NDArray[np.float32], float, int]]:
        """Per layer: (weight steps, input step, input zero point), as the export stores them."""
        return {
            name: (
                layer.weight_quant.scale().detach().numpy().copy(),
                layer.input_quant.scale(),
                layer.input_quant.integer_zero_point(),
            )
            for name, layer in self.layers.items()
        }


def prepare_qat(model: nn.Module, step: LearnedQuantize) -> QatModel:
    """A copy of ``model`` with BatchNorm folded and every Conv/Linear fake-quantized."""
    try:
        fused = fuse(copy.deepcopy(model).eval())
    except Exception as exc:  # fx tracing fails on data-dependent control flow
        raise UnsupportedModelError(
            f"learned quantization folds BatchNorm with torch.fx, which cannot trace this "
            f"model: {type(exc).__name__}: {exc}"
        ) from exc
    norms = [n for n, m in fused.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if norms:
        raise UnsupportedModelError(
            f"learned quantization folds BatchNorm into the convolution before it; {norms} "
            "follow no convolution"
        )
    targets = [(n, m) for n, m in fused.named_modules() if isinstance(m, _LAYER_TYPES)]
    if not targets:
        raise UnsupportedModelError(
            "learned quantization has nothing to quantize: the model has no Conv or Linear layer"
        )
    layers: dict[str, LsqLayer] = {}
    for name, module in targets:
        wrapped = LsqLayer(module, step.weight_bits, step.per_channel)
        parent_name, _, attr = name.rpartition(".")
        setattr(fused.get_submodule(parent_name) if parent_name else fused, attr, wrapped)
        layers[name] = wrapped
    integer_outputs = (
        step.integer_outputs and WEIGHT_TYPES[step.weight_bits] == onnx.TensorProto.INT8
    )
    if integer_outputs:
        add_output_quantizers(fused, layers)
    return QatModel(fused, layers, integer_outputs)


# torch ops and modules between two quantized layers that commute with uniform
# quantization (see `quantize_outputs`, which finds the same chains in the ONNX graph)
_COMMUTING_CALLS: frozenset[object] = frozenset(
    {F.relu, torch.relu, torch.flatten, F.max_pool1d, F.max_pool2d, "relu", "flatten", "view"}
    | {"reshape", "squeeze", "unsqueeze"}
)
_COMMUTING_MODULES = (nn.ReLU, nn.Flatten, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)


def add_output_quantizers(model: nn.Module, layers: Mapping[str, LsqLayer]) -> None:
    """An output quantizer on each layer whose output reaches something other than a
    later quantized layer's input (through ops that commute with quantization).

    onnxruntime runs a layer on integers only when its output is quantized as well
    (QLinearConv, QGemm); where the next quantized layer's input quantizer rounds the
    output anyway, the export reuses that one (`quantize_outputs`), elsewhere (before a
    mean, an add, a branch) the layer needs its own. The model's last layers, whose
    outputs are the model's outputs (logits), stay float.
    """
    if not isinstance(model, torch.fx.GraphModule):
        return  # not traced: every output stays float (correct, only slower)
    modules = dict(model.named_modules())

    def is_layer(node: torch.fx.Node) -> bool:
        return node.op == "call_module" and isinstance(modules.get(str(node.target)), LsqLayer)

    def commutes(node: torch.fx.Node) -> bool:
        if node.op == "call_module":
            return isinstance(modules.get(str(node.target)), _COMMUTING_MODULES)
        return node.op in ("call_function", "call_method") and node.target in _COMMUTING_CALLS

    def feeds_a_layer(node: torch.fx.Node) -> bool:
        """Whether some quantized layer is downstream of ``node``."""
        seen, todo = set(), list(node.users)
        while todo:
            user = todo.pop()
            if is_layer(user):
                return True
            if user not in seen:
                seen.add(user)
                todo += list(user.users)
        return False

    for node in model.graph.nodes:
        if not is_layer(node) or not feeds_a_layer(node):
            continue  # not a layer, or a last one: its output stays float
        current = node
        while len(current.users) == 1:
            (user,) = current.users
            if is_layer(user):
                break  # that layer's input quantizer rounds this output
            if not commutes(user):
                modules[str(node.target)].output_quant = ActivationQuantizer()
                break
            current = user
        else:  # the output branches: quantize it once, where it leaves the layer
            modules[str(node.target)].output_quant = ActivationQuantizer()


def calibrate(qat: QatModel, inputs: Mapping[str, NDArray[np.generic]], batch: int = 64) -> None:
    """Initial activation steps and zero points from the inputs' ranges at every layer."""
    arrays = [torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for a in inputs.values()]
    if not arrays or len(arrays[0]) == 0:
        raise CompressionError("learned quantization needs calibration inputs; none were given")
    qat.model.eval()
    with torch.no_grad():
        for start in range(0, len(arrays[0]), batch):
            qat.model(*(a[start : start + batch] for a in arrays))
    unused = [name for name, layer in qat.layers.items() if layer.input_quant.features == 0]
    if unused:
        raise UnsupportedModelError(f"layers {unused} never ran on the calibration inputs")
    for layer in qat.layers.values():
        layer.input_quant.initialise()
        if layer.output_quant is not None:
            layer.output_quant.initialise()


# ------------------------------------------------------------------ export


@dataclass(frozen=True)
class _Match:
    layer: str
    transposed: bool  # the ONNX weight is the torch weight transposed (MatMul, Gemm transB=0)


def _match_weight(
    array: NDArray[np.generic], floats: dict[str, NDArray[np.float32]]
) -> _Match | None:
    for name, weight in floats.items():
        if array.shape == weight.shape and np.array_equal(array, weight):
            return _Match(name, False)
        if array.ndim == 2 and array.shape == weight.T.shape and np.array_equal(array, weight.T):
            return _Match(name, True)
    return None


def _initializer(name: str, values: NDArray[np.generic], data_type: int) -> onnx.TensorProto:
    if data_type == onnx.TensorProto.INT4:  # two per byte, first in the low nibble
        nibbles = (values.reshape(-1).astype(np.int8) & 0x0F).astype(np.uint8)
        if len(nibbles) % 2:
            nibbles = np.append(nibbles, np.uint8(0))
        packed = nibbles[0::2] | (nibbles[1::2] << 4)
        return onnx.helper.make_tensor(
            name, data_type, list(values.shape), packed.tobytes(), raw=True
        )
    return onnx.numpy_helper.from_array(values, name)


def insert_qdq(float_onnx: onnx.ModelProto, qat: QatModel) -> onnx.ModelProto:
    """``float_onnx`` with each quantized layer's learned Q/DQ nodes around its node.

    Layers are found by their float weight's values (the export leaves them bit-exact);
    a layer found in no node is refused, since its quantization would silently vanish.
    """
    bits = next(iter(qat.layers.values())).weight_quant.bits
    weight_type = WEIGHT_TYPES[bits]
    model = copy.deepcopy(float_onnx)
    if weight_type == onnx.TensorProto.INT4 and model.opset_import[0].version < INT4_OPSET:
        model = onnx.version_converter.convert_version(model, INT4_OPSET)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    floats = {n: lay.layer.weight.detach().numpy() for n, lay in qat.layers.items()}
    done: dict[str, str] = {}  # float weight initializer -> its DequantizeLinear output
    found: set[str] = set()
    nodes: list[onnx.NodeProto] = []
    layer_nodes: list[tuple[onnx.NodeProto, LsqLayer]] = []  # quantized Conv/Gemm/MatMul
    new_inits: list[onnx.TensorProto] = []
    for node in graph.node:
        weight_name = node.input[1] if len(node.input) > 1 else ""
        if node.op_type not in ("Conv", "Gemm", "MatMul") or weight_name not in inits:
            nodes.append(node)
            continue
        match = _match_weight(onnx.numpy_helper.to_array(inits[weight_name]), floats)
        if match is None:
            nodes.append(node)
            continue
        if node.op_type == "Gemm" and any(a.name == "transA" and a.i for a in node.attribute):
            raise UnsupportedModelError(f"Gemm {node.name} transposes its input (transA)")
        layer = qat.layers[match.layer]
        found.add(match.layer)
        prefix = f"lsq/{match.layer}"
        if weight_name not in done:
            w = layer.layer.weight.detach()
            ints = layer.weight_quant.integers(w)
            ints = ints.T if match.transposed else ints
            scales = layer.weight_quant.scale().detach().numpy().astype(np.float32)
            channels = scales.shape[0]
            per_axis = layer.weight_quant.per_channel
            zeros = np.zeros(channels if per_axis else (), dtype=np.int8)
            new_inits += [
                _initializer(f"{prefix}/weight_q", ints, weight_type),
                onnx.numpy_helper.from_array(
                    scales if per_axis else scales.reshape(()), f"{prefix}/weight_scale"
                ),
                _initializer(f"{prefix}/weight_zero_point", zeros, weight_type),
            ]
            dq = onnx.helper.make_node(
                "DequantizeLinear",
                [f"{prefix}/weight_q", f"{prefix}/weight_scale", f"{prefix}/weight_zero_point"],
                [f"{prefix}/weight"],
                name=f"{prefix}/weight_dq",
            )
            if per_axis:
                dq.attribute.append(
                    onnx.helper.make_attribute("axis", 1 if match.transposed else 0)
                )
            nodes.append(dq)
            done[weight_name] = f"{prefix}/weight"
        act = f"{prefix}/{node.name.lstrip('/') or len(nodes)}"
        new_inits += [
            onnx.numpy_helper.from_array(
                np.array(layer.input_quant.scale(), dtype=np.float32), f"{act}/input_scale"
            ),
            onnx.numpy_helper.from_array(
                np.array(layer.input_quant.integer_zero_point(), dtype=np.uint8),
                f"{act}/input_zero_point",
            ),
        ]
        scale_zp = [f"{act}/input_scale", f"{act}/input_zero_point"]
        nodes += [
            onnx.helper.make_node(
                "QuantizeLinear", [node.input[0], *scale_zp], [f"{act}/input_q"], name=f"{act}/q"
            ),
            onnx.helper.make_node(
                "DequantizeLinear",
                [f"{act}/input_q", *scale_zp],
                [f"{act}/input"],
                name=f"{act}/dq",
            ),
        ]
        node.input[0] = f"{act}/input"
        node.input[1] = done[weight_name]
        nodes.append(node)
        layer_nodes.append((node, layer))
    missing = sorted(set(qat.layers) - found)
    if missing:
        raise CompressionError(
            f"learned quantization found no ONNX node for layers {missing}: the export "
            "changed their weights"
        )
    if qat.integer_outputs:
        nodes, output_inits = quantize_outputs(nodes, layer_nodes)
        new_inits += output_inits
    still_used = {i for n in nodes for i in n.input}
    kept = [t for t in graph.initializer if t.name in still_used]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    if weight_type == onnx.TensorProto.INT4:  # no integer kernel: fold the weights at load
        hint = runtime_hints.encode(runtime_hints.FOLD_WEIGHT_DEQUANTIZE)
        onnx.helper.set_model_props(
            model,
            {
                **{p.key: p.value for p in model.metadata_props},
                runtime_hints.METADATA_KEY: hint,
            },
        )
    onnx.checker.check_model(model)
    return model


# Ops between a quantized layer's output and the next quantized layer's input that
# commute with uniform quantization (q(op(x)) == op(q(x)) for a scale > 0 and an integer
# zero point in range): Relu maps the zero point to itself, pooling by max and reshaping
# only reorder or select values.
_COMMUTING = frozenset({"Relu", "MaxPool", "Flatten", "Reshape", "Squeeze", "Unsqueeze"})


def quantize_outputs(
    nodes: list[onnx.NodeProto], layers: list[tuple[onnx.NodeProto, LsqLayer]]
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Q/DQ on each quantized layer's output: ``nodes`` with them, and their parameters.

    onnxruntime runs a Conv/Gemm/MatMul on integers (QLinearConv, QGemm,
    QLinearMatMul) only when its output is quantized too; with DequantizeLinear inputs
    alone it dequantizes the weights and runs the float kernel. A layer with its own
    output quantizer (`add_output_quantizers`) gets its learned step and zero point.
    Otherwise, where the output reaches the next quantized layer's input quantizer
    through ops that commute with quantization (``_COMMUTING``), that quantizer already
    rounds it: quantizing right at the output with the same step and zero point computes
    exactly what the fake-quantized model computes, and the next layer's own Q/DQ
    re-quantizes integers it leaves unchanged. Other outputs (the logits) stay float.
    """
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in nodes:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    input_params = {  # the tensors our input quantizers read: their (scale, zero point)
        n.input[0]: (n.input[1], n.input[2])
        for n in nodes
        if n.op_type == "QuantizeLinear" and n.name.startswith("lsq/")
    }
    inserted: dict[int, list[onnx.NodeProto]] = {}
    inits: list[onnx.TensorProto] = []
    for layer_node, layer in layers:
        out = layer_node.output[0]
        prefix = f"lsq/output/{layer_node.name.lstrip('/') or out}"
        users = consumers.get(out, [])
        if layer.output_quant is not None:
            scale, zero_point = f"{prefix}/scale", f"{prefix}/zero_point"
            inits += [
                onnx.numpy_helper.from_array(
                    np.array(layer.output_quant.scale(), dtype=np.float32), scale
                ),
                onnx.numpy_helper.from_array(
                    np.array(layer.output_quant.integer_zero_point(), dtype=np.uint8),
                    zero_point,
                ),
            ]
        else:
            tensor = out
            while tensor not in input_params:
                after = consumers.get(tensor, [])
                if len(after) != 1 or after[0].op_type not in _COMMUTING:
                    break
                tensor = after[0].output[0]
            if tensor not in input_params or len(users) != 1:
                continue
            scale, zero_point = input_params[tensor]
        quantized, dequantized = f"{prefix}/q_out", f"{prefix}/dq_out"
        inserted[id(layer_node)] = [
            onnx.helper.make_node(
                "QuantizeLinear", [out, scale, zero_point], [quantized], name=f"{prefix}/q"
            ),
            onnx.helper.make_node(
                "DequantizeLinear",
                [quantized, scale, zero_point],
                [dequantized],
                name=f"{prefix}/dq",
            ),
        ]
        for user in users:
            user.input[list(user.input).index(out)] = dequantized
    ordered: list[onnx.NodeProto] = []
    for node in nodes:
        ordered += [node, *inserted.get(id(node), [])]
    return ordered, inits


# ------------------------------------------------------------------ the step


@dataclass(frozen=True)
class LayerSteps:
    """One layer's quantization parameters before and after training."""

    layer: str
    initial_weight_step: NDArray[np.float32]
    weight_step: NDArray[np.float32]
    initial_input_step: float
    input_step: float
    initial_input_zero_point: int
    input_zero_point: int


@dataclass(frozen=True)
class LearnedResult:
    out: Path
    bytes: int
    weight_type: str  # "int4" or "int8": what the artifact stores (2 and 3 bits: int4)
    layers: tuple[LayerSteps, ...]
    fit: FitResult | None  # None: calibrate_only, the steps were never trained
    max_output_diff: float  # onnxruntime vs the fake-quantized torch model, calibration inputs


def calibrated_qat(
    model: nn.Module,
    step: LearnedQuantize,
    calibration: Mapping[str, NDArray[np.generic]],
    *,
    intra_op_threads: int | None = 1,
) -> QatModel:
    """A fake-quantized copy of ``model`` at its initial steps: weight steps from the
    weights (module docstring), activation steps and zero points from ``calibration``.

    Exported as it is, this is post-training quantization by the same quantizer that
    ``train_learned`` then trains: the like-for-like baseline of learned step sizes.
    """
    with threads(intra_op_threads):
        qat = prepare_qat(model, step)
        calibrate(qat, calibration)
    return qat


def train_learned(
    model: nn.Module,
    step: LearnedQuantize,
    train: Split,
    val: Split | None,
    calibration: Mapping[str, NDArray[np.generic]],
    *,
    options: TrainOptions | None = None,
) -> tuple[QatModel, dict[str, tuple[NDArray[np.float32], float, int]], FitResult]:
    """Fold, fake-quantize, calibrate and QAT-train a copy of ``model``.

    Returns the trained QAT model, the parameters it started from, and the fit.
    """
    options = dataclasses.replace(options or TrainOptions(), lr=step.lr)
    qat = calibrated_qat(model, step, calibration, intra_op_threads=options.threads)
    if step.train == "steps":  # the weights stay: only the quantizers' parameters learn
        quantizers = {
            id(p)
            for layer in qat.layers.values()
            for q in layer.quantizers()
            for p in q.parameters()
        }
        for param in qat.model.parameters():
            param.requires_grad_(id(param) in quantizers)
    initial = qat.steps()
    fit = fine_tune(
        qat.model,
        train,
        epochs=step.epochs,
        options=options,
        val=val,
        label=f"learned quantization (w{step.weight_bits}a{step.activation_bits}"
        + (")" if qat.integer_outputs or step.weight_bits != 8 else ", float outputs)"),
    )
    return qat, initial, fit


def export_learned(
    qat: QatModel,
    export: Exporter,
    out: Path,
    calibration: Mapping[str, NDArray[np.generic]],
) -> float:
    """Write the QDQ model to ``out`` (atomically); returns its largest output difference
    from the fake-quantized torch model on ``calibration``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        float_path = Path(tmp) / "float.onnx"
        qat.quantized(False)
        try:
            export(qat.model, float_path)
        finally:
            qat.quantized(True)
        qdq = insert_qdq(onnx.load(str(float_path)), qat)
        target = Path(tmp) / "learned.onnx"
        onnx.save(qdq, str(target))
        quant_graph.verify_result(target, float_path, "the learned-quantization model")
        diff = _output_diff(target, qat, calibration)
        quant_graph.publish(target, out)
    return diff


def _output_diff(path: Path, qat: QatModel, inputs: Mapping[str, NDArray[np.generic]]) -> float:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in inputs.items()}
    got = np.asarray(session.run(None, feeds)[0])
    qat.model.eval()
    with torch.no_grad():
        want = qat.model(*(torch.from_numpy(v) for v in feeds.values())).numpy()
    return float(np.abs(got - want).max())


def learned_quantize(
    workload: Workload,
    model: nn.Module,
    step: LearnedQuantize,
    out: Path,
    *,
    options: TrainOptions | None = None,
    calibrate_only: bool = False,
) -> LearnedResult:
    """QAT ``model`` with learned step sizes on ``workload``'s train split; QDQ ONNX at ``out``.

    With ``calibrate_only`` nothing trains (``step.epochs``, ``lr`` and ``train`` are
    unused): the quantizer is exported at its calibrated initial steps, post-training
    quantization by the same quantizer (``calibrated_qat``), and ``fit`` is None.
    Progress over epochs shows when ``options.show_progress``; ``model`` is not modified.
    """
    calibration = workload.calibration_inputs()
    fit: FitResult | None = None
    if calibrate_only:
        threads_used = (options or TrainOptions()).threads
        qat = calibrated_qat(model, step, calibration, intra_op_threads=threads_used)
        initial = qat.steps()
    else:
        if workload.kind is not TaskKind.CLASSIFICATION:
            raise UnsupportedModelError(
                f"learned quantization trains on labels; {workload.name} is {workload.kind.value}"
            )
        data = workload.data()
        qat, initial, fit = train_learned(
            model, step, data.train, data.val, calibration, options=options
        )
    with threads(1):
        diff = export_learned(qat, workload.export_onnx, out, calibration)
    final = qat.steps()
    layers = tuple(
        LayerSteps(
            name,
            initial[name][0],
            final[name][0],
            initial[name][1],
            final[name][1],
            initial[name][2],
            final[name][2],
        )
        for name in qat.layers
    )
    size = out.stat().st_size
    val = fit.val_accuracy if fit is not None and fit.val_accuracy is not None else float("nan")
    log.info(
        "%s quantization w%d: %s (%d bytes), val %.3f, onnx/torch diff %.2e",
        "calibrated (untrained)" if calibrate_only else "learned",
        step.weight_bits,
        out,
        size,
        val,
        diff,
    )
    weight_type = _TYPE_NAMES[WEIGHT_TYPES[step.weight_bits]]
    return LearnedResult(out, size, weight_type, layers, fit, diff)
