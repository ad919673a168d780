"""The delta benchmark's harness on a small pair: every tool measured, the table rendered.

The real pairs (PLAID and MiniLM fine-tunes) take most of an hour (bsdiff alone ~25 min
on MiniLM); this keeps the code that measures and reports them from rotting.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np

from bench.delta import TOOLS, Pair, measure, render_delta
from tests.artifact.delta_models import Init, build, random_array, tweak


def test_a_pair_is_measured_with_every_tool_and_rendered(tmp_path: Path) -> None:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    assert not missing, f"{', '.join(missing)} missing: `make system-tools` installs them"
    rng = np.random.default_rng(2)
    weights = [Init(f"w{i}", random_array(rng, np.float32, (64, 48))) for i in range(4)]
    old, new = tmp_path / "old.onnx", tmp_path / "new.onnx"
    old.write_bytes(build(weights))
    new.write_bytes(build([replace(w, array=tweak(rng, w.array)) for w in weights]))
    messages: list[str] = []
    row = measure(
        Pair("a", "tiny fine-tune", "synthetic", old, new, 1.0), tmp_path, messages.append
    )
    assert row.raw == new.stat().st_size
    sizes = (row.gzip9, row.zstd19, row.zstd_patch_from, row.bsdiff, row.xdelta3)
    assert all(size > 0 for size in sizes)
    assert row.best_generic == min(sizes)
    assert 0 < row.homefleet < row.best_generic and row.met
    assert row.decode_mbps > 0 and row.decode_peak_heap > 0 and row.decode_max_rss > 0
    assert row.python_decode_mbps > 0 and row.apply_ms > 0
    assert row.decoder == "native"  # the compiled decoder, where the agent would use it
    lines = render_delta([row])
    assert lines[0].startswith("| pair |") and "(a) tiny fine-tune" in lines[2]
    assert any(line.startswith("- (a) synthetic:") for line in lines)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "generic-sizes.json",
        "new.onnx",
        "old.onnx",
    ]
