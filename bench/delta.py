"""Delta codec benchmark (issue 4): model updates, generic binary diffs vs HomeFleet's codec.

Update pairs, each built here from a real workload:

  (a)  PLAID FP32 → FP32 after a full fine-tune: 1 epoch of AdamW (lr 1e-4, weight
       decay 0.01), the source training's augmentation and label smoothing,
       BatchNorm statistics frozen (every weight moves a little)
  (a2) the same, longer (3 epochs, lr 3e-4) and with BatchNorm statistics moving too
       (folded into the exported convolutions they rescale every channel); no target
  (b)  PLAID FP32 → FP32 after a head-only fine-tune (3 epochs, lr 1e-3); no target
  (c)  PLAID int8 → int8: the static QDQ artifact of (a)'s source and of its fine-tune,
       the re-release quantized with the earlier artifact's recipe (same float nodes)
  (c+) the same with delta-friendly recompression (item 4, controller/compression/
       requantize.py: the earlier artifact's scales and zero points reused, integers
       held within the budget); its target is relative to (c)'s HomeFleet payload
  (d)  FP32 → int8 of the same weights: PLAID static QDQ per channel (accuracy-aware,
       as the planner makes it), and MiniLM dynamic int8 (its first recipe)
  (e)  MiniLM encoder (~90 MB) after a short fine-tune: 8 AdamW steps (lr 2e-5,
       weight decay 0.01, the transformers defaults; batches of 16) pulling intent
       phrasings towards the other phrasings of their intent

Columns: raw, gzip -9, zstd -19, zstd -19 --long=27 --patch-from=OLD, bsdiff, xdelta3 -9
-s OLD (Debian packages; `make system-tools` installs them) and HomeFleet; the ratio of
the best generic tool to HomeFleet; encode MB/s of the new model on one core; decode
MB/s in memory on one core, with the decoder the agent uses (compiled where it applies)
and with the Python decoder alone; the time of a file-to-file apply as the agent does it;
and the decoder's peak memory (Python heap by tracemalloc, and the high-water RSS, in a
fresh process that applies the delta file to file).

Fine-tunes run torch on one thread with fixed seeds. Everything is written under
``work_dir``; rerunning with the same directory reuses the models built before and
the generic tools' sizes (bsdiff takes ~25 minutes on MiniLM).
"""

from __future__ import annotations

import copy
import gzip
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from artifact.delta import EncodeOptions, write_delta
from artifact.digest import sha256_file

Progress = Callable[[str], None]
REPO = Path(__file__).resolve().parents[1]
TOOLS = ("zstd", "xdelta3", "bsdiff", "gzip")
PAIRS = ("a", "a2", "b", "c", "c+", "d", "d-minilm", "e")
TOOL_TIMEOUT_S = 3600


@dataclass(frozen=True)
class Pair:
    key: str
    label: str
    workload: str
    old: Path
    new: Path
    target: float | None  # how many times smaller than the baseline the issue asks for
    note: str = ""
    baseline: str | None = None  # key of the pair whose HomeFleet payload is the baseline;
    # None: the best generic tool of this pair


@dataclass(frozen=True)
class DeltaRow:
    """One update pair: every tool's payload size, and HomeFleet's speed and memory."""

    key: str
    label: str
    workload: str
    raw: int  # the new model's size
    gzip9: int
    zstd19: int
    zstd_patch_from: int
    bsdiff: int
    xdelta3: int
    homefleet: int
    mode: str  # which HomeFleet payload was kept: delta or a whole-file fallback
    best_generic_tool: str
    best_generic: int
    target: float | None
    target_base: int  # the size the target ratio is measured against
    target_of: str  # what that size is: "best generic" or another pair's HomeFleet payload
    encode_mbps: float
    decode_mbps: float  # in memory, one core, sha256 checked: the decoder apply_delta picks
    python_decode_mbps: float  # the same with the Python decoder alone
    decoder: str  # "native" (artifact/delta/native.py) or "python"
    apply_ms: float  # file to file, as the agent applies it (temporary file, fsync, rename)
    decode_peak_heap: int  # bytes, tracemalloc
    decode_max_rss: int  # bytes, ru_maxrss of the decoding process
    encodings: tuple[tuple[str, int, int], ...]  # (encoding, tensors, coded bytes)
    note: str = ""

    @property
    def ratio(self) -> float:
        """How many times smaller HomeFleet's payload is than the best generic tool's."""
        return self.best_generic / self.homefleet

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        return self.target_base / self.homefleet >= self.target


# ----------------------------------------------------------------------- fine-tunes


def _single_thread() -> None:
    torch.set_num_threads(1)


def _fine_tune_classifier(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    params: list[nn.Parameter],
    epochs: int,
    lr: float,
    train_mode: bool,
    seed: int,
) -> nn.Module:
    """A few AdamW epochs on ``params`` only; ``train_mode`` False keeps BatchNorm frozen.

    With the source training's augmentation and label smoothing, so the fine-tune
    continues that training rather than overfitting the train split.
    """
    from controller.workloads.plaid import amplitude_jitter

    _single_thread()
    gen = torch.Generator().manual_seed(seed)
    xs, ys = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), torch.from_numpy(y)
    optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    for _ in range(epochs):
        model.train(train_mode)
        order = torch.randperm(len(xs), generator=gen)
        for start in range(0, len(xs), 32):
            idx = order[start : start + 32]
            if len(idx) < 2:
                continue
            batch = amplitude_jitter(xs[idx], gen)
            loss = F.cross_entropy(model(batch), ys[idx], label_smoothing=0.1)
            optimiser.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimiser.step()
    return model.eval()


@dataclass(frozen=True)
class FineTune:
    """A PLAID fine-tune: which weights train, how long, how fast."""

    name: str
    head_only: bool
    epochs: int
    lr: float
    seed: int
    batch_norm: bool = False  # also update BatchNorm statistics (train mode)


PLAID_FINE_TUNES = (
    FineTune("full", head_only=False, epochs=1, lr=1e-4, seed=1),  # (a), and (c) from it
    FineTune("full-long", head_only=False, epochs=3, lr=3e-4, seed=1, batch_norm=True),  # (a2)
    FineTune("head", head_only=True, epochs=3, lr=1e-3, seed=2),  # (b)
)


def _plaid_models(work: Path, progress: Progress) -> dict[str, Path]:
    """FP32 source and its fine-tunes as ONNX (built once per work dir).

    AdamW (weight decay 0.01) on the train split, batches of 32. BatchNorm statistics stay
    frozen (eval mode, usual when fine-tuning on little data) except in the longer run,
    where they move too and, folded into the exported convolutions, rescale every
    output channel.
    """
    from controller.workloads.registry import get_workload

    paths = {"fp32": work / "plaid-fp32.onnx"}
    paths |= {t.name: work / f"plaid-fp32-{t.name}.onnx" for t in PLAID_FINE_TUNES}
    if all(p.is_file() for p in paths.values()):
        return paths
    workload = get_workload("plaid")
    source = workload.source_model()
    data = workload.data().train
    (x,) = data.inputs.values()
    if data.labels is None:
        raise RuntimeError("PLAID's train split has no labels")
    workload.export_onnx(source, paths["fp32"])
    for tune in PLAID_FINE_TUNES:
        progress(f"delta: fine-tuning PLAID ({tune.name}: {tune.epochs} epoch(s), lr {tune.lr:g})")
        model = copy.deepcopy(source)
        head = model.head
        if not isinstance(head, nn.Module):
            raise RuntimeError("PlaidNet has no head")
        trained = head if tune.head_only else model
        _fine_tune_classifier(
            model,
            x,
            data.labels,
            params=list(trained.parameters()),
            epochs=tune.epochs,
            lr=tune.lr,
            train_mode=tune.batch_norm,
            seed=tune.seed,
        )
        workload.export_onnx(model, paths[tune.name])
    return paths


def _accuracy_note(old: Path, new: Path) -> str:
    from controller.workloads.registry import get_workload

    workload = get_workload("plaid")
    before, after = workload.score_onnx(old).value, workload.score_onnx(new).value
    return f"test accuracy {before * 100:.1f} % → {after * 100:.1f} %"


def _quantize_static(source: Path, out: Path, *, like: Path | None = None) -> Path:
    """The planner's static QDQ int8 (per channel, min/max) of a PLAID model.

    Without ``like``: accuracy-aware, as an artifact is made (nodes that cost more than
    half a point of validation accuracy stay in float; without that, quantizing PLAID's
    input scaling drops it to chance). With ``like``: a re-release with the recipe of
    that earlier artifact, the same nodes kept in float (recorded beside it).
    """
    from controller.compression.quantize import quantize_onnx
    from controller.compression.recipe import Quantize
    from controller.workloads.registry import get_workload

    kept_file = out.with_suffix(".float-nodes.json")
    if out.is_file() and kept_file.is_file():
        return out
    workload = get_workload("plaid")
    calibration = workload.calibration_inputs(64)
    if like is None:
        result = quantize_onnx(
            source,
            out,
            Quantize(mode="static"),
            calibration=calibration,
            evaluate=lambda path: workload.score_onnx(path, split="val").value,
            max_drop=0.005,
            progress=False,
        )
    else:
        kept = json.loads(like.with_suffix(".float-nodes.json").read_text())
        step = Quantize(mode="static", exclude_nodes=tuple(kept), accuracy_aware=False)
        result = quantize_onnx(source, out, step, calibration=calibration, progress=False)
    kept_file.write_text(json.dumps(list(result.excluded_nodes)))
    return out


def _reuse_quantization(old_int8: Path, new_int8: Path, new_fp32: Path, out: Path) -> Path:
    """Delta-friendly recompression as the planner's first recipes for a re-release make it
    (controller/compression/requantize.py): the fine-tuned float model quantized with the
    old artifact's graph, float nodes, scales and zero points, each hysteresis of
    ``REUSE_HYSTERESIS`` in turn until the validation accuracy drop from ``new_fp32`` fits
    half a point (the budget ``_quantize_static`` uses). ``new_int8`` is not needed.
    """
    del new_int8
    if out.is_file():
        return out
    from controller.compression.candidates import REUSE_HYSTERESIS
    from controller.compression.requantize import requantize_like
    from controller.workloads.registry import get_workload

    workload = get_workload("plaid")
    calibration = workload.calibration_inputs(64)
    source = workload.score_onnx(new_fp32, split="val").value
    for hysteresis in REUSE_HYSTERESIS:
        requantize_like(old_int8, new_fp32, out, calibration=calibration, hysteresis=hysteresis)
        if source - workload.score_onnx(out, split="val").value <= 0.005:
            break
    return out


def _minilm_models(work: Path, progress: Progress) -> dict[str, Path]:
    from controller.workloads.minilm import INPUT_NAMES
    from controller.workloads.registry import get_workload

    paths = {
        "fp32": work / "minilm-fp32.onnx",
        "tuned": work / "minilm-fp32-finetuned.onnx",
        "int8": work / "minilm-int8-dynamic.onnx",
    }
    workload = get_workload("minilm")
    cached = getattr(workload, "fp32_onnx")()  # noqa: B009 - MiniLM-specific
    if not paths["fp32"].is_file():
        shutil.copyfile(cached, paths["fp32"])
    if not paths["tuned"].is_file():
        progress("delta: fine-tuning MiniLM (8 AdamW steps on intent phrasings)")
        _single_thread()
        model = workload.source_model()
        data = workload.data().train
        if data.labels is None:
            raise RuntimeError("MiniLM's train split has no labels")
        ids, mask = (torch.from_numpy(data.inputs[n]) for n in INPUT_NAMES)
        labels = torch.from_numpy(data.labels)
        optimiser = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.01)
        gen = torch.Generator().manual_seed(3)
        model.train()
        for _ in range(8):
            idx = torch.randperm(len(ids), generator=gen)[:16]
            emb = model(ids[idx], mask[idx])
            same = (labels[idx, None] == labels[None, idx]).float()
            logits = emb @ emb.T / 0.05
            logits = logits - torch.eye(len(idx)) * 1e4  # not itself
            target = same - torch.eye(len(idx))
            target = target / target.sum(dim=1, keepdim=True).clamp(min=1)
            loss = -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
            optimiser.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimiser.step()
        workload.export_onnx(model.eval(), paths["tuned"])
    if not paths["int8"].is_file():
        progress("delta: quantizing MiniLM (dynamic int8, the planner's first recipe)")
        from controller.compression.quantize import quantize_onnx
        from controller.compression.recipe import Quantize

        quantize_onnx(
            paths["fp32"],
            paths["int8"],
            Quantize(mode="dynamic", accuracy_aware=False),
            calibration=None,
            progress=False,
        )
    return paths


def _plaid_pairs(work: Path, progress: Progress, keys: Sequence[str]) -> list[Pair]:
    plaid = _plaid_models(work, progress)
    fp32 = plaid["fp32"]
    pairs = {
        "a": Pair("a", "FP32 full fine-tune", "plaid", fp32, plaid["full"], 1.3),
        "a2": Pair("a2", "FP32 longer full fine-tune", "plaid", fp32, plaid["full-long"], None),
        "b": Pair("b", "FP32 head-only fine-tune", "plaid", fp32, plaid["head"], None),
    }
    if {"c", "c+", "d"} & set(keys):
        progress("delta: quantizing PLAID (static QDQ int8, per channel, min/max)")
        int8 = _quantize_static(fp32, work / "plaid-int8.onnx")
        tuned8 = _quantize_static(plaid["full"], work / "plaid-int8-full.onnx", like=int8)
        reused = _reuse_quantization(int8, tuned8, plaid["full"], work / "plaid-int8-reused.onnx")
        pairs |= {
            "c": Pair("c", "int8 → int8 after fine-tune", "plaid", int8, tuned8, 2.5),
            "c+": Pair(
                "c+",
                "int8 → int8, delta-friendly recompression",
                "plaid",
                int8,
                reused,
                2.0,
                baseline="c",
            ),
            "d": Pair("d", "FP32 → int8 (static QDQ)", "plaid", fp32, int8, 100.0),
        }
    chosen = [pairs[k] for k in PAIRS if k in pairs and k in keys]
    return [replace(p, note=_accuracy_note(p.old, p.new)) for p in chosen]


def build_pairs(work: Path, progress: Progress, keys: Sequence[str] = PAIRS) -> list[Pair]:
    """The update pairs named by ``keys`` (see PAIRS), their models built under ``work``."""
    work.mkdir(parents=True, exist_ok=True)
    pairs: list[Pair] = []
    if {"a", "a2", "b", "c", "c+", "d"} & set(keys):
        pairs += _plaid_pairs(work, progress, keys)
    if {"d-minilm", "e"} & set(keys):
        minilm = _minilm_models(work, progress)
        if "d-minilm" in keys:
            pairs.append(
                Pair("d", "FP32 → int8 (dynamic)", "minilm", minilm["fp32"], minilm["int8"], 100.0)
            )
        if "e" in keys:
            pairs.append(
                Pair("e", "FP32 short fine-tune", "minilm", minilm["fp32"], minilm["tuned"], 2.0)
            )
    return pairs


# ----------------------------------------------------------------------- measurements


def check_tools() -> None:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        raise RuntimeError(
            f"the delta benchmark needs {', '.join(missing)}: run `make bench-tools` "
            "(apt-get install zstd xdelta3 bsdiff)"
        )


def _run(argv: Sequence[str | Path]) -> None:
    subprocess.run([str(a) for a in argv], check=True, capture_output=True, timeout=TOOL_TIMEOUT_S)


def _size_of(argv: Sequence[str | Path], out: Path) -> int:
    out.unlink(missing_ok=True)
    _run(argv)
    size = out.stat().st_size
    out.unlink()
    return size


def generic_sizes(old: Path, new: Path, scratch: Path) -> dict[str, int]:
    """Payload size of each generic tool for this pair (their outputs are then deleted).

    Kept in ``scratch/generic-sizes.json`` by the pair's digests: bsdiff needs ~25 min
    on a 90 MB model, and a rerun over the same work dir need not repeat it.
    """
    cache_file = scratch / "generic-sizes.json"
    cache: dict[str, dict[str, int]] = (
        json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    )
    key = f"{sha256_file(old)}:{sha256_file(new)}"
    if key not in cache:
        cache[key] = _measure_generic(old, new, scratch / "generic.out")
        cache_file.write_text(json.dumps(cache, indent=1))
    return cache[key]


def _measure_generic(old: Path, new: Path, out: Path) -> dict[str, int]:
    data = new.read_bytes()
    return {
        "gzip -9": len(gzip.compress(data, compresslevel=9)),
        "zstd -19": _size_of(["zstd", "-19", "-q", "-f", new, "-o", out], out),
        "zstd --patch-from": _size_of(
            ["zstd", "-19", "--long=27", "-q", "-f", f"--patch-from={old}", new, "-o", out], out
        ),
        "bsdiff": _size_of(["bsdiff", old, new, out], out),
        "xdelta3 -9": _size_of(["xdelta3", "-9", "-e", "-f", "-s", old, new, out], out),
    }


_DECODE_PROBE = """
import json, os, sys, time, tracemalloc
from pathlib import Path
from artifact.delta import apply_delta, apply_delta_bytes, native
old, patch, out = map(Path, sys.argv[1:4])

def best(run, clock=time.process_time):
    # The fastest of at least 10 runs and 1.5 s. Decoding is timed in CPU seconds (one
    # core's work; what a busy or shared machine takes from it is not counted), a
    # file-to-file apply in wall seconds (it waits for fsync). On a shared VM single
    # runs of the same decode vary by half; the minimum of many does not.
    times, spent = [], 0.0
    while len(times) < 10 or spent < 1.5:
        started = clock()
        run()
        times.append(clock() - started)
        spent += times[-1]
    return min(times)

tracemalloc.start()
result = apply_delta(old, patch, out)
_, peak = tracemalloc.get_traced_memory()
tracemalloc.stop()
status = Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]
rss = int(status) * 1024  # not ru_maxrss: that keeps the forking parent's high-water mark
apply_seconds = best(lambda: apply_delta(old, patch, out), time.perf_counter)
old_bytes, patch_bytes = old.read_bytes(), patch.read_bytes()
seconds = best(lambda: apply_delta_bytes(old_bytes, patch_bytes))
os.environ[native.ENV] = "python"
python_seconds = best(lambda: apply_delta_bytes(old_bytes, patch_bytes))
print(json.dumps({"seconds": seconds, "python_seconds": python_seconds,
                  "apply_seconds": apply_seconds, "decoder": result.decoder,
                  "peak": peak, "rss": rss, "sha256": result.sha256}))
"""


@dataclass(frozen=True)
class Decode:
    seconds: float  # in memory, the decoder apply_delta picks
    python_seconds: float  # in memory, the Python decoder
    apply_seconds: float  # file to file: mapped base, temporary file, fsync, rename
    decoder: str  # which decoder apply_delta used: "native" or "python"
    peak_heap: int
    max_rss: int


def decode_in_subprocess(old: Path, patch: Path, out: Path, expected: bytes) -> Decode:
    """Apply the delta in a fresh interpreter (one core), and check the bytes it wrote."""
    done = subprocess.run(
        [sys.executable, "-c", _DECODE_PROBE, str(old), str(patch), str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=TOOL_TIMEOUT_S,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
    )
    report = json.loads(done.stdout.strip().splitlines()[-1])
    if out.read_bytes() != expected:
        raise RuntimeError(f"HomeFleet's delta for {out.name} did not rebuild the model")
    out.unlink()
    return Decode(
        report["seconds"],
        report["python_seconds"],
        report["apply_seconds"],
        report["decoder"],
        report["peak"],
        report["rss"],
    )


def measure(pair: Pair, scratch: Path, progress: Progress) -> DeltaRow:
    progress(f"delta ({pair.key}) {pair.workload}: {pair.label}")
    new_bytes = pair.new.read_bytes()
    generic = generic_sizes(pair.old, pair.new, scratch)
    patch = scratch / f"{pair.workload}-{pair.key}.hfd"
    stats = write_delta(pair.old, pair.new, patch, EncodeOptions())
    decode = decode_in_subprocess(pair.old, patch, scratch / "rebuilt.onnx", new_bytes)
    best_tool, best = min(generic.items(), key=lambda kv: kv[1])
    groups: dict[str, tuple[int, int]] = {}
    for t in stats.tensors:
        kind = t.encoding.split("/")[0] if not t.encoding.startswith("param") else "param"
        if t.encoding.endswith("/skeleton"):  # left in the skeleton: coded there
            kind = "in the skeleton"
        count, size = groups.get(kind, (0, 0))
        groups[kind] = (count + 1, size + t.coded_bytes)
    groups["skeleton"] = (1, stats.skeleton_coded)
    groups["table"] = (1, stats.table_coded)
    row = DeltaRow(
        key=pair.key,
        label=pair.label,
        workload=pair.workload,
        raw=len(new_bytes),
        gzip9=generic["gzip -9"],
        zstd19=generic["zstd -19"],
        zstd_patch_from=generic["zstd --patch-from"],
        bsdiff=generic["bsdiff"],
        xdelta3=generic["xdelta3 -9"],
        homefleet=stats.payload_size,
        mode=stats.mode,
        best_generic_tool=best_tool,
        best_generic=best,
        target=pair.target,
        target_base=best,
        target_of="best generic",
        encode_mbps=len(new_bytes) / stats.encode_seconds / 1e6,
        decode_mbps=len(new_bytes) / decode.seconds / 1e6,
        python_decode_mbps=len(new_bytes) / decode.python_seconds / 1e6,
        decoder=decode.decoder,
        apply_ms=decode.apply_seconds * 1e3,
        decode_peak_heap=decode.peak_heap,
        decode_max_rss=decode.max_rss,
        encodings=tuple((k, n, b) for k, (n, b) in sorted(groups.items())),
        note=pair.note,
    )
    patch.unlink()
    progress(
        f"delta ({pair.key}) {pair.workload}: {row.homefleet} B vs {best_tool} {best} B "
        f"({row.ratio:.1f}x), decode {row.decode_mbps:.0f} MB/s ({row.decoder}), "
        f"Python decoder {row.python_decode_mbps:.0f} MB/s"
    )
    return row


def delta_rows(work_dir: Path, progress: Progress, keys: Sequence[str] = PAIRS) -> list[DeltaRow]:
    """Build the update pairs under ``work_dir`` and measure every tool on each."""
    check_tools()
    work = work_dir / "delta"
    scratch = work / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    pairs = build_pairs(work, progress, keys)
    rows = [measure(pair, scratch, progress) for pair in pairs]
    by_key = {r.key: r for r in rows}
    for i, pair in enumerate(pairs):
        base = by_key.get(pair.baseline) if pair.baseline else None
        if base is not None:
            rows[i] = replace(
                rows[i], target_base=base.homefleet, target_of=f"({base.key}) HomeFleet"
            )
    return rows


# ----------------------------------------------------------------------- report


def _size(n: int) -> str:
    if n < 10 * 1024:
        return f"{n:,} B"
    if n < 10 * 2**20:
        return f"{n / 1024:,.1f} KiB"
    return f"{n / 2**20:,.1f} MiB"


def render_delta(rows: Sequence[DeltaRow]) -> list[str]:
    """The issue-4 table as markdown lines (sizes of the payload each tool sends)."""
    header = [
        "pair",
        "model",
        "raw",
        "gzip -9",
        "zstd -19",
        "zstd --patch-from",
        "bsdiff",
        "xdelta3 -9",
        "**HomeFleet**",
        "vs best generic",
        "target",
        "encode MB/s",
        "decode MB/s (Python decoder)",
        "apply file to file",
        "decode peak heap / RSS",
    ]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for r in rows:
        sizes = {
            "gzip -9": r.gzip9,
            "zstd -19": r.zstd19,
            "zstd --patch-from": r.zstd_patch_from,
            "bsdiff": r.bsdiff,
            "xdelta3 -9": r.xdelta3,
        }
        cells = [
            _size(v) if k != r.best_generic_tool else f"*{_size(v)}*" for k, v in sizes.items()
        ]
        target = "—"
        if r.target is not None:
            against = "" if r.target_of == "best generic" else f" vs {r.target_of}"
            target = f"≥{r.target:g}x{against} " + ("✓" if r.met else "**✗**")
        lines.append(
            "| "
            + " | ".join(
                [
                    f"({r.key}) {r.label}",
                    r.workload,
                    _size(r.raw),
                    *cells,
                    f"**{_size(r.homefleet)}**" + ("" if r.mode == "delta" else f" ({r.mode})"),
                    f"**{r.ratio:.1f}x**",
                    target,
                    f"{r.encode_mbps:.1f}",
                    f"{r.decode_mbps:.0f}"
                    + ("" if r.decoder == "native" else "¹")
                    + f" ({r.python_decode_mbps:.0f})",
                    f"{r.apply_ms:.1f} ms",
                    f"{_size(r.decode_peak_heap)} / {_size(r.decode_max_rss)}",
                ]
            )
            + " |"
        )
    lines += [
        "",
        "Best generic tool in *italics*; ratio = best generic payload / HomeFleet payload. "
        "HomeFleet never sends more than its whole-file fallback (zstd of the new file, with "
        "the old one as dictionary). Decode: one core, in memory (payload and base bytes in, "
        "the new model's bytes out, sha256 checked), in CPU time, the fastest of at least ten "
        "runs in a fresh interpreter, by the decoder the agent uses: the compiled one "
        "(artifact/delta/native.py), and in brackets the Python decoder it falls back to. "
        "¹ decoded in Python: targets over 16 MiB stream block by block in Python. Apply file "
        "to file: what the agent does, the base memory-mapped and the new file written "
        "through a temporary file, fsync'd and renamed (the same for a full download). Peak "
        "heap by tracemalloc and RSS in that file-to-file run (the base is memory-mapped, "
        "not counted; RSS includes the interpreter and the mapped base).",
        "",
        "Where HomeFleet's bytes go (encoding: tensors, bytes):",
        "",
    ]
    for r in rows:
        parts = ", ".join(f"{k} {n}: {_size(b)}" for k, n, b in r.encodings)
        lines.append(f"- ({r.key}) {r.workload}: {parts}" + (f" — {r.note}" if r.note else ""))
    return lines


def as_json(rows: Sequence[DeltaRow]) -> list[dict[str, object]]:
    return [{**asdict(r), "ratio": r.ratio, "met": r.met} for r in rows]


if __name__ == "__main__":  # python -m bench.delta [WORK_DIR] [PAIR ...]
    started = time.perf_counter()
    work_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(".cache/homefleet/bench")
    keys = tuple(sys.argv[2:]) or PAIRS

    def _progress(message: str) -> None:
        print(f"{time.perf_counter() - started:7.0f} s {message}", file=sys.stderr, flush=True)

    found = delta_rows(work_dir, _progress, keys)
    print("\n".join(render_delta(found)))
    (work_dir / "delta" / "results.json").write_text(json.dumps(as_json(found), indent=2))
