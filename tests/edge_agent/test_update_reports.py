"""What the agent learns while fetching an update reaches the operator (issue 4).

A real controller (SQLite, blob store, signing key) and the agent's real SyncLoop on one
event loop, over loopback gRPC; what the operator sees is read through the real
`homefleet devices` command. A delta that does not apply comes from the device's own
disk: the agent stopped half-way through a delta whose bytes then rotted (the controller
checks its own blobs, so it never sends a damaged delta), and resumes it after a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from controller.cli import output
from edge_agent.store import StateStore
from homefleet.cli import app
from protos import fleet_pb2
from tests.edge_agent.models import finetuned, large_add_model
from tests.edge_agent.test_sync import (
    DEVICE,
    deploy,
    fetches,
    register_other,
    reports,
    running_agent,
    scenario,
    wait_final,
)
from tests.support.controller import Controller, eventually

# Wide enough that no table cell is folded; no ambient controller address.
RUNNER = CliRunner(env={"COLUMNS": "1000", "HOMEFLEET_CONTROLLER": None, "HOMEFLEET_TLS": None})


def homefleet(*args: str) -> str:
    """Run `homefleet ARGS` as an operator would; its standard output."""
    result = RUNNER.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.stdout


async def devices_json(controller: Controller) -> dict[str, Any]:
    """This device's state for model "motions", as `homefleet devices --json` shows it."""
    text = await asyncio.to_thread(
        homefleet, "devices", "--json", "--controller", controller.address
    )
    (device,) = [d for d in json.loads(text)["devices"] if d["device_id"] == DEVICE]
    (state,) = [m for m in device["models"] if m["model_name"] == "motions"]
    return dict(state)


@dataclass(frozen=True)
class Update:
    old: str  # the artifact the agent serves, the delta's base
    new: fleet_pb2.Artifact
    delta_bytes: int  # the delta payload's size
    resumed_at: int  # bytes of it on the device's disk when the agent starts again


async def half_a_rotten_delta(controller: Controller, state: Path, old_data: bytes) -> Update:
    """With the agent stopped, serving ``old_data``: a new version assigned, and in the
    agent's state the first half of its delta as a download stopped there leaves it (the
    part file and its description), one byte of it flipped since."""
    async with running_agent(state, controller.address) as agent:
        old = (await deploy(controller, agent, old_data)).sha256
    model = await controller.add_model("motions", finetuned(old_data))
    new = await controller.create_artifact("motions", "home-hub", model.version)
    # assigned before the agent starts again, or it would drop the part file as unwanted;
    # the delta as the controller sends it, to another device of the class
    await controller.assign(new.id, device_class="home-hub")
    await register_other(controller, "prefetcher")
    request = fleet_pb2.FetchArtifactRequest(
        device_id="prefetcher", target_sha256=new.sha256, base_sha256=old
    )
    chunks = [c async for c in controller.agent.FetchArtifact(request, timeout=60)]
    assert chunks[0].encoding == fleet_pb2.PAYLOAD_ENCODING_DELTA
    payload = bytearray(b"".join(c.data for c in chunks))
    half = len(payload) // 2
    payload[half // 2] ^= 0x10
    store = StateStore(state)
    store.delta_partial_path(new.sha256).write_bytes(bytes(payload[:half]))
    info = {"sha256": chunks[0].payload_sha256, "total": len(payload), "base_sha256": old}
    store.delta_info_path(new.sha256).write_text(json.dumps(info))
    return Update(old, new, len(payload), half)


def test_a_discarded_delta_is_named_in_the_report_and_its_bytes_are_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    old_data = large_add_model(1.0)
    caplog.set_level(logging.INFO, logger="edge_agent")

    async def body(controller: Controller, state: Path) -> None:
        update = await half_a_rotten_delta(controller, state, old_data)
        old, new, full_bytes = update.old, update.new.sha256, update.new.size_bytes
        async with running_agent(state, controller.address) as agent:
            report = await wait_final(controller, new)
            assert agent.store.artifact_path(new).read_bytes() == finetuned(old_data)

        assert (report["outcome"], report["encoding"]) == ("active", "full"), report
        # every byte the update took: the delta (the half on disk, the half fetched now)
        # and then the full artifact
        assert report["bytes_received"] == update.delta_bytes + full_bytes

        async def both_fetches() -> list[int] | None:  # recorded as each call ends
            found = [f["bytes_sent"] for f in await fetches(controller, new)]
            return found if len(found) >= 2 else None

        sent = await eventually("both fetches to be recorded", both_fetches)
        assert sorted(sent) == sorted([update.delta_bytes - update.resumed_at, full_bytes])
        # the operator's view: `homefleet devices` (the controller's stored state)
        shown = await devices_json(controller)
        assert shown["last_outcome"] == "active" and shown["encoding"] == "full"
        assert shown["bytes_received"] == update.delta_bytes + full_bytes
        reason = shown["last_reason"]
        assert reason.startswith(f"delta from {old[:12]} discarded ({update.delta_bytes} bytes ")
        assert "hashes to" in reason and reason.endswith("; fetched the full artifact")
        table = await asyncio.to_thread(homefleet, "devices", "--controller", controller.address)
        row = next(line for line in table.splitlines() if "motions" in line)
        assert f"active: delta from {old[:12]} discarded" in row
        assert f"full {output.human_size(update.delta_bytes + full_bytes)}" in row
        # and while the full artifact was on its way, the controller already knew
        downloading = [r for r in await reports(controller, new) if r["reason"]]
        assert downloading[0]["outcome"] == "downloading"
        assert downloading[0]["reason"].endswith("; fetching the full artifact")
        assert downloading[0]["bytes_received"] == update.delta_bytes

    scenario(tmp_path, body)
    # the log tells the same story: the delta's resume point is not the full download's
    said = [r.getMessage() for r in caplog.records if r.name.startswith("edge_agent")]
    assert not [m for m in said if "resumed at byte" in m], said
    assert any("a discarded delta's included" in m for m in said)


def test_when_the_full_artifact_fails_too_the_failure_names_the_discarded_delta(
    tmp_path: Path,
) -> None:
    old_data = large_add_model(1.0)

    async def body(controller: Controller, state: Path) -> None:
        update = await half_a_rotten_delta(controller, state, old_data)
        full = controller.blob_path(update.new.sha256)  # the controller lost it too
        full.chmod(0o644)
        full.write_bytes(full.read_bytes()[:-1] + b"\0")
        async with running_agent(state, controller.address, fetch_attempts=1):
            report = await wait_final(controller, update.new.sha256)

        assert report["outcome"] == "failed", report
        assert (
            f"(fetching the full artifact: delta from {update.old[:12]} discarded"
            in (report["reason"])
        )

    scenario(tmp_path, body)


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    """The process's umask for a while (an unusual one: the test must not pass by luck)."""
    before = os.umask(mask)
    try:
        yield
    finally:
        os.umask(before)


def test_an_artifact_rebuilt_from_a_delta_gets_the_mode_of_a_full_download(
    tmp_path: Path,
) -> None:
    old_data = large_add_model(1.0)
    new_data = finetuned(old_data)

    async def body(controller: Controller, state: Path) -> None:
        async with running_agent(state, controller.address) as agent:
            old = (await deploy(controller, agent, old_data)).sha256
            new = (await deploy(controller, agent, new_data)).sha256
            report = await wait_final(controller, new)
            assert report["encoding"] == "delta"
            modes = [
                stat.S_IMODE(agent.store.artifact_path(sha).stat().st_mode) for sha in (old, new)
            ]
            assert modes == [0o664, 0o664]  # what open() makes under umask 002, both
            assert not list(agent.store.partial_dir.iterdir())  # nothing left behind

    with umask(0o002):
        scenario(tmp_path, body)
