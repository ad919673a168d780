"""The agent process: restore what was served, open the local API, stay in sync, stop cleanly.

On start it serves the models it had before (re-verified on disk) at once, even while
the controller is away; agent.json appears only once the local API listens, and goes
away on a graceful stop, so a reader never finds a stale address. Every Predict is
measured (telemetry), its windows are queued on disk and sent by the sync loop; a
graceful stop persists the window still open. What can be checked without the state
directory (the pinned key, the --listen address: a path that cannot work, a port or
socket another process serves) is checked before anything is written there, so an agent
refused for its configuration leaves a fresh directory as it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from pathlib import Path

from artifact.signing import SignatureError, TrustedKey
from edge_agent import hardware
from edge_agent.config import AgentConfig
from edge_agent.errors import AgentError, ErrorCode
from edge_agent.local_api import LocalApi, listen_problem, start_local_api
from edge_agent.meters import choose_meter
from edge_agent.metrics import AgentMetrics, serve_metrics
from edge_agent.runtime import ModelRuntime, ModelSlot
from edge_agent.store import SlotRecord, StateStore
from edge_agent.sync import SyncLoop
from edge_agent.telemetry import Telemetry, close_windows_forever
from edge_agent.telemetry_queue import TelemetryQueue

log = logging.getLogger(__name__)


def load_trust_key(path: Path | None) -> TrustedKey | None:
    if path is None:
        return None
    try:
        return TrustedKey.from_pem(path.read_bytes())
    except (OSError, ValueError, SignatureError) as exc:
        raise AgentError(
            ErrorCode.INVALID_CONFIG,
            f"--trust-key: {path} is not an ed25519 public key in PEM: {exc}",
        ) from exc


def _restore_one(
    store: StateStore, runtime: ModelRuntime, model: str, record: SlotRecord
) -> ModelSlot | None:
    if not store.verify_artifact(record.sha256):
        log.error("model %s: artifact %s is missing or corrupt on disk", model, record.sha256)
        return None
    try:
        return runtime.prepare(model, store.artifact_path(record.sha256), record)
    except AgentError as exc:
        log.error("model %s: artifact %s no longer loads: %s", model, record.sha256, exc.message)
        return None


def restore_slots(store: StateStore, runtime: ModelRuntime) -> None:
    """Load each model's active artifact (else its previous one) as it was before the restart."""
    try:
        slots = store.load_slots()
    except AgentError as exc:
        aside = store.quarantine_slots()
        log.error("%s; moved it to %s and starting with no models", exc.message, aside)
        return
    changed = False
    for model, held in slots.models.items():
        runtime.restore_floors(model, held.version_floor, held.floor_artifacts())
        active = _restore_one(store, runtime, model, held.active) if held.active else None
        previous = _restore_one(store, runtime, model, held.previous) if held.previous else None
        changed |= (held.active is not None and active is None) or (
            held.previous is not None and previous is None
        )
        if active is None and previous is not None:
            log.warning("model %s: serving the previous slot %s instead", model, previous.sha256)
            active, previous = previous, None
        if active is None:
            log.error(
                "model %s: no usable artifact; serving nothing for it "
                "until the controller sends one",
                model,
            )
            continue
        runtime.restore(active, previous)
        log.info("model %s: serving %s (restored)", model, active.sha256)
    if changed:
        store.save_slots(runtime.snapshot())


def preflight(config: AgentConfig) -> TrustedKey | None:
    """Every check of the configuration that needs no state directory, made before
    anything is written there: a configuration error leaves a fresh --state-dir as it
    was (absent or empty), not holding agent.lock, artifacts/ or telemetry.db.
    Returns the pinned key."""
    trusted = load_trust_key(config.trust_key)
    problem = listen_problem(config.listen)
    if problem is not None:
        raise problem
    return trusted


def warn_unverified() -> None:
    """Said at start: an agent that pins no key deploys whatever the controller sends."""
    log.warning(
        "manifests are NOT verified: no controller key is pinned (--trust-key), so this "
        "agent deploys any manifest the controller (or whoever answers at its address) "
        "sends; for tests and demos only (--allow-unsigned-manifests)"
    )


async def run_agent(config: AgentConfig, stop: asyncio.Event) -> None:
    """Run until ``stop`` is set; setup problems raise AgentError before anything listens."""
    trusted = preflight(config)
    store = StateStore(config.state_dir)
    with store.locked():
        store.remove_agent_info()
        runtime = ModelRuntime(config.threads)
        await asyncio.to_thread(restore_slots, store, runtime)
        async with contextlib.AsyncExitStack() as telemetry_stack:
            queue = TelemetryQueue(config.state_dir, config.telemetry_max_windows)
            telemetry_stack.callback(queue.close)
            metrics = AgentMetrics(runtime, queue)
            meter = choose_meter(config.sysfs_root, config.power_model)
            telemetry = Telemetry(meter, observer=metrics, slowdown=config.emulate_slowdown)
            if trusted is None:
                warn_unverified()
            if config.emulate_slowdown != 1.0:
                log.warning(
                    "emulating a device %gx slower: telemetry reports latency, CPU time and "
                    "energy scaled by that factor (demos and tests only)",
                    config.emulate_slowdown,
                )
            if config.metrics_listen is not None:
                telemetry_stack.callback(serve_metrics(metrics, config.metrics_listen).stop)
            api = await start_local_api(
                runtime, config.listen, config.max_concurrent_predicts, telemetry
            )
            windows = asyncio.create_task(
                close_windows_forever(telemetry, queue, config.telemetry_window_s), name="windows"
            )
            telemetry_stack.push_async_callback(_persist_last_windows, windows)
            await _serve(config, store, runtime, trusted, api, queue, metrics, stop)


async def _persist_last_windows(windows: asyncio.Task[None]) -> None:
    windows.cancel()  # close_windows_forever persists the windows still open
    with contextlib.suppress(asyncio.CancelledError):
        await windows


async def _serve(
    config: AgentConfig,
    store: StateStore,
    runtime: ModelRuntime,
    trusted: TrustedKey | None,
    api: LocalApi,
    queue: TelemetryQueue,
    metrics: AgentMetrics,
    stop: asyncio.Event,
) -> None:
    sync_task: asyncio.Task[None] | None = None
    try:
        store.write_agent_info(api.address, config.device_id)
        facts = await asyncio.to_thread(hardware.collect)
        sync = SyncLoop(
            config,
            store,
            runtime,
            facts,
            trusted,
            telemetry=queue,
            on_update=metrics.observe_update,
        )
        sync_task = asyncio.create_task(sync.run(), name="sync")
        stop_task = asyncio.create_task(stop.wait(), name="stop")
        await asyncio.wait({sync_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
        stop_task.cancel()
        if sync_task.done():
            sync_task.result()  # SyncLoop.run only ends by raising: surface it
    finally:
        log.info("stopping")
        if sync_task is not None and not sync_task.done():
            sync_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sync_task
        await api.stop()
        store.remove_agent_info()


async def serve(config: AgentConfig) -> None:
    """run_agent with SIGTERM and SIGINT wired to a graceful stop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await run_agent(config, stop)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
