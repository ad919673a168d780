"""The controller process: health, reflection, controller.json, signals, and a light CLI import."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from artifact.signing import TrustedKey
from controller.config import ControllerConfig
from controller.server import ControllerServer, ControllerStartError
from tests.controller.helpers import onnx_model, run, running_controller

ROOT = Path(__file__).resolve().parents[2]


def test_health_reports_serving_for_the_server_and_each_service(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_controller(tmp_path) as c:
            stub = health_pb2_grpc.HealthStub(c.channel)
            for service in ("", "homefleet.v1.AgentService", "homefleet.v1.AdminService"):
                response = await stub.Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=10
                )
                assert response.status == health_pb2.HealthCheckResponse.SERVING

    run(body())


def test_reflection_lists_the_services(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_controller(tmp_path) as c:
            stub = reflection_pb2_grpc.ServerReflectionStub(c.channel)
            call = stub.ServerReflectionInfo(timeout=10)
            await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
            response = await call.read()
            await call.done_writing()
            names = {s.name for s in response.list_services_response.service}
            assert {
                "homefleet.v1.AgentService",
                "homefleet.v1.AdminService",
                "grpc.health.v1.Health",
                "grpc.reflection.v1alpha.ServerReflection",
            } <= names

    run(body())


def test_start_writes_controller_json_and_keys_and_stop_removes_it(tmp_path: Path) -> None:
    async def body() -> None:
        config = ControllerConfig(data_dir=tmp_path / "data", port=0)
        server = ControllerServer(config)
        info = await server.start()
        try:
            written = json.loads(config.info_path.read_text())
            assert written == {
                "address": f"127.0.0.1:{server.port}",
                "pid": os.getpid(),
                "public_key_path": str(config.key_dir / "signing.pub.pem"),
                "key_id": info.key_id,
            }
            assert server.port > 0
            assert (config.data_dir / "homefleet.db").is_file()
            assert (config.key_dir / "signing.pem").stat().st_mode & 0o777 == 0o600
            pinned = TrustedKey.from_pem((config.key_dir / "signing.pub.pem").read_bytes())
            assert pinned.key_id == info.key_id
        finally:
            await server.stop(grace=0)
        assert not config.info_path.exists()

        # a restart keeps the key
        again = ControllerServer(config)
        info2 = await again.start()
        await again.stop(grace=0)
        assert info2.key_id == info.key_id

    run(body())


def test_an_empty_database_beside_stored_blobs_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A deleted or truncated homefleet.db would silently forget the whole fleet."""

    async def body() -> None:
        async with running_controller(tmp_path) as c:
            await c.add_model("motions", onnx_model())
        db = tmp_path / "data" / "homefleet.db"
        db.write_bytes(b"")
        for suffix in ("-wal", "-shm"):
            db.with_name(f"homefleet.db{suffix}").unlink(missing_ok=True)
        async with running_controller(tmp_path):
            pass

    with caplog.at_level(logging.WARNING, logger="controller.server"):
        run(body())
    [warning] = [r.getMessage() for r in caplog.records if "is new or empty" in r.getMessage()]
    assert "holds 1 blob(s): was the database deleted or truncated?" in warning


def test_a_port_in_use_is_a_clear_start_error(tmp_path: Path) -> None:
    async def body() -> None:
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            server = ControllerServer(ControllerConfig(data_dir=tmp_path, port=port))
            with pytest.raises(ControllerStartError, match=f"127.0.0.1:{port}"):
                await server.start()
            await server.stop(grace=0)

    run(body())


def serve_command(data_dir: Path, *extra: str) -> list[str]:
    code = "from controller.serve import app; app(prog_name='homefleet controller')"
    return [sys.executable, "-c", code, "serve", "--data-dir", str(data_dir), *extra]


def wait_for_file(path: Path, process: subprocess.Popen[bytes], within: float = 60.0) -> None:
    deadline = time.monotonic() + within
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"controller exited early: {process.stderr.read()!r}")  # type: ignore[union-attr]
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear")
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_command_runs_until_a_signal_and_exits_zero(tmp_path: Path, sig: int) -> None:
    data_dir = tmp_path / "data"
    process = subprocess.Popen(
        serve_command(data_dir, "--port", "0", "--log-level", "warning"),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        info_path = data_dir / "controller.json"
        wait_for_file(info_path, process)
        info = json.loads(info_path.read_text())
        assert info["pid"] == process.pid
        with grpc.insecure_channel(info["address"]) as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
            assert response.status == health_pb2.HealthCheckResponse.SERVING
        process.send_signal(sig)
        assert process.wait(timeout=30) == 0
        assert not info_path.exists()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_serve_command_refuses_bad_flags(tmp_path: Path) -> None:
    done = subprocess.run(
        serve_command(tmp_path, "--port", "70000"), cwd=ROOT, capture_output=True, timeout=60
    )
    assert done.returncode == 2
    assert b"--port must be an integer in 0..65535" in done.stderr
    done = subprocess.run(
        serve_command(tmp_path, "--log-level", "loud"), cwd=ROOT, capture_output=True, timeout=60
    )
    assert done.returncode == 2
    for flag, value, message in (
        ("--compression-workers", "0", b"--compression-workers must be an integer in 1..64"),
        ("--max-active-jobs", "0", b"--max-active-jobs must be an integer in 1..10000"),
        ("--canary-share", "1.5", b"--canary-share must be in (0, 1]"),
        ("--budget-windows", "0", b"--budget-windows must be an integer in 1..1000"),
        ("--delta-threads", "0", b"--delta-threads must be an integer in 1..64"),
        ("--blob-read-threads", "300", b"--blob-read-threads must be an integer in 1..256"),
        (
            "--verified-blob-trust-seconds",
            "0",
            b"--verified-blob-trust-seconds must be a number of seconds in (0, 86400]",
        ),
    ):
        done = subprocess.run(
            serve_command(tmp_path, flag, value), cwd=ROOT, capture_output=True, timeout=60
        )
        assert done.returncode == 2, flag
        assert message in done.stderr, done.stderr
    assert not (tmp_path / "homefleet.db").exists()  # refused before anything was made


def test_start_errors_an_operator_must_fix_exit_2_and_transient_ones_exit_1(
    tmp_path: Path,
) -> None:
    """The systemd unit restarts exit 1 and not exit 2: a typo must not loop forever."""
    broken = tmp_path / "classes"
    broken.mkdir()
    (broken / "hub.yaml").write_text("name: [unclosed\n")
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    for extra, message in (
        (("--device-classes", str(broken)), b"hub.yaml"),
        (("--device-classes", str(tmp_path / "missing")), b"is not a directory"),
    ):
        done = subprocess.run(
            serve_command(tmp_path / "data", "--port", "0", *extra),
            cwd=ROOT,
            capture_output=True,
            timeout=60,
        )
        assert done.returncode == 2, done.stderr
        assert message in done.stderr, done.stderr
        # refused before the data directory was touched: no empty database, no new key
        assert not (tmp_path / "data").exists()
    done = subprocess.run(
        serve_command(a_file, "--port", "0"), cwd=ROOT, capture_output=True, timeout=60
    )
    assert done.returncode == 2, done.stderr
    assert b"cannot use data directory" in done.stderr
    garbled = tmp_path / "garbled"
    garbled.mkdir()
    (garbled / "homefleet.db").write_bytes(bytes(range(256)) * 200)
    done = subprocess.run(
        serve_command(garbled, "--port", "0"), cwd=ROOT, capture_output=True, timeout=60
    )
    assert done.returncode == 2, done.stderr
    assert b"cannot be used (file is not a database): restore it from a backup" in done.stderr
    assert b"Traceback" not in done.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        for flags, flag in (
            (("--port", port), "--port"),
            (("--metrics-port", port), "--metrics-port"),
        ):
            done = subprocess.run(
                serve_command(tmp_path / "data", "--port", "0", *flags),
                cwd=ROOT,
                capture_output=True,
                timeout=60,
            )
            assert done.returncode == 1, done.stderr
            assert f"port {port} is already in use".encode() in done.stderr, done.stderr
            assert f"choose another {flag}".encode() in done.stderr
            # no database, no signing key for a busy port
            assert not (tmp_path / "data").exists()


def test_a_second_controller_on_one_data_dir_gives_controller_json_back_when_it_stops(
    tmp_path: Path,
) -> None:
    """Replicas may share a data directory; the one that stops last must stay findable."""
    data_dir = tmp_path / "data"
    info_path = data_dir / "controller.json"
    started: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            serve_command(data_dir, "--port", "0", "--log-level", "warning"),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        started.append(process)
        deadline = time.monotonic() + 60
        while not (info_path.exists() and json.loads(info_path.read_text())["pid"] == process.pid):
            assert process.poll() is None, process.stderr.read()  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "controller.json never named the new process"
            time.sleep(0.05)
        return process

    try:
        first = start()
        first_info = json.loads(info_path.read_text())
        second = start()
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=30) == 0
        assert b"another controller (pid %d" % first.pid in second.stderr.read()  # type: ignore[union-attr]
        assert json.loads(info_path.read_text()) == first_info
        with grpc.insecure_channel(first_info["address"]) as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
        assert response.status == health_pb2.HealthCheckResponse.SERVING
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=30) == 0
        assert not info_path.exists()
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
                process.wait()


def test_importing_the_cli_entry_points_stays_light() -> None:
    code = (
        "import sys, controller, controller.serve\n"
        "heavy = {'sqlalchemy', 'onnx', 'torch', 'grpc_health', 'controller.server'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
