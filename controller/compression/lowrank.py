"""Low-rank decomposition: replace a layer by a chain of thinner ones with fewer parameters.

Trained weight matrices are close to low rank: most of their "energy" (sum of squared
singular values) sits in a few directions. Keeping the directions that carry a given
fraction of it reproduces the layer closely with fewer parameters and multiply-adds:

- Linear (outxin) → Linear(in→r) · Linear(r→out) by truncated SVD: r·(in+out) weights.
- Conv → Tucker-2 (``tensorly.decomposition.partial_tucker`` on the output/input channel
  modes): 1x1 conv (in→r_in), the core conv (r_in→r_out, original kernel, stride and
  padding), 1x1 conv (r_out→out).
- Conv → CP (``tensorly.decomposition.parafac``, Lebedev et al. 2015): 1x1 conv
  (in→r), depthwise conv per kernel axis, 1x1 conv (r→out).

Ranks come from the energy of the channel-mode unfoldings' singular values (optionally
capped by a per-layer parameter budget); a layer is only replaced when that shrinks it.
The decomposed model is then fine-tuned. The caller's model is never modified.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from tensorly.decomposition import parafac, partial_tucker
from torch import nn

from controller.compression.errors import CompressionError, UnsupportedModelError
from controller.compression.recipe import LowRank
from controller.compression.training import (
    TrainOptions,
    example_inputs,
    executed_layers,
    fine_tune,
)
from controller.workloads.base import Split

log = logging.getLogger(__name__)

_ENERGY_TOLERANCE = 1e-9  # float rounding must not turn "all the energy" into "full rank"


@dataclass(frozen=True)
class LayerReport:
    name: str
    layer: str  # the original module type, e.g. "Linear", "Conv1d"
    method: str  # "svd" | "tucker" | "cp" | "skipped"
    ranks: tuple[int, ...]
    params_before: int
    params_after: int
    reason: str = ""  # why a layer was skipped


@dataclass(frozen=True)
class LowRankResult:
    model: nn.Module
    layers: tuple[LayerReport, ...]
    params_before: int
    params_after: int

    @property
    def decomposed(self) -> tuple[LayerReport, ...]:
        return tuple(r for r in self.layers if r.method != "skipped")


def energy_rank(singular_values: NDArray[np.floating], energy: float) -> int:
    """Smallest r whose top-r squared singular values hold ``energy`` of the total (>= 1)."""
    sq = np.square(np.asarray(singular_values, dtype=np.float64))
    total = float(sq.sum())
    if total == 0.0:
        return 1
    kept = np.cumsum(sq) / total
    first = int(np.searchsorted(kept, energy - _ENERGY_TOLERANCE))
    return min(len(sq), first + 1)


def _unfolding_rank(weight: NDArray[np.float64], mode: int, energy: float) -> int:
    unfolded = np.moveaxis(weight, mode, 0).reshape(weight.shape[mode], -1)
    return energy_rank(np.linalg.svd(unfolded, compute_uv=False), energy)


def _params(layer: nn.Module) -> int:
    return sum(p.numel() for p in layer.parameters())


_Layer = nn.Linear | nn.Conv1d | nn.Conv2d


def _copy_bias(src: _Layer, dst: _Layer) -> None:
    if src.bias is not None and dst.bias is not None:
        dst.bias.copy_(src.bias.detach())


def _set_weight(layer: _Layer, value: torch.Tensor | NDArray[np.floating]) -> None:
    tensor = (
        value if isinstance(value, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(value))
    )
    layer.weight.copy_(tensor.reshape(layer.weight.shape).to(layer.weight.dtype))


# ------------------------------------------------------------------ Linear: SVD


def svd_linear(
    layer: nn.Linear, energy: float, budget: float | None = None
) -> tuple[nn.Module, tuple[int, ...]] | str:
    """Two Linears from a truncated SVD, or the reason it would not shrink the layer."""
    w = layer.weight.detach().double()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    out_f, in_f = w.shape
    rank = energy_rank(s.numpy(), energy)
    if budget is not None:
        rank = min(rank, max(1, math.floor(budget * out_f * in_f / (in_f + out_f))))
    if rank * (in_f + out_f) >= out_f * in_f:
        return (
            f"rank {rank} for {energy:.0%} energy needs {rank * (in_f + out_f)} weights, "
            f"not fewer than {out_f * in_f}"
        )
    root = s[:rank].sqrt()
    first = nn.Linear(in_f, rank, bias=False)
    second = nn.Linear(rank, out_f, bias=layer.bias is not None)
    with torch.no_grad():
        _set_weight(first, root[:, None] * vh[:rank])
        _set_weight(second, u[:, :rank] * root[None, :])
        _copy_bias(layer, second)
    return nn.Sequential(first, second), (rank,)


# ------------------------------------------------------------------ Conv: Tucker-2 and CP


def _conv(dims: int, *args: Any, **kwargs: Any) -> nn.Conv1d | nn.Conv2d:
    if dims == 1:
        return nn.Conv1d(*args, **kwargs)
    return nn.Conv2d(*args, **kwargs)


def _conv_refusal(layer: nn.Conv1d | nn.Conv2d) -> str | None:
    if layer.groups != 1:
        return f"grouped convolution (groups={layer.groups}) is already factorised"
    return None


def _unsupported(layer: nn.Module) -> str:
    return f"{type(layer).__name__} is not supported (Conv1d and Conv2d are)"


def _conv_weight(layer: nn.Conv1d | nn.Conv2d) -> NDArray[np.float64]:
    weight: NDArray[np.float64] = layer.weight.detach().double().numpy()
    return weight


def tucker_conv(
    layer: nn.Module, energy: float, budget: float | None = None, seed: int = 0
) -> tuple[nn.Module, tuple[int, ...]] | str:
    """1x1 → core → 1x1 convs from a Tucker-2 decomposition, or why it would not shrink."""
    if not isinstance(layer, nn.Conv1d | nn.Conv2d):
        return _unsupported(layer)
    refusal = _conv_refusal(layer)
    if refusal:
        return refusal
    w = _conv_weight(layer)
    c_out, c_in = int(w.shape[0]), int(w.shape[1])
    k = int(np.prod(w.shape[2:]))
    r_out, r_in = _unfolding_rank(w, 0, energy), _unfolding_rank(w, 1, energy)

    def cost(ro: int, ri: int) -> int:
        return c_in * ri + ri * ro * k + ro * c_out

    if budget is not None:
        while cost(r_out, r_in) > budget * c_out * c_in * k and max(r_out, r_in) > 1:
            if r_out >= r_in:
                r_out -= 1
            else:
                r_in -= 1
    if cost(r_out, r_in) >= c_out * c_in * k:
        return (
            f"Tucker ranks ({r_out}, {r_in}) for {energy:.0%} energy need "
            f"{cost(r_out, r_in)} weights, not fewer than {c_out * c_in * k}"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (core, (u_out, u_in)), _ = partial_tucker(
            w, rank=[r_out, r_in], modes=[0, 1], init="svd", random_state=seed
        )
    dims = w.ndim - 2
    first = _conv(dims, c_in, r_in, 1, bias=False)
    middle = _conv(
        dims,
        r_in,
        r_out,
        layer.kernel_size,
        stride=layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
        bias=False,
        padding_mode=layer.padding_mode,
    )
    last = _conv(dims, r_out, c_out, 1, bias=layer.bias is not None)
    with torch.no_grad():
        _set_weight(first, u_in.T)
        _set_weight(middle, core)
        _set_weight(last, u_out)
        _copy_bias(layer, last)
    return nn.Sequential(first, middle, last), (r_out, r_in)


def cp_conv(
    layer: nn.Module, energy: float, budget: float | None = None, seed: int = 0
) -> tuple[nn.Module, tuple[int, ...]] | str:
    """1x1 → depthwise per kernel axis → 1x1 convs from a CP decomposition, or why not."""
    if not isinstance(layer, nn.Conv1d | nn.Conv2d):
        return _unsupported(layer)
    refusal = _conv_refusal(layer)
    if refusal:
        return refusal
    w = _conv_weight(layer)
    c_out, c_in = int(w.shape[0]), int(w.shape[1])
    kernel = tuple(int(d) for d in w.shape[2:])
    per_rank = c_in + c_out + sum(kernel)
    original = int(w.size)
    rank = max(_unfolding_rank(w, 0, energy), _unfolding_rank(w, 1, energy))
    if budget is not None:
        rank = min(rank, max(1, math.floor(budget * original / per_rank)))
    if rank * per_rank >= original:
        return (
            f"CP rank {rank} for {energy:.0%} energy needs {rank * per_rank} weights, "
            f"not fewer than {original}"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cp = parafac(w, rank=rank, init="svd", random_state=seed, n_iter_max=200)
    weights, factors = cp.weights, cp.factors
    a_out, b_in, *c_kernel = factors
    dims = len(kernel)
    layers: list[nn.Module] = []
    first = _conv(dims, c_in, rank, 1, bias=False)
    with torch.no_grad():
        _set_weight(first, b_in.T)
    layers.append(first)
    for axis, factor in enumerate(c_kernel):

        def along(value: Any, default: int, axis: int = axis) -> Any:
            """The conv's stride/padding/dilation on this kernel axis, ``default`` on the others."""
            if isinstance(value, str):  # "same" / "valid" apply per axis by themselves
                return value
            values = tuple(value) if isinstance(value, tuple) else (value,) * dims
            return tuple(v if d == axis else default for d, v in enumerate(values))

        shape = tuple(kernel[axis] if d == axis else 1 for d in range(dims))
        depthwise = _conv(
            dims,
            rank,
            rank,
            shape,
            stride=along(layer.stride, 1),
            padding=along(layer.padding, 0),
            dilation=along(layer.dilation, 1),
            groups=rank,
            bias=False,
            padding_mode=layer.padding_mode,
        )
        with torch.no_grad():
            _set_weight(depthwise, factor.T)
        layers.append(depthwise)
    last = _conv(dims, rank, c_out, 1, bias=layer.bias is not None)
    with torch.no_grad():
        _set_weight(last, a_out * weights[None, :])
        _copy_bias(layer, last)
    layers.append(last)
    return nn.Sequential(*layers), (rank,)


# ------------------------------------------------------------------ the step


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def decompose(
    model: nn.Module,
    step: LowRank,
    train: Split,
    val: Split | None = None,
    *,
    options: TrainOptions | None = None,
) -> LowRankResult:
    """Decompose every Linear (SVD) and Conv (Tucker/CP) that would shrink, then fine-tune.

    Raises UnsupportedModelError, listing each layer and why, when nothing would shrink.
    """
    options = options or TrainOptions()
    if step.linear == "none" and step.conv == "none":
        raise CompressionError("LowRank with linear='none' and conv='none' would change nothing")
    model = copy.deepcopy(model)
    params_before = _params(model)
    calls = executed_layers(model, example_inputs(train))
    classifier = calls[-1] if calls else None
    targets = [
        (name, m)
        for name, m in model.named_modules()
        if (isinstance(m, nn.Linear) and step.linear == "svd")
        or (isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d) and step.conv != "none")
    ]
    reports: list[LayerReport] = []
    for name, layer in targets:
        if layer is classifier:
            # Its outputs are the class scores: a rank below the class count merges classes,
            # and it holds a negligible share of the parameters.
            before = _params(layer)
            reason = "the classifier (its outputs are the class scores) is kept whole"
            reports.append(
                LayerReport(name, type(layer).__name__, "skipped", (), before, before, reason)
            )
            continue
        if isinstance(layer, nn.Linear):
            method = "svd"
            outcome = svd_linear(layer, step.energy, step.param_budget)
        elif step.conv == "tucker":
            method = "tucker"
            outcome = tucker_conv(layer, step.energy, step.param_budget, options.seed)
        else:
            method = "cp"
            outcome = cp_conv(layer, step.energy, step.param_budget, options.seed)
        before = _params(layer)
        if isinstance(outcome, str):
            reports.append(
                LayerReport(name, type(layer).__name__, "skipped", (), before, before, outcome)
            )
            continue
        new, ranks = outcome
        _replace(model, name, new)
        reports.append(LayerReport(name, type(layer).__name__, method, ranks, before, _params(new)))
        log.info("%s %s ranks %s: %d -> %d parameters", method, name, ranks, before, _params(new))
    if not any(r.method != "skipped" for r in reports):
        detail = "; ".join(f"{r.name} ({r.layer}): {r.reason}" for r in reports)
        raise UnsupportedModelError(
            "low-rank decomposition would shrink no layer"
            + (f": {detail}" if detail else " (the model has no Linear or Conv layer)")
        )
    fine_tune(
        model,
        train,
        epochs=step.finetune_epochs,
        options=options,
        val=val,
        label="low-rank fine-tuning",
    )
    return LowRankResult(model, tuple(reports), params_before, _params(model))
