"""A controller killed with SIGKILL takes its compression workers with it.

Nothing can run in a process killed that way, so the worker itself must notice: without
that, it went on computing a job its controller would fail at restart, holding about
half a gigabyte, for as long as the job took.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from tests.controller.test_compression_jobs import CALIBRATION, HOME_HUB, classifier

from .harness import ROOT, Controller, wait_for


def _running(pid: int) -> bool:
    """Alive and not a zombie (a re-parented orphan is reaped by whoever adopted it)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def test_a_worker_exits_when_its_controller_is_killed(tmp_path: Path) -> None:
    controller = Controller(tmp_path / "controller").start()
    try:
        model = tmp_path / "clf.onnx"
        model.write_bytes(classifier())
        controller.add_model("clf", model)
        device_class, calib = tmp_path / "home-hub.yaml", tmp_path / "inputs.npz"
        device_class.write_text(HOME_HUB)
        calib.write_bytes(CALIBRATION)
        started = subprocess.run(
            [
                sys.executable, "-m", "homefleet", "compress", "--controller", controller.address,
                "--model", "clf", "--device-class", str(device_class), "--calib", str(calib),
                "--max-bytes", "100", "--no-wait", "--json",
            ],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert started.returncode == 0, started.stderr
        job_id = json.loads(started.stdout)["id"]
        progress = controller.data_dir / "jobs" / str(job_id) / "progress.jsonl"

        def worker_pid() -> int | None:
            first = progress.read_text().partition("\n")[0] if progress.exists() else ""
            return int(json.loads(first)["pid"]) if first else None

        pid = wait_for("the job's worker to start", worker_pid)
        assert _running(pid)
    finally:
        controller.process.stop(signal.SIGKILL)
    wait_for("the orphaned worker to exit", lambda: None if _running(pid) else True)
