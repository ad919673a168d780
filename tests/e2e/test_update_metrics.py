"""What updates cost on the wire, in Prometheus on both sides (issue 4: "the agent reports
bytes received and the encoding used").

Real processes: a controller with `--metrics-port 0` and an agent with
`--metrics-listen`; a first release arrives in full, a fine-tune of it as a delta. The
controller's counters come from its database, so they survive its restart.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from prometheus_client.parser import text_string_to_metric_families

from tests.support.controller import reserve_port

from .harness import Agent, Controller, linear_model, wait_for

MODEL = "motion"
CLASS = "home-hub"


def fine_tuned(source: Path, out: Path) -> Path:
    """``source`` with its bias moved a little: a re-release a delta carries cheaply."""
    model = onnx.load(str(source))
    for i, tensor in enumerate(model.graph.initializer):
        if tensor.name == "b":
            moved = numpy_helper.to_array(tensor) + np.float32(0.01)
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(moved, "b"))
    onnx.save(model, str(out))
    return out


def scrape(address: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample at ``address``/metrics: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=30) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def controller_metrics(ctl: Controller) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    info = json.loads((ctl.data_dir / "controller.json").read_text())
    return scrape(str(info["metrics_address"]))


def fetched(ctl: Controller, sha256: str) -> list[dict[str, object]]:
    details = [json.loads(e.detail_json) for e in ctl.events("artifact.fetch")]
    return [d for d in details if d["target_sha256"] == sha256 and d["completed"]]


def test_both_sides_count_update_bytes_by_encoding_and_what_deltas_saved(tmp_path: Path) -> None:
    ctl = Controller(tmp_path / "controller", extra_args=("--metrics-port", "0")).start()
    sock = reserve_port()
    agent_metrics = f"127.0.0.1:{sock.getsockname()[1]}"
    sock.close()
    agent = Agent(
        "hub-1",
        CLASS,
        tmp_path / "agents" / "hub-1",
        ctl.address,
        ctl.public_key,
        extra_args=("--metrics-listen", agent_metrics),
    ).start()
    try:
        v1 = linear_model(tmp_path / "v1.onnx", seed=1, width=20_000)  # ~1.3 MB
        first = ctl.release(MODEL, v1, CLASS)
        ctl.wait_serving("hub-1", MODEL, first.sha256)
        second = ctl.release(MODEL, fine_tuned(v1, tmp_path / "v2.onnx"), CLASS)
        ctl.wait_serving("hub-1", MODEL, second.sha256)
        (full,) = wait_for("v1's fetch to be recorded", lambda: fetched(ctl, first.sha256))
        (delta,) = wait_for("v2's fetch to be recorded", lambda: fetched(ctl, second.sha256))
        assert (full["encoding"], delta["encoding"]) == ("full", "delta")
        delta_bytes = int(str(delta["bytes_sent"]))
        assert delta_bytes * 20 < second.size_bytes  # a bias moved: the delta is small

        def series(artifact_id: str, encoding: str) -> tuple[tuple[str, str], ...]:
            labels = {"device_class": CLASS, "model": MODEL, "artifact_id": artifact_id}
            return tuple(sorted({**labels, "encoding": encoding}.items()))

        for when in ("running", "after a restart"):
            seen = controller_metrics(ctl)
            v1_full, v2_delta = series(first.id, "full"), series(second.id, "delta")
            assert seen["homefleet_update_bytes_sent_total", v1_full] == first.size_bytes, when
            assert seen["homefleet_update_bytes_sent_total", v2_delta] == delta_bytes, when
            assert seen["homefleet_updates_completed_total", v2_delta] == 1, when
            assert seen["homefleet_update_fetches_total", v2_delta] == 1, when
            # what the delta saved: the artifact in full, against what was sent
            assert seen["homefleet_update_full_bytes_total", v2_delta] == second.size_bytes
            # and as the device reported applying them (its own count of the bytes)
            assert seen["homefleet_updates_applied_total", v1_full] == 1, when
            assert seen["homefleet_updates_applied_total", v2_delta] == 1, when
            received = "homefleet_update_bytes_received_total"
            assert seen[received, v1_full] == first.size_bytes, when
            assert seen[received, v2_delta] == delta_bytes, when
            applied_full = "homefleet_update_applied_full_bytes_total"
            assert seen[applied_full, v2_delta] == second.size_bytes, when
            if when == "running":
                assert ctl.stop() == 0, ctl.process.log()
                ctl.start()

        on_device = scrape(agent_metrics)
        by = {"model": MODEL}
        full_labels = tuple(sorted({**by, "encoding": "full"}.items()))
        delta_labels = tuple(sorted({**by, "encoding": "delta"}.items()))
        assert on_device["homefleet_agent_updates_total", full_labels] == 1
        assert on_device["homefleet_agent_updates_total", delta_labels] == 1
        received = "homefleet_agent_update_bytes_received_total"
        assert on_device[received, full_labels] == first.size_bytes
        assert on_device[received, delta_labels] == delta_bytes
        assert ("homefleet_agent_deltas_discarded_total", (("model", MODEL),)) not in on_device
    finally:
        agent.stop()
        ctl.stop()
