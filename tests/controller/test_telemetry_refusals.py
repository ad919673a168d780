"""Refused telemetry is visible on the controller, not only in the device's log.

The agent drops windows the controller refuses (and counts them in its own /metrics);
an operator watching the fleet sees them as `homefleet_telemetry_refusals_total` per
class and reason, and as one `telemetry.refused` event an hour per device and reason
naming the device and what it was told.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path

import grpc
from prometheus_client.parser import text_string_to_metric_families

from controller.clock import unix_ms
from tests.controller.helpers import Harness, catalogue, expect_status, run, running_controller
from tests.controller.test_telemetry_abuse import DAY, MINUTE, SHA, send, window

INVALID = grpc.StatusCode.INVALID_ARGUMENT


async def refusals(c: Harness) -> dict[tuple[str, str], float]:
    """homefleet_telemetry_refusals_total by (device_class, reason), from a real scrape."""
    address = json.loads(c.config.info_path.read_text())["metrics_address"]

    def scrape() -> str:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=30) as response:
            return str(response.read().decode())

    text = await asyncio.to_thread(scrape)
    return {
        (s.labels["device_class"], s.labels["reason"]): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "homefleet_telemetry_refusals_total"
    }


def test_refused_windows_are_counted_by_class_and_reason_and_named_once_an_hour(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        async with running_controller(tmp_path, metrics_port=0) as c:
            catalogue(c.config.database_url, "motions", SHA)
            await c.register("hub-1", "home-hub")
            await c.register("cam-1", "camera")
            now = unix_ms()
            stale = window(1, now - 400 * DAY, now - 400 * DAY + 10_000)  # a clock in the past
            for _ in range(3):  # the agent retries nothing, but other windows of its kind come
                await expect_status(send(c, "hub-1", stale), INVALID, "set the device's clock")
            ghost = window(1, now - MINUTE, now - MINUTE + 10_000, model="ghost")
            await expect_status(send(c, "cam-1", ghost), INVALID, "not registered")
            huge = window(2, now - MINUTE, now - MINUTE + 10_000, joules=1e9)
            await expect_status(send(c, "cam-1", huge), INVALID, "above its bound")
            # a device nobody registered has no class to count under, and no event
            await expect_status(send(c, "stranger", stale), INVALID)
            # what is accepted is not counted
            assert await send(c, "hub-1", window(1, now - MINUTE, now - MINUTE + 10_000)) == 1

            assert await refusals(c) == {
                ("home-hub", "clock"): 3,
                ("camera", "unknown_model"): 1,
                ("camera", "bounds"): 1,
            }
            events = await c.events("telemetry.refused")
            assert sorted((e.subject, json.loads(e.detail_json)["reason"]) for e in events) == [
                ("cam-1", "bounds"),
                ("cam-1", "unknown_model"),
                ("hub-1", "clock"),
            ]
            (clock,) = [e for e in events if e.subject == "hub-1"]
            assert "set the device's clock (NTP)" in clock.message
            assert clock.message.startswith("device hub-1: telemetry refused (clock): ")

    run(body())


def test_refusals_survive_a_controller_restart(tmp_path: Path) -> None:
    """Counters from the database: a restarted (or another) replica exports the same."""

    async def body() -> None:
        async with running_controller(tmp_path, metrics_port=0) as c:
            await c.register("hub-1", "home-hub")
            now = unix_ms()
            ahead = window(1, now + DAY, now + DAY + 10_000)  # a clock in the future
            await expect_status(send(c, "hub-1", ahead), INVALID, "in the future")
        async with running_controller(tmp_path, metrics_port=0) as c:
            assert await refusals(c) == {("home-hub", "clock"): 1}
            assert [e.subject for e in await c.events("telemetry.refused")] == ["hub-1"]

    run(body())
