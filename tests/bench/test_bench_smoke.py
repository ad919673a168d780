"""`python -m bench --quick` runs the whole harness on the smallest workload.

The full `make bench` takes about an hour and is not part of the suite; this keeps its
code from rotting: every section runs, the report holds every table and plot, and the
raw results are valid JSON with the same numbers.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_quick_bench_writes_every_table_and_plot(tmp_path: Path) -> None:
    out = tmp_path / "RESULTS.md"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = out.read_text()
    for heading in (
        "## Planner artifact vs FP32 source",
        "## Each technique alone on italy-power",
        "## Distillation vs the same student trained alone",
        "## Quantization families at one quality budget",
    ):
        assert heading in report
    assert "python -m bench --quick" in report  # the command that reproduces it
    raw = json.loads((tmp_path / "results.json").read_text())
    (planner,) = raw["planner"]
    assert planner["workload"] == "italy-power" and planner["device_class"] == "camera"
    assert planner["artifact_bytes"] <= planner["source_bytes"]
    (table,) = raw["techniques"]
    techniques = {row["technique"]: row for row in table["rows"]}
    source = techniques["FP32 source"]
    pruned = techniques["structured pruning 50 % (L1)"]
    assert pruned["macs"] < source["macs"] and pruned["params"] < source["params"]
    assert techniques["fp16"]["bytes"] < source["bytes"]
    (families,) = raw["quant-families"]
    quantizers = {row["label"]: row for row in families["rows"]}
    codebook = next(row for label, row in quantizers.items() if label.startswith("codebook 4"))
    int8 = next(row for row in families["rows"] if row["linear_int8"])
    assert codebook["status"] == "built" and 0 < codebook["bytes"] < int8["bytes"]
    for plot in ("planner-ratios.png", "techniques-italy-power.png"):
        assert (tmp_path / "plots" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
