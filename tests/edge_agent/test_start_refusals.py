"""What an agent refuses to run with: said in one place, exit 2, nothing left on disk.

QA found three: an agent started without --trust-key deployed any manifest without a
word; one whose device id the controller had registered in another class retried
Register forever as if the network were down; and `--listen unix:/nonexist/x.sock`
created /nonexist (as root), while agents refused for their configuration left
agent.lock, artifacts/, partial/ and sometimes telemetry.db in a fresh state directory.
Now verification is waived only by name (--allow-unsigned-manifests, warned at start and
at every deployment), a refusal retrying cannot fix ends the agent with exit 2 (the
systemd unit does not restart it), the socket's directory must exist, and every check
that needs no state directory is made before anything is written there. Real agent
processes (`python -m edge_agent run`), against the real controller where one is needed.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest

from artifact.signing import SigningKey
from edge_agent.hardware import collect
from protos import fleet_pb2
from tests.edge_agent.models import add_model
from tests.edge_agent.test_agent_process import (
    ROOT,
    SAFETY_LIMIT_S,
    agent_info,
    final_report,
    stop,
)
from tests.support.controller import eventually, running_controller

START_WARNING = "manifests are NOT verified: no controller key is pinned"
DEPLOY_WARNING = "with its manifest NOT verified"


def agent_run(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """An agent refused at start: it must exit by itself (the safety limit says it hung).

    Its controller address refuses connections, so an agent that did start would retry.
    """
    return subprocess.run(
        [
            sys.executable, "-m", "edge_agent", "run",
            "--controller", "127.0.0.1:1", "--device-id", "hub-1", "--device-class", "home-hub",
            "--state-dir", str(state), *args,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=SAFETY_LIMIT_S,
    )  # fmt: skip


def only_line(stderr: str) -> str:
    (line,) = stderr.strip().splitlines()  # one line, no traceback
    return line


def public_key(tmp_path: Path) -> Path:
    path = tmp_path / "signing.pub.pem"
    path.write_bytes(SigningKey.generate().public_pem())
    return path


def test_an_agent_without_a_pinned_key_is_refused_unless_told_so_by_name(tmp_path: Path) -> None:
    state = tmp_path / "state"
    neither = agent_run(state)
    assert neither.returncode == 2, neither.stderr  # configuration: no restart loop
    line = only_line(neither.stderr)
    assert line.startswith("error: --trust-key: no controller key is pinned"), line
    assert "--trust-key PEM" in line and "--allow-unsigned-manifests" in line, line
    assert not state.exists()  # refused before anything was written

    both = agent_run(state, "--trust-key", str(public_key(tmp_path)), "--allow-unsigned-manifests")
    assert both.returncode == 2, both.stderr
    line = only_line(both.stderr)
    assert "--allow-unsigned-manifests contradicts --trust-key" in line, line
    assert not state.exists()


def test_an_agent_told_to_skip_verification_warns_at_start_and_at_every_deployment(
    tmp_path: Path,
) -> None:
    state, log = tmp_path / "state", tmp_path / "agent.log"

    async def main() -> str:
        async with running_controller(tmp_path / "controller", heartbeat_seconds=1) as controller:
            with log.open("ab") as out:
                agent = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "edge_agent", "run",
                    "--controller", controller.address, "--device-id", "hub-1",
                    "--device-class", "home-hub", "--state-dir", str(state),
                    "--allow-unsigned-manifests",
                    cwd=ROOT,
                    stderr=out,
                )  # fmt: skip
            try:
                await agent_info(state, agent)
                for offset in (1.0, 2.0):  # two releases: two deployments
                    sha = (await controller.release("motions", add_model(offset))).sha256
                    report = await eventually("its report", partial(final_report, controller, sha))
                    assert report["outcome"] == "active", report
            finally:
                code, text = await stop(agent, log)
            assert code == 0, text
            return text

    text = asyncio.run(main())
    assert text.count(START_WARNING) == 1, text
    warned = [line for line in text.splitlines() if DEPLOY_WARNING in line]
    assert len(warned) == 2, text
    assert all(" WARNING edge_agent.sync: model motions: deploying " in w for w in warned)


def test_a_registration_the_controller_refuses_for_good_ends_the_agent_with_exit_2(
    tmp_path: Path,
) -> None:
    """QA: `cam2` registered as a camera, then started as a home-hub: ALREADY_EXISTS was
    logged as "unreachable or stream broken" and retried with backoff, forever."""
    state = tmp_path / "state"

    async def main() -> tuple[int, str]:
        async with running_controller(tmp_path / "controller") as controller:
            earlier = fleet_pb2.RegisterRequest(
                device_id="cam2",
                device_class="camera",
                hardware=collect().to_proto(),
                agent_version="test",
            )
            await controller.agent.Register(earlier, timeout=30)
            agent = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "edge_agent", "run",
                "--controller", controller.address, "--device-id", "cam2",
                "--device-class", "home-hub", "--state-dir", str(state),
                "--trust-key", str(controller.public_key_path),
                cwd=ROOT,
                stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            try:
                _, stderr = await asyncio.wait_for(agent.communicate(), SAFETY_LIMIT_S)
            finally:
                if agent.returncode is None:  # only when the test failed: it kept retrying
                    agent.kill()
                    await agent.wait()
            return await agent.wait(), stderr.decode(errors="replace")

    code, stderr = asyncio.run(main())
    assert code == 2, stderr  # not restarted by the systemd unit: retrying cannot help
    (logged,) = [line for line in stderr.splitlines() if " ERROR edge_agent.sync: " in line]
    for text in (
        "refused to register device 'cam2' (class 'home-hub') with ALREADY_EXISTS",
        "already registered with different device_class (registered 'camera'",
        "retrying cannot change that",
        "--device-id",
        "homefleet devices",
    ):
        assert text in logged, (text, logged)
    assert stderr.strip().splitlines()[-1].startswith("error: controller "), stderr
    assert "reconnect attempt" not in stderr and "unreachable" not in stderr, stderr
    assert not (state / "agent.json").exists()  # stopped as on SIGTERM: the API is gone


def not_pem(tmp_path: Path) -> list[str]:
    path = tmp_path / "not-a-key.pem"
    path.write_text("not a key\n")
    return ["--trust-key", str(path)]


def missing_socket_directory(tmp_path: Path) -> list[str]:
    return ["--allow-unsigned-manifests", "--listen", f"unix:{tmp_path}/missing/agent.sock"]


def socket_path_is_a_file(tmp_path: Path) -> list[str]:
    regular = tmp_path / "agent.sock"
    regular.write_text("keep me\n")
    return ["--allow-unsigned-manifests", "--listen", f"unix:{regular}"]


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (not_pem, "error: --trust-key: {tmp}/not-a-key.pem is not an ed25519 public key"),
        (
            missing_socket_directory,
            "error: --listen: the socket's directory {tmp}/missing does not exist",
        ),
        (socket_path_is_a_file, "error: --listen: {tmp}/agent.sock exists and is not a socket"),
    ],
)
@pytest.mark.parametrize("fresh", ["absent", "empty"])  # `StateDirectory=` makes it empty
def test_a_configuration_error_leaves_a_fresh_state_directory_as_it_was(
    short_dir: Path, options: Callable[[Path], list[str]], expected: str, fresh: str
) -> None:
    state = short_dir / "state"
    if fresh == "empty":
        state.mkdir()
    result = agent_run(state, *options(short_dir))
    assert result.returncode == 2, result.stderr
    line = only_line(result.stderr)
    assert line.startswith(expected.format(tmp=short_dir)), line
    if fresh == "absent":
        assert not state.exists()
    else:
        assert list(state.iterdir()) == []  # no agent.lock, artifacts/, partial/, telemetry.db
    assert not (short_dir / "missing").exists()  # a socket's directory is never created
    if (short_dir / "agent.sock").exists():
        assert (short_dir / "agent.sock").read_text() == "keep me\n"


def test_no_directory_of_a_socket_path_is_created(short_dir: Path) -> None:
    """The QA case, one level deeper: nothing of the path is created, and the message
    says which directory is missing and how it is usually made."""
    listen = f"unix:{short_dir}/run/homefleet/agent.sock"
    result = agent_run(short_dir / "state", "--allow-unsigned-manifests", "--listen", listen)
    assert result.returncode == 2, result.stderr
    line = only_line(result.stderr)
    assert f"{short_dir}/run/homefleet does not exist: create it" in line, line
    assert "RuntimeDirectory=" in line and "choose another --listen path" in line, line
    assert list(short_dir.iterdir()) == []  # neither run/ nor the state directory


def test_a_listen_address_another_process_serves_leaves_a_fresh_state_directory(
    short_dir: Path,
) -> None:
    """QA: an agent refused for a busy --listen port or a socket another process serves
    left agent.lock, artifacts/, partial/ and telemetry.db behind (and gRPC's own C-core
    line on stderr). Both are found before the state directory is touched."""
    with socket.socket() as busy, socket.socket(socket.AF_UNIX) as served:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        path = short_dir / "agent.sock"
        served.bind(str(path))
        served.listen()
        for listen, expected in (
            (f"127.0.0.1:{port}", f"127.0.0.1:{port} is already in use by another process"),
            (f"unix:{path}", f"another process serves unix:{path}"),
        ):
            state = short_dir / "state"
            result = agent_run(state, "--allow-unsigned-manifests", "--listen", listen)
            assert result.returncode == 1, result.stderr
            assert expected in only_line(result.stderr), result.stderr
            assert not state.exists()
        assert path.is_socket()  # the other process's socket stays
