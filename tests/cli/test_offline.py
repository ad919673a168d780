"""What the command does with no controller to talk to: help, usage errors, unreachable."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from homefleet.cli import app

ROOT = Path(__file__).resolve().parents[2]

OPERATOR_COMMANDS = [
    ["model", "add", "m", "{file}"],
    ["model", "list"],
    ["artifact", "create", "m", "--class", "home-hub"],
    ["artifact", "list"],
    ["assign", "m/home-hub/v1", "--class", "home-hub"],
    ["devices"],
    ["events"],
]


@pytest.fixture
def closed_address() -> str:
    """A loopback port nobody listens on (bound, then released: never a fixed port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"127.0.0.1:{port}"


@pytest.fixture
def onnx_file(tmp_path: Path) -> Path:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"bytes the CLI never gets to send")
    return path


@pytest.mark.parametrize(
    "group",
    [
        [],
        ["model"],
        ["model", "add"],
        ["model", "list"],
        ["artifact"],
        ["artifact", "create"],
        ["artifact", "list"],
        ["assign"],
        ["devices"],
        ["events"],
    ],
)
def test_help_of_every_group_and_command(runner: CliRunner, group: list[str]) -> None:
    result = runner.invoke(app, [*group, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage: homefleet" in result.stdout


def test_root_help_lists_lazy_groups_and_exit_codes(runner: CliRunner) -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in ("agent", "controller", "model", "artifact", "assign", "devices", "events"):
        assert name in result.stdout
    assert "4 controller unreachable" in result.stdout


@pytest.mark.parametrize("group", ["agent", "controller"])
def test_process_groups_run_or_say_which_extra_is_missing(runner: CliRunner, group: str) -> None:
    result = runner.invoke(app, [group, "--help"])
    if result.exit_code == 3:  # that side's package or its extra is not installed here
        assert f"pip install 'homefleet[{'edge' if group == 'agent' else 'controller'}]'" in (
            result.stderr
        )
    else:
        assert result.exit_code == 0, result.output
        assert f"homefleet {group}" in result.stdout


@pytest.mark.parametrize("command", OPERATOR_COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_unreachable_controller_exits_4_with_what_to_do(
    runner: CliRunner, closed_address: str, onnx_file: Path, command: list[str]
) -> None:
    args = [a.format(file=onnx_file) for a in command]
    result = runner.invoke(app, [*args, "--controller", closed_address])
    assert result.exit_code == 4, result.output
    assert f"cannot reach the controller at {closed_address}" in result.stderr
    assert "homefleet controller serve" in result.stderr
    assert "HOMEFLEET_CONTROLLER" in result.stderr
    assert result.stdout == ""


def test_controller_address_comes_from_the_environment(
    runner: CliRunner, closed_address: str
) -> None:
    result = runner.invoke(app, ["devices", "--json"], env={"HOMEFLEET_CONTROLLER": closed_address})
    assert result.exit_code == 4
    assert closed_address in result.stderr
    assert result.stdout == ""


def test_missing_model_file_is_a_usage_error(runner: CliRunner, tmp_path: Path) -> None:
    missing = tmp_path / "nope.onnx"
    result = runner.invoke(app, ["model", "add", "m", str(missing)])
    assert result.exit_code == 2
    assert "nope.onnx" in result.stderr
    assert "does not exist" in result.stderr


def test_directory_instead_of_model_file_is_a_usage_error(
    runner: CliRunner, tmp_path: Path
) -> None:
    result = runner.invoke(app, ["model", "add", "m", str(tmp_path)])
    assert result.exit_code == 2
    assert "directory" in result.stderr


def test_an_empty_model_file_is_a_usage_error_before_any_call(
    runner: CliRunner, tmp_path: Path
) -> None:
    empty = tmp_path / "empty.onnx"
    empty.touch()
    result = runner.invoke(app, ["model", "add", "m", str(empty), "--controller", "127.0.0.1:9"])
    assert result.exit_code == 2  # not 4: the unreachable controller was never called
    assert "empty.onnx is empty" in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["assign", "m/c/v1"],
        ["assign", "m/c/v1", "--class", "c", "--device", "d"],
        ["events", "--limit", "0"],
        ["events", "--limit", "1001"],
        ["artifact", "create", "m"],
        ["artifact", "create", "m", "--class", "c", "--expires-in-days", "100000"],
        ["model", "add", "Bad Name", __file__],  # checked before the upload starts
        ["devices", "--controller", ""],
        ["devices", "--controller", "127.0.0.1:121537"],  # gRPC would dial port 56001
        ["artifact", "create", "m", "--class", "Bad Class"],
        ["devices", "--timeout", "0"],
    ],
    ids=lambda a: " ".join(a),
)
def test_bad_arguments_exit_2_before_any_call(runner: CliRunner, args: list[str]) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "cannot reach" not in result.stderr


def test_certs_make_a_ca_and_the_three_kinds_of_tls_directory(
    runner: CliRunner, tmp_path: Path
) -> None:
    ca = str(tmp_path / "ca")
    made = runner.invoke(app, ["certs", "ca", ca])
    assert made.exit_code == 0, made.output
    steps = [
        ["certs", "controller", str(tmp_path / "ctl"), "--ca", ca, "--host", "127.0.0.1"],
        ["certs", "device", "hub-1", str(tmp_path / "hub-1"), "--ca", ca, "--class", "home-hub"],
        ["certs", "admin", "alice", str(tmp_path / "alice"), "--ca", ca],
    ]
    for args in steps:
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert "issued" in result.output
    shown = runner.invoke(app, ["certs", "show", str(tmp_path / "hub-1")])
    assert shown.exit_code == 0, shown.output
    assert "hub-1" in shown.output and "device" in shown.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["certs", "ca", "{ca}"], "already exists"),  # never replaces a CA
        (["certs", "device", "Hub 1", "{out}", "--ca", "{ca}", "--class", "hub"], "is not valid"),
        (["certs", "controller", "{out}", "--ca", "{ca}", "--host", "a b"], "neither a DNS"),
        (["certs", "device", "hub-1", "{out}", "--ca", "{missing}", "--class", "x"], "missing"),
        (["certs", "show", "{missing}"], "not a directory"),
    ],
)
def test_certs_refuse_bad_input_with_exit_2_and_write_nothing(
    runner: CliRunner, tmp_path: Path, args: list[str], message: str
) -> None:
    ca = tmp_path / "ca"
    assert runner.invoke(app, ["certs", "ca", str(ca)]).exit_code == 0
    before = sorted(p.name for p in tmp_path.rglob("*"))
    paths = {"ca": str(ca), "out": str(tmp_path / "out"), "missing": str(tmp_path / "nowhere")}
    result = runner.invoke(app, [a.format(**paths) for a in args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_tables_piped_elsewhere_keep_whole_rows() -> None:
    """Rich assumes 80 columns without a terminal and folds cells: `| grep` then misses."""
    code = (
        "from controller.cli import output\n"
        "t = output.table('device', 'note')\n"
        "output.add_row(t, 'hub-' + 'x' * 120, 'y' * 120)\n"
        "output.print_table(t)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr
    [row] = [line for line in done.stdout.splitlines() if "hub-" in line]
    assert "hub-" + "x" * 120 in row and "y" * 120 in row
