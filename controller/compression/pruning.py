"""Pruning: zero weights (unstructured), remove channels (structured), drop blocks (layers).

Each function works on a deep copy (the caller's model is never modified, so a failed
step leaves nothing half-done), prunes towards its target in increments with
fine-tuning in between (small steps let the remaining weights take over the work of
the removed ones), and returns the pruned model with what was achieved.

- Unstructured zeros individual weights: the file compresses well and sparse kernels
  can skip zeros, but a dense runtime does the same multiply-adds.
- Structured removes whole filters/units, so every layer after it shrinks too: fewer
  parameters, fewer MACs, lower latency on any runtime. Torch-Pruning's dependency
  graph finds every layer coupled to a channel (the next conv's inputs, BatchNorm,
  both sides of a residual add, concatenations) and prunes them together.
- Layer pruning replaces whole shape-preserving blocks with the identity.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.utils import prune

from controller.compression.errors import CompressionError, UnsupportedModelError
from controller.compression.recipe import LayerPrune, StructuredPrune, UnstructuredPrune
from controller.compression.training import (
    Inputs,
    TrainOptions,
    evaluate,
    example_inputs,
    executed_layers,
    fine_tune,
    split_tensors,
    threads,
)
from controller.workloads.base import Split

log = logging.getLogger(__name__)

_WEIGHT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_WeightLayer = nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear


def _weight_layers(model: nn.Module) -> list[tuple[str, _WeightLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _WeightLayer)]


def _tensor(module: nn.Module, name: str) -> torch.Tensor:
    """A tensor attribute (parameter, buffer or the pruning reparametrisation's plain tensor)."""
    value = getattr(module, name)
    if not isinstance(value, torch.Tensor):
        raise UnsupportedModelError(f"{type(module).__name__}.{name} is not a tensor")
    return value


def _run(model: nn.Module, inputs: Inputs) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        out = model(*inputs)
    if not isinstance(out, torch.Tensor):
        raise UnsupportedModelError(
            f"the model returns {type(out).__name__}; pruning expects one logits tensor"
        )
    return out


# ------------------------------------------------------------------ unstructured


@dataclass(frozen=True)
class UnstructuredResult:
    model: nn.Module
    sparsity: float  # fraction of exact zeros over all pruned weight tensors
    layer_sparsity: dict[str, float]
    schedule: tuple[float, ...]  # target sparsity after each increment


def cubic_schedule(target: float, steps: int) -> tuple[float, ...]:
    """Zhu & Gupta's s_t = s·(1 - (1 - t/n)³): prune fast while redundancy is high."""
    if not 0 < target < 1:
        raise CompressionError(f"sparsity must be in (0, 1), got {target}")
    if steps < 1:
        raise CompressionError(f"schedule_steps must be >= 1, got {steps}")
    return tuple(target * (1 - (1 - t / steps) ** 3) for t in range(1, steps + 1))


def _effective_weight(module: nn.Module) -> torch.Tensor:
    """The weight as the next forward will see it (``module.weight`` may be stale mid-training)."""
    if hasattr(module, "weight_orig"):
        return (_tensor(module, "weight_orig") * _tensor(module, "weight_mask")).detach()
    return _tensor(module, "weight").detach()


def _pruned_count(module: nn.Module) -> int:
    mask = getattr(module, "weight_mask", None)
    return 0 if mask is None else int((mask == 0).sum())


def prune_unstructured(
    model: nn.Module,
    step: UnstructuredPrune,
    train: Split,
    val: Split | None = None,
    *,
    options: TrainOptions | None = None,
) -> UnstructuredResult:
    """Magnitude-prune every Conv/Linear weight to ``step.sparsity`` on a cubic schedule.

    scope="global" ranks all weights together (``prune.global_unstructured``): layers
    with many redundant weights give up more. scope="layer" prunes each layer to the
    same fraction (``prune.l1_unstructured``). Each of the ``schedule_steps``
    increments is followed by ``finetune_epochs`` of fine-tuning (pruned weights stay
    zero meanwhile). After the last one the masks are made permanent, so the weights
    are plain tensors with exact zeros. Biases and normalisation layers are not pruned.
    """
    model = copy.deepcopy(model)
    layers = _weight_layers(model)
    if not layers:
        raise UnsupportedModelError(
            "unstructured pruning needs Conv or Linear layers; the model has none"
        )
    schedule = cubic_schedule(step.sparsity, step.schedule_steps)
    for i, target in enumerate(schedule, start=1):
        if step.scope == "global":
            total = sum(_tensor(m, "weight").numel() for _, m in layers)
            already = sum(_pruned_count(m) for _, m in layers)
            extra = round(target * total) - already
            if extra > 0:
                prune.global_unstructured(
                    [(m, "weight") for _, m in layers],
                    pruning_method=prune.L1Unstructured,
                    importance_scores={
                        (m, "weight"): _effective_weight(m).abs() for _, m in layers
                    },
                    amount=extra,
                )
        else:
            for _, m in layers:
                extra = round(target * _tensor(m, "weight").numel()) - _pruned_count(m)
                if extra > 0:
                    prune.l1_unstructured(  # type: ignore[no-untyped-call]
                        m, "weight", amount=extra, importance_scores=_effective_weight(m).abs()
                    )
        log.info("unstructured increment %d/%d: sparsity %.3f", i, len(schedule), target)
        fine_tune(
            model,
            train,
            epochs=step.finetune_epochs,
            options=options,
            val=val,
            label=f"pruning {target:.0%} ({i}/{len(schedule)})",
        )
    for _, m in layers:
        if prune.is_pruned(m) and hasattr(m, "weight_mask"):
            prune.remove(m, "weight")  # type: ignore[no-untyped-call]
    zeros_by_layer = {name: int((_tensor(m, "weight") == 0).sum()) for name, m in layers}
    sizes = {name: _tensor(m, "weight").numel() for name, m in layers}
    per_layer = {name: zeros_by_layer[name] / sizes[name] for name in sizes}
    zeros, total = sum(zeros_by_layer.values()), sum(sizes.values())
    return UnstructuredResult(model, zeros / total, per_layer, schedule)


# ------------------------------------------------------------------ structured


@dataclass(frozen=True)
class StructuredResult:
    model: nn.Module
    params_before: int
    params_after: int
    channels: dict[str, tuple[int, int]]  # layer -> (output channels before, after)
    ignored: tuple[str, ...]  # layers whose outputs were kept whole (the classifier)


def _output_width(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        return module.out_channels
    raise UnsupportedModelError(f"{type(module).__name__} has no output channels to count")


class ActivationImportance(tp.importance.GroupMagnitudeImportance):  # type: ignore[misc]
    """A channel matters as much as its mean |activation| over the training data.

    Measured where the channel is consumed: the input of the next Conv/Linear (after
    BatchNorm and the non-linearity, i.e. what the network actually uses), averaged over
    every consumer in the coupled group (both branches of a residual add). A group with
    no consumer falls back to the producing layer's output. Torch-Pruning's own
    ActivationImportance keeps only the last batch and only handles Conv2d/Linear.
    """

    def __init__(self) -> None:
        super().__init__(p=1, group_reduction="mean", normalizer="mean")
        self.inputs: dict[nn.Module, torch.Tensor] = {}
        self.outputs: dict[nn.Module, torch.Tensor] = {}

    def collect(self, model: nn.Module, data: Split, batch_size: int = 256) -> None:
        """Mean |activation| per channel of every Conv/Linear input and output over ``data``."""
        sums_in: dict[nn.Module, torch.Tensor] = {}
        sums_out: dict[nn.Module, torch.Tensor] = {}
        counts: dict[nn.Module, int] = {}

        def channel_abs_sum(t: torch.Tensor, linear: bool) -> tuple[torch.Tensor, int]:
            t = t.detach().abs()
            if linear:
                flat = t.reshape(-1, t.shape[-1])
            else:
                flat = t.transpose(0, 1).reshape(t.shape[1], -1).T
            return flat.sum(dim=0), flat.shape[0]

        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            linear = isinstance(module, nn.Linear)
            s_in, n = channel_abs_sum(inputs[0], linear)
            s_out, _ = channel_abs_sum(out, linear)
            sums_in[module] = sums_in.get(module, 0) + s_in
            sums_out[module] = sums_out.get(module, 0) + s_out
            counts[module] = counts.get(module, 0) + n

        handles = [
            m.register_forward_hook(hook) for m in model.modules() if isinstance(m, _WEIGHT_LAYERS)
        ]
        tensors = split_tensors(data)
        model.eval()
        try:
            with torch.no_grad():
                for start in range(0, len(data), batch_size):
                    model(*(t[start : start + batch_size] for t in tensors))
        finally:
            for h in handles:
                h.remove()
        self.inputs = {m: s / counts[m] for m, s in sums_in.items()}
        self.outputs = {m: s / counts[m] for m, s in sums_out.items()}

    @torch.no_grad()
    def __call__(self, group: tp.Group) -> torch.Tensor | None:
        consumed_in = (tp.prune_conv_in_channels, tp.prune_linear_in_channels)
        produced_by = (tp.prune_conv_out_channels, tp.prune_linear_out_channels)
        for kinds, stats in ((consumed_in, self.inputs), (produced_by, self.outputs)):
            imps, roots = [], []
            for i, (dep, idxs) in enumerate(group):
                if dep.pruning_fn in kinds and dep.layer in stats:
                    imps.append(stats[dep.layer][list(idxs)])
                    roots.append(group[i].root_idxs)
            if imps:
                return self._normalize(self._reduce(imps, roots), self.normalizer)  # type: ignore[no-any-return]
        return None


def _importance(kind: str) -> tp.importance.Importance:
    if kind == "l1":
        return tp.importance.MagnitudeImportance(p=1)
    if kind == "l2":
        return tp.importance.MagnitudeImportance(p=2)
    if kind == "activation":
        return ActivationImportance()
    raise CompressionError(f"unknown importance {kind!r}; accepted: l1, l2, activation")


def prune_structured(
    model: nn.Module,
    step: StructuredPrune,
    train: Split,
    val: Split | None = None,
    *,
    options: TrainOptions | None = None,
    example: Inputs | None = None,
    ignored_layers: Sequence[nn.Module] = (),
) -> StructuredResult:
    """Remove ``step.ratio`` of every prunable layer's channels in ``step.iterations`` steps.

    The classifier (the last Conv/Linear the forward pass runs) keeps all its outputs;
    so do ``ignored_layers`` (modules of ``model``). Importance: "l1"/"l2" weight
    norms of each coupled group, "activation" mean |activation| on the training data,
    re-measured before every step. Each step is followed by ``finetune_epochs`` of
    fine-tuning. The result physically has fewer channels (and fewer MACs); it is the
    same Python class as the input, so workload exporters still accept it.
    """
    options = options or TrainOptions()
    originals = {id(m): name for name, m in model.named_modules()}
    ignored_names = {originals[id(m)] for m in ignored_layers if id(m) in originals}
    model = copy.deepcopy(model)
    named = dict(model.named_modules())
    inputs = example if example is not None else example_inputs(train)
    out_before = _run(model, inputs)
    order = list(dict.fromkeys(executed_layers(model, inputs)))  # unique, in call order
    if not order:
        raise UnsupportedModelError(
            "structured pruning needs Conv or Linear layers; the forward pass ran none"
        )
    classifier = executed_layers(model, inputs)[-1]
    ignored = [classifier, *(named[n] for n in ignored_names)]
    names = {id(m): n for n, m in model.named_modules()}
    prunable = [m for m in order if all(m is not x for x in ignored)]
    if not prunable:
        raise UnsupportedModelError(
            f"structured pruning found no prunable layer: the only Conv/Linear is the "
            f"classifier {names[id(classifier)]!r} ({type(classifier).__name__}), whose "
            "outputs are the class scores"
        )
    widths_before = {names[id(m)]: _output_width(m) for m in prunable}
    params_before = sum(p.numel() for p in model.parameters())
    importance = _importance(step.importance)
    try:
        pruner = tp.pruner.MagnitudePruner(
            model,
            inputs,
            importance=importance,
            pruning_ratio=step.ratio,
            iterative_steps=step.iterations,
            ignored_layers=ignored,
        )
    except (RuntimeError, TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
        raise UnsupportedModelError(
            f"Torch-Pruning cannot trace this model's dependency graph: {exc}"
        ) from exc
    for i in range(1, step.iterations + 1):
        if isinstance(importance, ActivationImportance):
            with threads(options.threads):
                importance.collect(model, train, options.eval_batch_size)
        pruner.step()
        out = _run(model, inputs)
        if out.shape != out_before.shape:
            raise UnsupportedModelError(
                f"pruning changed the output shape from {tuple(out_before.shape)} to "
                f"{tuple(out.shape)}: a layer outside Torch-Pruning's graph depends on a "
                "channel count"
            )
        fine_tune(
            model,
            train,
            epochs=step.finetune_epochs,
            options=options,
            val=val,
            label=f"channel pruning step {i}/{step.iterations}",
        )
    now = dict(model.named_modules())
    channels = {name: (w, _output_width(now[name])) for name, w in widths_before.items()}
    if all(old == new for old, new in channels.values()):
        raise UnsupportedModelError(
            f"structured pruning at ratio {step.ratio} removed no channel from "
            f"{', '.join(channels)} (layers too narrow or all coupled to the classifier)"
        )
    return StructuredResult(
        model=model,
        params_before=params_before,
        params_after=sum(p.numel() for p in model.parameters()),
        channels=channels,
        ignored=tuple(names[id(m)] for m in ignored),
    )


# ------------------------------------------------------------------ layers (blocks)


@runtime_checkable
class DroppableBlocks(Protocol):
    """A model may name its droppable blocks itself (dotted module names, any order)."""

    def droppable_blocks(self) -> Sequence[str]: ...


@dataclass(frozen=True)
class LayerPruneResult:
    model: nn.Module
    dropped: tuple[str, ...]  # in the order they were removed
    params_before: int
    params_after: int
    scores: dict[str, tuple[float, float]]  # block -> (accuracy, loss) without it, when chosen


def _has_weight_layer(module: nn.Module) -> bool:
    return any(isinstance(m, _WEIGHT_LAYERS) for m in module.modules())


def droppable_blocks(model: nn.Module, inputs: Inputs) -> list[str]:
    """Blocks that can become the identity: run once, one tensor in, the same shape out.

    Candidates are the model's own ``droppable_blocks()`` if it has that method, else
    every child of an ``nn.Sequential`` or ``nn.ModuleList`` that holds a Conv/Linear.
    Each is traced with ``inputs``; only those called once whose input and output shapes
    and dtypes agree survive (a residual block, or a conv block that keeps its width),
    and of nested survivors only the outermost.
    """
    if isinstance(model, DroppableBlocks):
        modules = dict(model.named_modules())
        wanted = list(model.droppable_blocks())
        unknown = [n for n in wanted if n not in modules]
        if unknown:
            raise UnsupportedModelError(f"droppable_blocks() names unknown modules {unknown}")
        candidates = [(n, modules[n]) for n in wanted]
    else:
        candidates = []
        for parent_name, parent in model.named_modules():
            if isinstance(parent, nn.Sequential | nn.ModuleList):
                for child_name, child in parent.named_children():
                    if _has_weight_layer(child):
                        full = f"{parent_name}.{child_name}" if parent_name else child_name
                        candidates.append((full, child))
    # Per candidate, one entry per call: True when one tensor went in and the same shape came out.
    seen: dict[str, list[bool]] = {n: [] for n, _ in candidates}

    def make_hook(name: str) -> Callable[[nn.Module, tuple[object, ...], object], None]:
        def hook(_m: nn.Module, args: tuple[object, ...], out: object) -> None:
            x = args[0] if len(args) == 1 else None
            seen[name].append(
                isinstance(x, torch.Tensor)
                and isinstance(out, torch.Tensor)
                and x.dtype == out.dtype
                and x.shape == out.shape
            )

        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in candidates]
    try:
        _run(model, inputs)
    finally:
        for h in handles:
            h.remove()
    ok = [n for n, _ in candidates if seen[n] == [True]]
    # Outermost only: dropping a block already drops everything inside it.
    return [n for n in ok if not any(n.startswith(f"{other}.") for other in ok)]


def _swap(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = parent.get_submodule(attr)
    setattr(parent, attr, new)
    return old


def prune_layers(
    model: nn.Module,
    step: LayerPrune,
    train: Split,
    val: Split | None = None,
    *,
    options: TrainOptions | None = None,
    example: Inputs | None = None,
) -> LayerPruneResult:
    """Replace ``step.blocks`` blocks by the identity, least important first, fine-tuning each time.

    Importance is measured, not guessed from weight norms: each droppable block is
    removed in turn and the model scored on ``val`` (``train`` when there is no val);
    the block whose removal leaves the highest accuracy (then the lowest loss) goes.
    Candidates are re-traced after every drop, so nested blocks stay consistent.
    """
    options = options or TrainOptions()
    model = copy.deepcopy(model)
    inputs = example if example is not None else example_inputs(train)
    out_before = _run(model, inputs)
    judge = val if val is not None else train
    params_before = sum(p.numel() for p in model.parameters())
    dropped: list[str] = []
    scores: dict[str, tuple[float, float]] = {}
    found = droppable_blocks(model, inputs)
    if 0 < len(found) < step.blocks:
        raise UnsupportedModelError(
            f"layer pruning cannot drop {step.blocks} block(s): the model has only "
            f"{len(found)} droppable ({', '.join(found)})"
        )
    for i in range(1, step.blocks + 1):
        candidates = droppable_blocks(model, inputs)
        if not candidates:
            what = (
                "no block whose input and output shapes agree (children of nn.Sequential / "
                "nn.ModuleList holding a Conv/Linear, or the model's droppable_blocks())"
            )
            if dropped:
                what = f"only {len(dropped)} droppable block(s) ({', '.join(dropped)})"
            raise UnsupportedModelError(
                f"layer pruning cannot drop {step.blocks} block(s): the model has {what}"
            )
        trial: dict[str, tuple[float, float]] = {}
        for name in candidates:
            old = _swap(model, name, nn.Identity())
            try:
                with threads(options.threads):
                    trial[name] = evaluate(model, judge, batch_size=options.eval_batch_size)
            finally:
                _swap(model, name, old)
        name = max(candidates, key=lambda n: (trial[n][0], -trial[n][1]))
        _swap(model, name, nn.Identity())
        dropped.append(name)
        scores[name] = trial[name]
        log.info("dropped block %s (accuracy without it %.3f)", name, trial[name][0])
        out = _run(model, inputs)
        if out.shape != out_before.shape:
            raise UnsupportedModelError(
                f"dropping {name} changed the output shape from {tuple(out_before.shape)} "
                f"to {tuple(out.shape)}"
            )
        fine_tune(
            model,
            train,
            epochs=step.finetune_epochs,
            options=options,
            val=val,
            label=f"layer pruning {i}/{step.blocks} ({name})",
        )
    return LayerPruneResult(
        model=model,
        dropped=tuple(dropped),
        params_before=params_before,
        params_after=sum(p.numel() for p in model.parameters()),
        scores=scores,
    )
