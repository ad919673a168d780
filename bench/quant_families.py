"""Quantization families side by side (issue 6): bytes against quality at one budget.

For PLAID (accuracy) and MiniLM (cosine fidelity to the FP32 encoder), each family —
linear int8 (onnxruntime), int4 weight-only (MatMulNBits), codebook 4-bit and 3-bit
(codebook.py), learned 4-bit (LSQ) — alone and after pruning. Every row is a recipe run
through the executor (``TorchSource``), exactly as the planner would build it.

What "the same accuracy drop" means follows the planner's verdict protocol
(planner.py): a row meets the budget when its quality on the **val** split is within it
(PLAID: source val accuracy minus the row's ≤ 0.5 points, i.e. no net val sample lost;
MiniLM: val cosine ≥ 0.98); the number to report is on **test**, shown beside it. The
headline compares the smallest row that meets the budget with the smallest linear-int8
row that meets it; the target is ≥ 1.5x fewer bytes.

Pruning: on PLAID, pruning with fine-tuning (structured 50 % as the planner tries it,
30 %, unstructured 50 %), the strongest whose pruned model alone loses no net val
sample, else the one that loses fewest; structured pruning shrinks every quantizer's
input. MiniLM has no labels to fine-tune on, so its pruning is magnitude pruning of
every Linear weight without fine-tuning, at the sparsity that keeps the pruned
encoder's val cosine ≥ 0.99 (half the budget, leaving the rest to the quantizer).
ONNX stores zeros densely, so unstructured sparsity shows in the zstd bytes, and after
it codebooks keep a level at exactly 0 (``keep_zero``) so zeros stay zeros.

Steps are given as the recipe's own JSON (parsed by ``STEP_ADAPTER``): a step kind
the recipe does not define yet (``quantize.learned`` before it lands) is shown as "not
built yet", and the next run builds it without a code change. Built artifacts are kept
in the bench work dir, keyed by the source weights, the pruning and the recipe, so a
rerun only scores them.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
import zstandard
from pydantic import ValidationError
from torch import nn

from bench.reconstruction import ReconstructionRow, reconstruction_rows, render_reconstruction
from controller.compression.errors import CompressionError
from controller.compression.executor import TorchSource
from controller.compression.recipe import (
    STEP_ADAPTER,
    Recipe,
    Step,
    StructuredPrune,
    UnstructuredPrune,
)
from controller.workloads.base import Workload
from controller.workloads.registry import get_workload

Progress = Callable[[str], None]
CACHE_VERSION = 1  # bump when a change here makes cached artifacts stale
LEARNED_KIND = "quantize.learned"
Status = Literal["built", "not built yet", "not applicable"]


@dataclass(frozen=True)
class Family:
    """One quantizer: its family and its step as the recipe's JSON (see module doc)."""

    family: str  # "linear int8", "int4 weight-only", "codebook 4-bit", ...
    label: str
    step: Mapping[str, object]
    linear_int8: bool = False

    def spec(self, *, keep_zero: bool) -> dict[str, object]:
        spec = dict(self.step)
        if keep_zero and spec.get("kind") == "quantize.codebook":
            spec["keep_zero"] = True
        return spec


@dataclass(frozen=True)
class Pruning:
    """What "combined with pruning" means on a workload: the first of ``options``
    (recipe steps, strongest first) whose pruned model alone meets the budget on val; or,
    with no labels to fine-tune on, magnitude pruning of Linear weights without
    fine-tuning at the first of ``sparsities`` whose pruned model keeps ``min_fidelity``."""

    label: str
    options: tuple[tuple[Step, ...], ...] = ()
    sparsities: tuple[float, ...] = ()
    min_fidelity: float = 0.99

    def __post_init__(self) -> None:
        if not self.options and not self.sparsities:
            raise ValueError(f"pruning {self.label!r}: give options or sparsities")


@dataclass(frozen=True)
class Plan:
    workload: str
    max_drop: float | None  # accuracy points (fraction) on val
    min_fidelity: float | None  # cosine on val
    families: tuple[Family, ...]
    pruning: Pruning | None


INT8_STATIC = Family(
    "linear int8",
    "int8 static (QDQ, per-channel, MinMax, accuracy-aware)",
    {"kind": "quantize", "mode": "static", "calibration": "minmax", "per_channel": True},
    linear_int8=True,
)
INT8_DYNAMIC = Family(
    "linear int8", "int8 dynamic", {"kind": "quantize", "mode": "dynamic"}, linear_int8=True
)
INT4 = Family(
    "int4 weight-only",
    "int4 weight-only (MatMulNBits, block 32)",
    {"kind": "quantize.weight_only", "bits": 4, "block_size": 32, "gather_block_size": 128},
)


def _codebook(bits: int, share: float = 1.0) -> Family:
    label = f"codebook {bits}-bit (k-means per channel, error feedback"
    label += f", share {share})" if share < 1 else ")"
    step: dict[str, object] = {"kind": "quantize.codebook", "bits": bits, "error_feedback": True}
    if share < 1:
        step["share"] = share
    return Family(f"codebook {bits}-bit", label, step)


LEARNED = Family(
    "learned 4-bit",
    "learned 4-bit (LSQ step sizes, QAT)",
    {"kind": LEARNED_KIND, "weight_bits": 4},
)
PLAID_PRUNING = Pruning(
    "with fine-tuning, the strongest of structured 50 %, 30 %, unstructured 50 % that "
    "alone loses no net val sample, else the one that loses fewest",
    options=(
        (StructuredPrune(ratio=0.5, iterations=1, finetune_epochs=30),),  # the planner's
        (StructuredPrune(ratio=0.3, iterations=1, finetune_epochs=30),),
        (UnstructuredPrune(sparsity=0.5),),
    ),
)
MINILM_PRUNING = Pruning(
    "magnitude (Linear weights, no fine-tune)", sparsities=(0.15, 0.1, 0.05), min_fidelity=0.99
)
PLANS = (
    Plan(
        "plaid",
        max_drop=0.005,
        min_fidelity=None,
        families=(INT8_STATIC, INT4, _codebook(4), _codebook(3), LEARNED),
        pruning=PLAID_PRUNING,
    ),
    Plan(
        "minilm",
        max_drop=None,
        min_fidelity=0.98,
        families=(
            INT8_DYNAMIC,
            INT4,
            _codebook(4),
            _codebook(4, share=0.7),
            _codebook(3, share=0.7),
            LEARNED,
        ),
        pruning=MINILM_PRUNING,
    ),
)
QUICK_PLANS = (
    Plan(
        "italy-power",
        max_drop=0.005,
        min_fidelity=None,
        families=(INT8_STATIC, _codebook(4), LEARNED),
        pruning=None,
    ),
)


@dataclass(frozen=True)
class FamilyRow:
    workload: str
    family: str
    label: str
    pruned: bool
    status: Status
    recipe: str  # the recipe built, or why the row has none
    metric: str = ""
    bytes: int = 0
    zstd_bytes: int = 0
    val_score: float = float("nan")
    test_score: float = float("nan")
    rss_bytes: int = -1  # resident memory added by creating the session, after malloc_trim
    meets: bool = False  # within the budget on val (the planner's verdict)
    linear_int8: bool = False


@dataclass(frozen=True)
class FamilyTable:
    workload: str
    budget: str
    pruning: str
    source_bytes: int
    source_val: float
    source_test: float
    rows: list[FamilyRow] = field(default_factory=list)
    # the source's weights through linear and codebook quantizers at equal index bits
    reconstruction: list[ReconstructionRow] = field(default_factory=list)

    @property
    def best_linear_int8(self) -> FamilyRow | None:
        usable = [r for r in self.rows if r.linear_int8 and r.meets]
        return min(usable, key=lambda r: r.bytes) if usable else None

    @property
    def best(self) -> FamilyRow | None:
        usable = [r for r in self.rows if r.meets]
        return min(usable, key=lambda r: r.bytes) if usable else None

    def fewer(self, row: FamilyRow) -> float | None:
        """How many times fewer bytes than the best linear-int8 row (None: no such row)."""
        base = self.best_linear_int8
        return None if base is None or not row.bytes else base.bytes / row.bytes


TARGET_FEWER = 1.5


# ------------------------------------------------------------------ building


def _digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _weights_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def magnitude_prune(model: nn.Module, sparsity: float) -> nn.Module:
    """Zero the ``sparsity`` smallest-magnitude weights of every Linear layer (in place)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                weight = module.weight
                k = int(weight.numel() * sparsity)
                if k:
                    cut = weight.abs().flatten().kthvalue(k).values
                    weight[weight.abs() <= cut] = 0.0
    return model


def _parse(spec: Mapping[str, object]) -> Step | str:
    """The step, or why it cannot be built (the recipe does not define its kind yet)."""
    try:
        return STEP_ADAPTER.validate_python(dict(spec))
    except ValidationError as exc:
        if any(e["type"] == "union_tag_invalid" for e in exc.errors()):
            return f"the recipe has no `{spec.get('kind')}` step yet"
        return f"`{spec.get('kind')}` refused these parameters: {exc.errors()[0]['msg']}"


_RSS_SCRIPT = """
import sys, psutil, onnxruntime as ort
from edge_agent.runtime import release_free_memory
options = ort.SessionOptions()
options.intra_op_num_threads = 1
options.inter_op_num_threads = 1
options.log_severity_level = 3
process = psutil.Process()
release_free_memory()
before = process.memory_info().rss
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
release_free_memory()
print(process.memory_info().rss - before)
"""


def resident_after_load(path: Path) -> int:
    """RSS added by creating a session, in a fresh process, after the agent's malloc_trim."""
    done = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).resolve().parents[1],
    )
    if done.returncode != 0:
        return -1
    return int(done.stdout.strip().splitlines()[-1])


@dataclass
class _Scorer:
    workload: Workload
    plan: Plan
    source_val: float = 1.0

    def meets(self, val: float) -> bool:
        if self.plan.max_drop is not None:
            return self.source_val - val <= self.plan.max_drop + 1e-9
        return val >= (self.plan.min_fidelity or 0.0)


@dataclass
class _Builder:
    """Builds rows for one workload, caching artifacts under ``cache``."""

    workload: Workload
    plan: Plan
    scratch: Path
    cache: Path | None
    progress: Progress
    _sources: dict[str, tuple[TorchSource, str]] = field(default_factory=dict)

    def source(self, sparsity: float | None) -> tuple[TorchSource, str]:
        """The executor for the source, or the magnitude-pruned source; and its digest."""
        key = str(sparsity)
        if key not in self._sources:
            model = self.workload.source_model()
            if sparsity is not None:
                magnitude_prune(model, sparsity)
            budget = self.plan.max_drop
            if budget is None and self.plan.min_fidelity is not None:
                budget = 1.0 - self.plan.min_fidelity
            executor = TorchSource(self.workload, model, max_accuracy_drop=budget)
            self._sources[key] = (executor, _weights_digest(model))
        return self._sources[key]

    def build(self, recipe: Recipe, sparsity: float | None) -> Path:
        executor, digest = self.source(sparsity)
        key = _digest(CACHE_VERSION, self.workload.name, digest, sparsity, recipe.model_dump_json())
        cached = self.cache / self.workload.name / key[:24] / "model.onnx" if self.cache else None
        if cached is not None and cached.is_file():
            return cached
        out = Path(tempfile.mkdtemp(prefix="family-", dir=self.scratch))
        built = executor.build(recipe, out)
        if cached is None:
            return built
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_suffix(".partial")
        shutil.copyfile(built, partial)
        partial.replace(cached)
        (cached.parent / "recipe.json").write_text(recipe.model_dump_json(indent=2) + "\n")
        for item in out.iterdir():  # the float export stays: later recipes start from it
            if item.name != "float.onnx":
                item.unlink()
        return cached

    def choose_sparsity(self, pruning: Pruning) -> float | None:
        """The largest sparsity whose pruned model alone keeps ``min_fidelity`` on val."""
        for sparsity in pruning.sparsities:
            path = self.build(Recipe(), sparsity)
            val = self.workload.score_onnx(path, split="val").value
            self.progress(f"quant-families: {self.workload.name} magnitude {sparsity}: {val:.4f}")
            if val >= pruning.min_fidelity:
                return sparsity
        return None


def _measure(
    builder: _Builder,
    scorer: _Scorer,
    family: Family,
    pruned: bool,
    prefix: tuple[Step, ...],
    sparsity: float | None,
) -> FamilyRow:
    name = builder.workload.name
    base = FamilyRow(name, family.family, family.label, pruned, "not applicable", "")
    zeros = sparsity is not None or any(isinstance(s, UnstructuredPrune) for s in prefix)
    step = _parse(family.spec(keep_zero=pruned and zeros))
    if isinstance(step, str):
        return _replace(base, status="not built yet", recipe=step)
    recipe = Recipe(steps=(*prefix, step))
    builder.progress(f"quant-families: {name}: {_describe(recipe, sparsity)}")
    try:
        path = builder.build(recipe, sparsity)
    except CompressionError as exc:
        return _replace(base, recipe=f"{recipe.describe()}: {exc}")
    return _row(builder, scorer, base, recipe, path, sparsity, family.linear_int8)


def _replace(row: FamilyRow, **changes: object) -> FamilyRow:
    return FamilyRow(**{**asdict(row), **changes})


def _describe(recipe: Recipe, sparsity: float | None) -> str:
    text = recipe.describe() if recipe.steps else ""
    if sparsity is None:
        return text or "fp32"
    magnitude = f"magnitude prune {sparsity:.0%} (no fine-tune)"
    return f"{magnitude} → {text}" if text else magnitude


def _row(
    builder: _Builder,
    scorer: _Scorer,
    base: FamilyRow,
    recipe: Recipe,
    path: Path,
    sparsity: float | None,
    linear_int8: bool,
) -> FamilyRow:
    data = path.read_bytes()
    val = builder.workload.score_onnx(path, split="val")
    test = builder.workload.score_onnx(path, split="test")
    return _replace(
        base,
        status="built",
        recipe=_describe(recipe, sparsity),
        metric=test.metric,
        bytes=len(data),
        zstd_bytes=len(zstandard.ZstdCompressor(level=19).compress(data)),
        val_score=val.value,
        test_score=test.value,
        rss_bytes=resident_after_load(path),
        meets=scorer.meets(val.value),
        linear_int8=linear_int8,
    )


def _choose_pruning(
    builder: _Builder, scorer: _Scorer, pruning: Pruning
) -> tuple[tuple[Step, ...], str]:
    """The first option whose pruned model alone meets the budget on val; when none
    does, the one that keeps most val accuracy (the strongest of equals)."""
    tried: list[tuple[float, tuple[Step, ...]]] = []
    for prefix in pruning.options:
        recipe = Recipe(steps=prefix)
        builder.progress(f"quant-families: {builder.workload.name}: {recipe.describe()} alone")
        val = builder.workload.score_onnx(builder.build(recipe, None), split="val").value
        tried.append((val, prefix))
        if scorer.meets(val):
            break
    chosen = max(tried, key=lambda t: t[0])[1]  # max keeps the first of equals
    scores = "; ".join(f"{Recipe(steps=p).describe()}: val {v * 100:.1f} %" for v, p in tried)
    return chosen, f"{pruning.label}; chosen {Recipe(steps=chosen).describe()} ({scores})"


def family_table(plan: Plan, scratch: Path, cache: Path | None, progress: Progress) -> FamilyTable:
    workload = get_workload(plan.workload)
    builder = _Builder(workload, plan, scratch, cache, progress)
    source_path = builder.build(Recipe(), None)
    source_val = workload.score_onnx(source_path, split="val").value
    scorer = _Scorer(workload, plan, source_val)
    fp32 = _row(
        builder,
        scorer,
        FamilyRow(workload.name, "fp32", "FP32 source", False, "built", ""),
        Recipe(),
        source_path,
        None,
        False,
    )
    rows = [fp32]
    variants: list[tuple[bool, tuple[Step, ...], float | None]] = [(False, (), None)]
    pruning_text = "none"
    if plan.pruning is not None:
        pruning = plan.pruning
        if pruning.sparsities:
            sparsity = builder.choose_sparsity(pruning)
            if sparsity is None:
                pruning_text = f"{pruning.label}: no sparsity in {pruning.sparsities} kept it"
            else:
                pruning_text = f"{pruning.label}, {sparsity:.0%}"
                variants.append((True, (), sparsity))
        else:
            prefix, pruning_text = _choose_pruning(builder, scorer, pruning)
            variants.append((True, prefix, None))
        for _, prefix, sparsity in variants[1:]:
            progress(f"quant-families: {workload.name}: pruned alone")
            path = builder.build(Recipe(steps=prefix), sparsity)
            base = FamilyRow(workload.name, "pruning", "pruning alone", True, "built", "")
            rows.append(_row(builder, scorer, base, Recipe(steps=prefix), path, sparsity, False))
    for pruned, prefix, sparsity in variants:
        for family in plan.families:
            rows.append(_measure(builder, scorer, family, pruned, prefix, sparsity))
    budget = (
        f"≤ {plan.max_drop * 100:.1f} pt accuracy drop on val"
        if plan.max_drop is not None
        else f"cosine ≥ {plan.min_fidelity} on val"
    )
    return FamilyTable(
        workload=workload.name,
        budget=budget,
        pruning=pruning_text,
        source_bytes=fp32.bytes,
        source_val=source_val,
        source_test=fp32.test_score,
        rows=rows,
        reconstruction=reconstruction_rows(workload.name, source_path),
    )


def family_tables(
    plans: Sequence[Plan], scratch: Path, cache: Path | None, progress: Progress
) -> list[FamilyTable]:
    return [family_table(plan, scratch, cache, progress) for plan in plans]


def as_json(tables: Sequence[FamilyTable]) -> list[dict[str, object]]:
    """The tables as plain JSON: a row that was not built has null scores (not NaN)."""
    out = []
    for table in tables:
        document = asdict(table)
        for row in document["rows"]:
            for key in ("val_score", "test_score"):
                if math.isnan(row[key]):
                    row[key] = None
        out.append(document)
    return out


# ------------------------------------------------------------------ report


def _size(n: int) -> str:
    return f"{n / 1024:,.1f} KiB" if n < 1024 * 1024 else f"{n / 2**20:,.2f} MiB"


def _quality(metric: str, value: float) -> str:
    return f"{value * 100:.1f} %" if metric == "accuracy" else f"{value:.4f}"


def _drop(table: FamilyTable, row: FamilyRow) -> str:
    if row.metric == "accuracy":
        return f"{(table.source_val - row.val_score) * 100:+.1f} pt"
    return f"{row.val_score:.4f}"


def _test(table: FamilyTable, row: FamilyRow) -> str:
    if row.metric != "accuracy":
        return _quality(row.metric, row.test_score)
    return f"{row.test_score * 100:.1f} % ({(table.source_test - row.test_score) * 100:+.1f} pt)"


def _cells(table: FamilyTable, row: FamilyRow) -> list[str]:
    pruned = "yes" if row.pruned else "-"
    if row.status != "built":
        return [row.label, pruned, f"*{row.status}*: {row.recipe}", "", "", "", "", "", ""]
    fewer = table.fewer(row)
    return [
        f"**{row.label}**" if row is table.best else row.label,
        pruned,
        row.recipe,
        f"{_size(row.bytes)} ({_size(row.zstd_bytes)})",
        _drop(table, row),
        _test(table, row),
        _size(row.rss_bytes) if row.rss_bytes >= 0 else "?",
        "yes" if row.meets else "no",
        "-" if fewer is None else f"{fewer:.2f}x",
    ]


def _headline(table: FamilyTable) -> str:
    base, best = table.best_linear_int8, table.best
    if base is None or best is None:
        return (
            f"Target (≥ {TARGET_FEWER}x fewer bytes than the best linear int8 at {table.budget}): "
            "**not measurable**: no linear-int8 row meets the budget."
        )
    ratio = base.bytes / best.bytes
    verdict = "**met**" if ratio >= TARGET_FEWER else "**not met**"
    return (
        f"Target ≥ {TARGET_FEWER}x fewer bytes than the best linear-int8 recipe at "
        f"{table.budget}: {verdict}: {best.label}{' after pruning' if best.pruned else ''} "
        f"({best.recipe}), {_size(best.bytes)} against {base.label}"
        f"{' after pruning' if base.pruned else ''}, {_size(base.bytes)}: "
        f"**{ratio:.2f}x** fewer bytes (test {_quality(best.metric, best.test_score)} "
        f"against {_quality(base.metric, base.test_score)})."
    )


def render_families(tables: Sequence[FamilyTable], command: str) -> list[str]:
    lines = [
        "## Quantization families at one quality budget (issue 6)",
        "",
        f"Reproduce: `{command}` (`bench/quant_families.py`; built artifacts are kept in the "
        "work dir, so a rerun only scores them). Every row is a recipe run by the "
        "executor as the planner runs it. A row is within the budget by the planner's "
        "verdict, on the **val** split (PLAID: no net val sample lost against the source, "
        "one sample = 0.92 pt; MiniLM: val cosine to the FP32 encoder); test is the number "
        "to report. Bytes are the ONNX file (zstd -19 in brackets); resident is what "
        "creating the onnxruntime session adds to a fresh process's RSS after "
        '`malloc_trim`, as the edge agent loads models. "Fewer" is the best (smallest) '
        "linear-int8 row within the budget over this row's bytes; the smallest row "
        "within the budget is in bold.",
        "",
    ]
    header = [
        "quantizer", "pruned", "recipe", "bytes (zstd)", "val drop / cosine", "test (drop)",
        "resident after load", "within budget", "fewer bytes than int8",
    ]  # fmt: skip
    for table in tables:
        source = (
            f"FP32 source {_size(table.source_bytes)}, val "
            f"{_quality(table.rows[0].metric, table.source_val)}, test "
            f"{_quality(table.rows[0].metric, table.source_test)}"
        )
        lines += [
            f"### {table.workload}: {table.budget}",
            "",
            f"{source}; pruning: {table.pruning}.",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
        ]
        lines += ["| " + " | ".join(_cells(table, row)) + " |" for row in table.rows]
        lines += ["", _headline(table), ""]
        lines += render_reconstruction(table.reconstruction)
    return lines
