"""Signing-key creation and rotation: the chain a pinned agent follows, and refusals."""

from __future__ import annotations

import json
import os
from pathlib import Path

from typer.testing import CliRunner

from artifact.keychain import follow_chain
from artifact.signing import TrustedKey
from controller.keys import load_key_chain, load_signing_key, public_key_path
from controller.keys_cli import app

runner = CliRunner()


def keys(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


def test_rotation_keeps_a_chain_from_the_first_pinned_key_to_the_current_one(
    tmp_path: Path,
) -> None:
    code, out = keys("create", "--data-dir", str(tmp_path))
    assert code == 0 and "created" in out
    key_dir = tmp_path / "keys"
    pinned = TrustedKey.from_pem(public_key_path(key_dir).read_bytes())
    assert keys("create", "--data-dir", str(tmp_path))[1].count("exists") == 1

    for _ in range(2):
        code, out = keys("rotate", "--data-dir", str(tmp_path))
        assert code == 0 and "rotated" in out
    current = load_signing_key(key_dir)
    assert current.key_id != pinned.key_id
    assert TrustedKey.from_pem(public_key_path(key_dir).read_bytes()).key_id == current.key_id
    chain = load_key_chain(key_dir)
    assert len(chain) == 2
    assert follow_chain(pinned, chain, current.key_id).key_id == current.key_id
    assert sorted(p.stem for p in (key_dir / "retired").iterdir()) == sorted(
        link.signer_key_id for link in chain
    )
    code, out = keys("show", "--data-dir", str(tmp_path))
    assert code == 0 and current.key_id in out and pinned.key_id in out


def test_rotate_refuses_without_a_key_or_while_a_controller_runs(tmp_path: Path) -> None:
    code, out = keys("rotate", "--data-dir", str(tmp_path))
    assert code == 1 and "no key to rotate" in out
    assert not (tmp_path / "keys" / "signing.pem").exists()

    keys("create", "--data-dir", str(tmp_path))
    before = (tmp_path / "keys" / "signing.pem").read_bytes()
    (tmp_path / "controller.json").write_text(json.dumps({"pid": os.getpid()}))
    code, out = keys("rotate", "--data-dir", str(tmp_path))
    assert code == 1 and f"pid {os.getpid()}" in out
    assert (tmp_path / "keys" / "signing.pem").read_bytes() == before  # nothing changed


def test_a_corrupt_chain_file_is_reported_and_rotation_changes_nothing(tmp_path: Path) -> None:
    keys("create", "--data-dir", str(tmp_path))
    (tmp_path / "keys" / "chain.json").write_text("{oops")
    before = (tmp_path / "keys" / "signing.pem").read_bytes()
    code, out = keys("rotate", "--data-dir", str(tmp_path))
    assert code == 1 and "chain.json is not a readable key chain" in out
    assert (tmp_path / "keys" / "signing.pem").read_bytes() == before


def test_show_and_rotate_name_a_mistyped_data_directory(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir"
    for command in ("show", "rotate"):
        code, out = keys(command, "--data-dir", str(missing))
        assert code == 2, out
        assert f"{missing} is not a controller data directory" in out
        assert "check --data-dir" in out
    assert not missing.exists()
    code, out = keys("show", "--data-dir", str(tmp_path))
    assert code == 1 and "no signing key" in out and "keys create" in out
