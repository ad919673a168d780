"""A download the agent finished is a completed update for the controller, every time.

QA: homefleet_updates_completed_total stayed 0 while the agent had applied the update;
its artifact.fetch event said "0 of 99447 bytes sent (interrupted)". The agent cancelled
the stream as soon as it held the last byte, and the controller counts a chunk only once
its write has returned: a cancel landing in between lost the count. The agent now reads
the stream to its end, and the controller ends it only after recording the call.

Real processes, as QA had them: the controller is `homefleet controller serve` (one on
the test's own event loop never loses the race), the downloads are the agent's real
fetch code, a few devices at once as when an update reaches a fleet (a busy controller
is where the cancel lands early). Two checks: no download goes uncounted, and each is
counted by the time it returns (its stream ended after the record); with the old
cancel, both failed in every one of 8 runs of this test on a 2-core machine.
"""

from __future__ import annotations

import asyncio
import json
import random
import urllib.request
from pathlib import Path
from typing import Any

import grpc.aio
from prometheus_client.parser import text_string_to_metric_families

from edge_agent.backoff import Backoff
from edge_agent.config import DEFAULT_CHUNK_BYTES
from edge_agent.fetch import FetchPlan, fetch_artifact
from edge_agent.hardware import collect
from edge_agent.store import StateStore
from protos import fleet_pb2, fleet_pb2_grpc
from tests.e2e.harness import Controller
from tests.edge_agent.models import large_add_model

DEVICES = tuple(f"hub-{n}" for n in range(1, 7))  # an update reaching a few devices at once
DOWNLOADS = 10  # by each of them, one after another
COUNTERS = ("homefleet_update_fetches_total", "homefleet_updates_completed_total")


def download_counts(ctl: Controller, artifact_id: str) -> tuple[float, float]:
    """(calls, completed updates) of ``artifact_id`` on the controller's /metrics."""
    address = json.loads((ctl.data_dir / "controller.json").read_text())["metrics_address"]
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=30) as response:
        text = response.read().decode()
    sums = dict.fromkeys(COUNTERS, 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in sums and sample.labels.get("artifact_id") == artifact_id:
                sums[sample.name] += sample.value
    return sums[COUNTERS[0]], sums[COUNTERS[1]]


def test_every_finished_download_of_a_single_chunk_artifact_counts_a_completed_update(
    tmp_path: Path,
) -> None:
    data = large_add_model(1.0, floats=25_000)  # ~100 kB, as in QA's report
    assert len(data) < DEFAULT_CHUNK_BYTES  # one chunk: its write is the last one
    model = tmp_path / "motions.onnx"
    model.write_bytes(data)
    ctl = Controller(tmp_path / "controller", extra_args=("--metrics-port", "0")).start()
    finished: list[str] = []  # downloads returned so far, by any device
    ahead: list[float] = []  # per download: completed updates counted minus those returned

    async def downloads(stub: Any, device: str, sha256: str, artifact_id: str) -> None:
        for i in range(DOWNLOADS):
            store = StateStore(tmp_path / device / str(i))  # nothing held: a full download
            plan = FetchPlan(device, sha256, len(data), DEFAULT_CHUNK_BYTES, 30.0, 3)
            backoff = Backoff(0.01, 0.05, rng=random.Random(i))
            result = await fetch_artifact(stub, store, plan, backoff)
            assert result.path.read_bytes() == data
            finished.append(device)
            returned = len(finished)
            _, completed = await asyncio.to_thread(download_counts, ctl, artifact_id)
            ahead.append(completed - returned)

    async def main() -> None:
        async with grpc.aio.insecure_channel(ctl.address) as channel:
            stub = fleet_pb2_grpc.AgentServiceStub(channel)  # type: ignore[no-untyped-call]
            for device in DEVICES:
                register = fleet_pb2.RegisterRequest(
                    device_id=device,
                    device_class="home-hub",
                    hardware=collect().to_proto(),
                    agent_version="test",
                )
                await stub.Register(register, timeout=30)
            artifact = await asyncio.to_thread(ctl.release, "motions", model, "home-hub")
            await asyncio.gather(
                *(downloads(stub, d, artifact.sha256, artifact.id) for d in DEVICES)
            )
            assert await asyncio.to_thread(download_counts, ctl, artifact.id) == (
                len(DEVICES) * DOWNLOADS,
                len(DEVICES) * DOWNLOADS,
            )

    try:
        asyncio.run(main())
    finally:
        code = ctl.stop()
    assert code == 0, ctl.process.log()
    # when a download returned, the controller had counted it (and every one before it) as
    # a completed update: its stream ended only after that
    assert min(ahead) >= 0, ahead
