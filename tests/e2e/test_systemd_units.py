"""The systemd units in deploy/systemd: systemd accepts them, and their command lines run.

`systemd-analyze verify` checks the unit syntax and every directive (a typo is only a
warning there, so the test fails on any warning about our file). Then each ExecStart,
with systemd's specifiers and the environment file expanded to a scratch directory,
runs for real: the controller serves mutual TLS on every interface, and the agent,
given its credentials the way LoadCredential= hands them over, registers with it.
"""

from __future__ import annotations

import re
import shlex
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.support.pki import Pki, make_pki

from .harness import ROOT, Controller, Process, wait_for

UNITS = ROOT / "deploy" / "systemd"
INSTALLED_BINARY = "/opt/homefleet/bin/homefleet"


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.fail("systemd-analyze is missing: `make system-tools` installs it (Debian: systemd)")
    return found


def exec_start(unit: Path) -> list[str]:
    """The unit's ExecStart= as argv (continuation lines joined)."""
    text = unit.read_text().replace("\\\n", " ")
    match = re.search(r"^ExecStart=(.+)$", text, re.MULTILINE)
    assert match, f"{unit.name} has no ExecStart="
    return shlex.split(match.group(1))


def expand(argv: list[str], specifiers: dict[str, str], env: dict[str, str]) -> list[str]:
    """The arguments systemd passes to the installed binary: %X specifiers and ${VAR} from
    the environment file replaced."""
    assert argv[0] == INSTALLED_BINARY, argv[0]
    out: list[str] = []
    for arg in argv[1:]:
        for key, value in specifiers.items():
            arg = arg.replace(f"%{key}", value)
        out.append(re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], arg))
    return out


def with_options(argv: list[str], values: dict[str, str]) -> list[str]:
    """``argv`` with the value after each flag in ``values`` replaced (test paths, port 0)."""
    out = list(argv)
    for flag, value in values.items():
        out[out.index(flag) + 1] = value
    return out


@pytest.mark.parametrize("unit", ["homefleet-agent.service", "homefleet-controller.service"])
def test_systemd_accepts_the_unit(tmp_path: Path, unit: str) -> None:
    local = tmp_path / unit  # verify wants the ExecStart binary to exist
    local.write_text((UNITS / unit).read_text().replace(INSTALLED_BINARY, shutil.which("sh") or ""))
    done = subprocess.run(
        [systemd_analyze(), "verify", str(local)], capture_output=True, text=True, timeout=60
    )
    ours = [line for line in done.stderr.splitlines() if unit in line]
    assert done.returncode == 0 and not ours, done.stderr


def test_the_units_command_lines_serve_and_register_over_mutual_tls(tmp_path: Path) -> None:
    pki: Pki = make_pki(tmp_path / "pki")
    state = tmp_path / "var-lib"  # %S
    controller_argv = with_options(
        expand(exec_start(UNITS / "homefleet-controller.service"), {"S": str(state)}, {}),
        {
            "--tls": str(pki.controller()),
            "--device-classes": str(ROOT / "deploy" / "device-classes"),
            "--port": "0",
            "--metrics-port": "0",
        },
    )
    ctl = Controller(state / "homefleet", admin_tls=pki.admin())
    ctl.process = Process("controller", controller_argv, tmp_path / "logs" / "controller.log")
    ctl.start()
    try:
        info = ctl.process.read_json(state / "homefleet" / "controller.json")
        assert str(info["metrics_address"]).startswith("127.0.0.1:")  # plain HTTP stays local
        credentials = tmp_path / "credentials"  # what LoadCredential= puts in %d
        shutil.copytree(pki.device("hub-1"), credentials)
        shutil.copy(ctl.public_key, credentials / "signing.pub.pem")
        agent_argv = with_options(
            expand(
                exec_start(UNITS / "homefleet-agent.service"),
                {"S": str(tmp_path / "device-var-lib"), "d": str(credentials)},
                {
                    "HOMEFLEET_CONTROLLER": ctl.address,
                    "HOMEFLEET_DEVICE_ID": "hub-1",
                    "HOMEFLEET_DEVICE_CLASS": "home-hub",
                },
            ),
            {"--listen": "127.0.0.1:0"},  # the unit's fixed port may be taken here
        )
        agent = Process("agent hub-1", agent_argv, tmp_path / "logs" / "hub-1.log")
        agent.start()
        try:
            wait_for("hub-1 to register over mutual TLS", lambda: ctl.device("hub-1"))
        finally:
            assert agent.stop(signal.SIGTERM) == 0, agent.log()
    finally:
        assert ctl.stop() == 0, ctl.process.log()
