"""A plaintext agent at a controller that serves mutual TLS is told, once, about --tls.

The real controller serves mutual TLS with a throwaway CA (tests.support.pki); the
agent's real SyncLoop dials it in plaintext, which the controller hangs up on during
the handshake. A controller that is simply away (connection refused) gets no hint.
"""

from __future__ import annotations

import asyncio
import logging
import random
from pathlib import Path

from edge_agent.config import AgentConfig
from edge_agent.hardware import collect
from edge_agent.runtime import ModelRuntime
from edge_agent.store import StateStore
from edge_agent.sync import SyncLoop
from tests.support.controller import WAIT_TIMEOUT_S, reserve_port, running_controller
from tests.support.pki import make_pki

RETRIES = 4  # failures to watch: the hint must come with the first and never again


class Warnings(logging.Handler):
    """The sync loop's reconnect warnings; ``enough`` once ``count`` have been logged."""

    def __init__(self, count: int) -> None:
        super().__init__(logging.WARNING)
        self.count = count
        self.messages: list[str] = []
        self.enough = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "reconnect attempt" in message:
            self.messages.append(message)
            if len(self.messages) >= self.count:
                self.enough.set()


async def reconnect_warnings(state: Path, controller: str) -> list[str]:
    """Run a plaintext SyncLoop against ``controller`` until it has failed RETRIES times."""
    config = AgentConfig(
        controller=controller,
        device_id="hub-1",
        device_class="home-hub",
        state_dir=state,
        backoff_initial_s=0.01,
        backoff_max_s=0.05,
    )
    loop = SyncLoop(
        config, StateStore(state), ModelRuntime(threads=1), collect(), rng=random.Random(0)
    )
    watch = Warnings(RETRIES)
    logger = logging.getLogger("edge_agent.sync")
    logger.addHandler(watch)
    task = asyncio.create_task(loop.run())
    try:
        await asyncio.wait_for(watch.enough.wait(), WAIT_TIMEOUT_S)
    finally:
        logger.removeHandler(watch)
        task.cancel()
        await asyncio.wait({task})
    return watch.messages


def test_a_plaintext_agent_at_a_tls_controller_gets_one_hint_about_tls(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")

    async def main() -> list[str]:
        async with running_controller(tmp_path / "c", tls_dir=pki.controller()) as controller:
            return await reconnect_warnings(tmp_path / "agent", controller.address)

    messages = asyncio.run(main())
    hinted = [m for m in messages if "--tls DIR" in m]
    assert len(hinted) == 1, messages
    assert messages[0] == hinted[0]  # at the first failure
    assert "mutual TLS" in hinted[0] and "homefleet certs device" in hinted[0]


def test_a_controller_that_is_away_gets_no_tls_hint(tmp_path: Path) -> None:
    refusing = reserve_port()
    try:
        address = f"127.0.0.1:{refusing.getsockname()[1]}"
        messages = asyncio.run(reconnect_warnings(tmp_path / "agent", address))
    finally:
        refusing.close()
    assert len(messages) >= RETRIES
    assert not [m for m in messages if "--tls" in m], messages
