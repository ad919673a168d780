"""Telemetry ingest benchmark (issue 5): windows per second one controller process stores.

A real controller runs as `homefleet controller serve` does (its own process, embedded
SQLite in its data directory). Client processes register N simulated devices and then
drive ``ReportTelemetry`` for a fixed time: each RPC is one device's batch of
``BATCH_WINDOWS`` windows with the next seqs (a device never has two batches in
flight, as an agent sends them), with realistic histograms (per-device log-normal
latencies, a few hundred inferences per 10 s window). Several RPCs are in flight per
client process so the client is not the bottleneck; the clients share the machine's
cores with the controller, so their CPU time is measured and reported too.

Windows/s is the number of rows in ``telemetry_windows`` after the run (counted in the
database, and checked against the windows acknowledged) over the wall time of the
drive phase. Latency is per RPC as the client sees it.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

Progress = Callable[[str], None]

DEVICE_COUNTS = (100, 1_000, 10_000)
BATCH_WINDOWS = 10
# 10 windows per call is an agent catching up a little; 100 is one back from an outage
# (its sender sends up to a full batch while the queue holds more).
BATCH_SIZES = (BATCH_WINDOWS, 100)
CLIENT_PROCESSES = 2
IN_FLIGHT_PER_CLIENT = 32  # 64 in all: the controller's default max_concurrent_rpcs
DRIVE_SECONDS = 15.0
WINDOW_MS = 10_000
# Windows are numbered from a month ago: the controller refuses windows from before a
# year ago (a device clock stuck in 1970) and after now.
BASE_MS = int(time.time() * 1000) - 30 * 24 * 3600 * 1000
MODEL = "ingest-bench"
START_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class IngestRow:
    devices: int
    batch_windows: int
    client_processes: int
    in_flight: int
    seconds: float  # wall time of the drive phase
    windows_acked: int
    windows_stored: int  # rows counted in the database after the run
    windows_per_s: float
    rpcs: int
    rpc_p50_ms: float
    rpc_p99_ms: float
    controller_cpu_s: float  # user + system of the controller process during the drive
    client_cpu_s: float  # user + system of all client processes during the drive
    register_seconds: float
    load_average: float  # 1-minute load average when the drive began (others' work too)


@dataclass(frozen=True)
class _ClientJob:
    address: str
    device_ids: tuple[str, ...]
    in_flight: int
    batch_windows: int
    seed: int
    artifact_sha256: str  # the controller accepts telemetry of its own artifacts only


@dataclass(frozen=True)
class _ClientResult:
    windows_acked: int
    latencies_s: list[float]
    cpu_s: float
    started: float  # time.time() the drive began and ended (same clock in every process)
    ended: float


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def _start_controller(data_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """`homefleet controller serve --port 0`; its address comes from controller.json."""
    command = [
        sys.executable,
        "-m",
        "homefleet",
        "controller",
        "serve",
        "--data-dir",
        str(data_dir),
        "--port",
        "0",
        "--log-level",
        "warning",
    ]
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL)
    info = data_dir / "controller.json"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the controller exited with {process.returncode} at start")
        try:
            found = json.loads(info.read_text())
            if found.get("pid") == process.pid:
                return process, str(found["address"])
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"the controller did not write {info} within {START_TIMEOUT_S:.0f} s")


def _release_model(address: str) -> str:
    """Add a tiny model and build its artifact for home-hub; return the artifact's sha256.

    Through the admin API like an operator: the controller takes telemetry only of the
    models it registered and the artifacts it built."""
    import grpc
    import onnx
    from onnx import TensorProto, helper

    from protos import fleet_pb2 as pb
    from protos import fleet_pb2_grpc

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        MODEL,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    data = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    raw = data.SerializeToString()
    onnx.checker.check_model(data)
    with grpc.insecure_channel(address) as channel:
        admin: Any = fleet_pb2_grpc.AdminServiceStub(channel)  # type: ignore[no-untyped-call]
        header = pb.AddModelHeader(name=MODEL, size_bytes=len(raw))
        admin.AddModel(iter([pb.AddModelChunk(header=header), pb.AddModelChunk(data=raw)]))
        request = pb.CreateArtifactRequest(model_name=MODEL, device_class="home-hub")
        artifact = admin.CreateArtifact(request, timeout=60)
    return str(artifact.sha256)


def _stop_controller(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _count_windows(data_dir: Path) -> int:
    with sqlite3.connect(data_dir / "homefleet.db") as conn:
        return int(conn.execute("SELECT COUNT(*) FROM telemetry_windows").fetchone()[0])


def _client(job: _ClientJob, conn: Connection) -> None:
    """A client process: register its devices, say so, wait for the start, drive, report."""
    asyncio.run(_client_main(job, conn))


async def _client_main(job: _ClientJob, conn: Connection) -> None:
    import grpc
    import numpy as np

    from artifact import histogram
    from protos import fleet_pb2 as pb
    from protos import fleet_pb2_grpc

    rng = np.random.default_rng(job.seed)
    async with grpc.aio.insecure_channel(job.address) as channel:
        agent: Any = fleet_pb2_grpc.AgentServiceStub(channel)  # type: ignore[no-untyped-call]
        hardware = pb.HardwareInfo(
            arch="x86_64", cpu_cores=4, memory_bytes=4 << 30, onnxruntime_version="1.20.0"
        )
        ids = list(job.device_ids)

        async def register(worker: int) -> None:
            for device_id in ids[worker :: job.in_flight]:
                await agent.Register(
                    pb.RegisterRequest(
                        device_id=device_id, device_class="home-hub", hardware=hardware
                    ),
                    timeout=60,
                )

        await asyncio.gather(*(register(w) for w in range(job.in_flight)))

        # Per device: a few realistic windows to cycle through (log-normal latencies
        # around a device-specific median, a few hundred inferences per window).
        templates: dict[str, list[pb.TelemetryWindow]] = {}
        for device_id in ids:
            median = float(rng.uniform(0.0003, 0.02))
            windows = []
            for _ in range(4):
                samples = rng.lognormal(np.log(median), 0.5, int(rng.integers(100, 1000)))
                windows.append(
                    pb.TelemetryWindow(
                        model_name=MODEL,
                        artifact_sha256=job.artifact_sha256,
                        count=len(samples),
                        errors=int(rng.integers(0, 2)),
                        latency_bucket_counts=histogram.histogram(samples.tolist()),
                        cpu_seconds=float(samples.sum()),
                        joules=float(samples.sum() * 3.5),
                        energy_source="estimate",
                        peak_memory_bytes=int(rng.integers(20, 60)) << 20,
                    )
                )
            templates[device_id] = windows
        next_seq = dict.fromkeys(ids, 1)
        conn.send("ready")
        deadline = conn.recv()  # time.time() at which to stop sending
        latencies: list[float] = []
        acked = 0
        cpu0 = time.process_time()
        started = time.time()

        async def drive(worker: int) -> None:
            nonlocal acked
            mine = ids[worker :: job.in_flight]
            turn = 0
            while mine and time.time() < deadline:
                device_id = mine[turn % len(mine)]
                turn += 1
                first = next_seq[device_id]
                pool = templates[device_id]
                batch = pb.TelemetryBatch(device_id=device_id)
                for seq in range(first, first + job.batch_windows):
                    w = batch.windows.add()
                    w.CopyFrom(pool[seq % len(pool)])
                    w.seq = seq
                    w.start_unix_ms = BASE_MS + (seq - 1) * WINDOW_MS
                    w.end_unix_ms = BASE_MS + seq * WINDOW_MS
                sent = time.perf_counter()
                ack = await agent.ReportTelemetry(batch, timeout=60)
                latencies.append(time.perf_counter() - sent)
                last = first + job.batch_windows - 1
                if ack.highest_seq != last:
                    raise RuntimeError(f"{device_id}: ack {ack.highest_seq}, expected {last}")
                next_seq[device_id] = last + 1
                acked += job.batch_windows

        await asyncio.gather(*(drive(w) for w in range(job.in_flight)))
        ended = time.time()
        conn.send(_ClientResult(acked, latencies, time.process_time() - cpu0, started, ended))


def measure(
    devices: int,
    progress: Progress,
    *,
    seconds: float = DRIVE_SECONDS,
    batch_windows: int = BATCH_WINDOWS,
    client_processes: int = CLIENT_PROCESSES,
    in_flight: int = IN_FLIGHT_PER_CLIENT,
) -> IngestRow:
    """One run against a fresh controller with ``devices`` simulated devices."""
    spawn = mp.get_context("spawn")  # no grpc state may cross a fork
    with tempfile.TemporaryDirectory(prefix="homefleet-ingest-") as tmp:
        data_dir = Path(tmp) / "controller"
        controller, address = _start_controller(data_dir)
        clients: list[tuple[Any, Connection]] = []
        try:
            ids = [f"dev-{i:05d}" for i in range(devices)]
            sha = _release_model(address)
            registered = time.perf_counter()
            total_in_flight = 0
            for k in range(client_processes):
                mine = tuple(ids[k::client_processes])
                job = _ClientJob(address, mine, min(in_flight, len(mine)), batch_windows, k, sha)
                total_in_flight += job.in_flight
                parent, child = spawn.Pipe()
                process = spawn.Process(target=_client, args=(job, child), daemon=True)
                process.start()
                clients.append((process, parent))
            for _, conn in clients:
                if conn.recv() != "ready":
                    raise RuntimeError("a client process failed while registering")
            register_seconds = time.perf_counter() - registered
            progress(f"ingest: {devices:,} devices registered in {register_seconds:.1f} s")
            load = os.getloadavg()[0]
            cpu0 = _cpu_seconds(controller.pid)
            deadline = time.time() + seconds
            for _, conn in clients:
                conn.send(deadline)
            results: list[_ClientResult] = [conn.recv() for _, conn in clients]
            controller_cpu = _cpu_seconds(controller.pid) - cpu0
            for process, _ in clients:
                process.join(timeout=30)
        finally:
            for process, _ in clients:
                if process.is_alive():
                    process.kill()
            _stop_controller(controller)
        stored = _count_windows(data_dir)
    acked = sum(r.windows_acked for r in results)
    if stored != acked:
        raise RuntimeError(f"{acked} windows acknowledged but {stored} stored")
    wall = max(r.ended for r in results) - min(r.started for r in results)
    latencies = sorted(x for r in results for x in r.latencies_s)
    row = IngestRow(
        devices=devices,
        batch_windows=batch_windows,
        client_processes=client_processes,
        in_flight=total_in_flight,
        seconds=wall,
        windows_acked=acked,
        windows_stored=stored,
        windows_per_s=stored / wall,
        rpcs=len(latencies),
        rpc_p50_ms=_percentile(latencies, 0.50) * 1000,
        rpc_p99_ms=_percentile(latencies, 0.99) * 1000,
        controller_cpu_s=controller_cpu,
        client_cpu_s=sum(r.cpu_s for r in results),
        register_seconds=register_seconds,
        load_average=load,
    )
    progress(
        f"ingest: {devices:,} devices: {row.windows_per_s:,.0f} windows/s, "
        f"p50 {row.rpc_p50_ms:.1f} ms, p99 {row.rpc_p99_ms:.1f} ms"
    )
    return row


def ingest_rows(
    progress: Progress,
    device_counts: Sequence[int] = DEVICE_COUNTS,
    batch_sizes: Sequence[int] = BATCH_SIZES,
    seconds: float = DRIVE_SECONDS,
) -> list[IngestRow]:
    return [
        measure(n, progress, seconds=seconds, batch_windows=b)
        for b in batch_sizes
        for n in device_counts
    ]


def render_ingest(rows: Sequence[IngestRow]) -> list[str]:
    """The issue-5 ingest table as markdown lines."""
    header = [
        "devices", "windows per RPC", "windows/s stored", "RPCs", "RPC p50 ms", "RPC p99 ms",
        "controller CPU", "clients' CPU", "load average", "stored = acked",
    ]  # fmt: skip
    body = [
        [
            f"{r.devices:,}",
            str(r.batch_windows),
            f"**{r.windows_per_s:,.0f}**",
            f"{r.rpcs:,} in {r.seconds:.1f} s",
            f"{r.rpc_p50_ms:.1f}",
            f"{r.rpc_p99_ms:.1f}",
            f"{r.controller_cpu_s / r.seconds:.2f} cores",
            f"{r.client_cpu_s / r.seconds:.2f} cores",
            f"{r.load_average:.1f}",
            f"{r.windows_stored:,} = {r.windows_acked:,}",
        ]
        for r in rows
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in body]


def as_json(rows: Sequence[IngestRow]) -> list[dict[str, object]]:
    return [asdict(r) for r in rows]


if __name__ == "__main__":  # python -m bench.ingest BATCH DEVICES...: just the table
    batch = int(sys.argv[1]) if len(sys.argv) > 1 else BATCH_WINDOWS
    counts = tuple(int(a) for a in sys.argv[2:]) or DEVICE_COUNTS
    found = ingest_rows(lambda m: print(m, file=sys.stderr, flush=True), counts, (batch,))
    print("\n".join(render_ingest(found)))
