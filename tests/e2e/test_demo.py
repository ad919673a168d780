"""`make demo` as a user runs it: the whole scenario, real processes, real data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]


def test_demo_deploys_to_three_classes_and_every_device_is_accurate(tmp_path: Path) -> None:
    run_dir = tmp_path / "demo-run"
    result = subprocess.run(
        [sys.executable, "-m", "demo", "--run-dir", str(run_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr

    report = json.loads((run_dir / "demo-result.json").read_text())
    devices = report["devices"]
    assert {d["device_class"] for d in devices} == {"home-hub", "smart-speaker", "camera"}
    for device in devices:
        assert device["samples"] == 40  # the whole BasicMotions test split
        assert device["accuracy"] >= 0.9, device
        assert device["artifact_id"].endswith(f"/{device['device_class']}/v1")
        assert 0 < device["latency_ms_p50"] <= device["latency_ms_p95"]
    # the table a person reads names every device
    for device in devices:
        assert device["device_id"] in result.stdout

    # every process it started was stopped cleanly, and none is left behind
    assert len(report["processes"]) == 4
    assert all(p["returncode"] == 0 and not p["killed"] for p in report["processes"])
    leftovers = [
        p.info["cmdline"]
        for p in psutil.process_iter(["cmdline"])
        if p.info["cmdline"] and str(run_dir) in " ".join(p.info["cmdline"])
    ]
    assert leftovers == []
