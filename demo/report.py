"""What the demo shows at the end: a table per device, and the same facts as JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rich.table import Table

from artifact.files import atomic_write_bytes
from demo.budget_loop import ArtifactNumbers, Decision
from demo.fleet import DeviceSpec
from demo.inference import InferenceRun
from demo.operator import ArtifactRef
from demo.processes import StopResult


@dataclass(frozen=True)
class DeviceResult:
    """One device's outcome: what it was assigned and how it answered the test set."""

    device: DeviceSpec
    artifact: ArtifactRef
    run: InferenceRun


@dataclass(frozen=True)
class LoopResult:
    """The closed loop as the demo saw it: the controller's decisions and the numbers."""

    decisions: list[Decision]
    numbers: list[ArtifactNumbers]
    inferences: int


def results_table(results: list[DeviceResult], test_set: str) -> Table:
    table = Table(
        title=f"Local inference on every device — {test_set}",
        title_justify="left",
        caption=(
            "p50/p95: each Predict call's round trip as an app on this machine sees it; an "
            "agent's --emulate-slowdown scales only the latency it reports to the controller"
        ),
        caption_justify="left",
    )
    table.add_column("device", overflow="fold")
    table.add_column("class", overflow="fold")
    table.add_column("threads", justify="right")
    table.add_column("artifact", overflow="fold")
    table.add_column("accuracy", justify="right")
    table.add_column("p50 ms", justify="right")
    table.add_column("p95 ms", justify="right")
    table.add_column("N", justify="right")
    for r in results:
        table.add_row(
            r.device.device_id,
            r.device.device_class,
            str(r.device.threads),
            r.artifact.artifact_id,
            f"{r.run.accuracy:.3f}",
            f"{r.run.latency_percentile(50):.2f}",
            f"{r.run.latency_percentile(95):.2f}",
            str(r.run.samples),
        )
    return table


def write_result_json(
    path: Path,
    results: list[DeviceResult],
    loop: LoopResult,
    stops: list[StopResult],
) -> None:
    """Everything the demo measured, for scripts and end-to-end tests to check."""
    document = {
        "loop": {
            "inferences": loop.inferences,
            "decisions": [
                {
                    "at_s": d.at_s,
                    "kind": d.kind,
                    "subject": d.subject,
                    "message": d.message,
                    "detail": d.detail,
                }
                for d in loop.decisions
            ],
            "numbers": [
                {
                    "device_class": n.device_class,
                    "artifact_id": n.artifact_id,
                    "inferences": n.inferences,
                    "p95_ms": n.p95_ms,
                    "energy_mj": n.energy_mj,
                }
                for n in loop.numbers
            ],
        },
        "devices": [
            {
                "device_id": r.device.device_id,
                "device_class": r.device.device_class,
                "threads": r.device.threads,
                "artifact_id": r.artifact.artifact_id,
                "artifact_sha256": r.artifact.sha256,
                "samples": r.run.samples,
                "accuracy": r.run.accuracy,
                "latency_ms_p50": r.run.latency_percentile(50),
                "latency_ms_p95": r.run.latency_percentile(95),
            }
            for r in results
        ],
        "processes": [
            {
                "name": s.name,
                "returncode": s.returncode,
                "killed": s.killed,
                "exited_before_stop": s.exited_before_stop,
            }
            for s in stops
        ],
    }
    atomic_write_bytes(path, json.dumps(document, indent=2).encode() + b"\n")
