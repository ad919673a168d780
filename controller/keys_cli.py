"""`homefleet controller keys create|show|rotate`: the manifest-signing key, offline.

Only cryptography is imported: these commands work on the controller host without the
server running (rotation must happen while it is stopped).
"""

from __future__ import annotations

from pathlib import Path

import typer

from controller.liveness import live_info

app = typer.Typer(help="The controller's manifest-signing key.", no_args_is_help=True)

DATA_DIR = typer.Option(..., "--data-dir", help="The controller's data directory.")


def _key_dir(data_dir: Path) -> Path:
    return data_dir / "keys"


def _existing(data_dir: Path) -> Path:
    """show and rotate read a controller's data directory: a mistyped one is a usage
    error (exit 2), not a key that is missing."""
    if not data_dir.is_dir():
        typer.echo(
            f"error: {data_dir} is not a controller data directory (it does not exist or is "
            "not a directory): check --data-dir",
            err=True,
        )
        raise typer.Exit(2)
    return data_dir


@app.command("create")
def create(data_dir: Path = DATA_DIR) -> None:
    """Create the signing key if there is none; print the public key file agents pin."""
    from controller.keys import PRIVATE_NAME, load_signing_key, public_key_path

    key_dir = _key_dir(data_dir)
    existed = (key_dir / PRIVATE_NAME).exists()
    key = load_signing_key(key_dir)
    state = "exists" if existed else "created"
    typer.echo(f"signing key {key.key_id} {state}; agents pin {public_key_path(key_dir)}")


@app.command("show")
def show(data_dir: Path = DATA_DIR) -> None:
    """The current key id, the public key file, and the rotation history."""
    from controller.keys import (
        PRIVATE_NAME,
        KeyStoreError,
        load_key_chain,
        load_signing_key,
        public_key_path,
    )

    key_dir = _key_dir(_existing(data_dir))
    if not (key_dir / PRIVATE_NAME).exists():
        typer.echo(
            f"error: no signing key in {key_dir}; run `homefleet controller keys create`",
            err=True,
        )
        raise typer.Exit(1)
    try:
        chain = load_key_chain(key_dir)
    except KeyStoreError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    key = load_signing_key(key_dir)
    typer.echo(f"current key {key.key_id} (public: {public_key_path(key_dir)})")
    for link in chain:
        typer.echo(f"  {link.created_at:%Y-%m-%d %H:%M} {link.signer_key_id} -> {link.key_id}")


@app.command("rotate")
def rotate(data_dir: Path = DATA_DIR) -> None:
    """Retire the current key; the old key endorses a new one (stop the controller first)."""
    from controller.keys import KeyStoreError, rotate_signing_key

    running = live_info(_existing(data_dir) / "controller.json")
    if running is not None:
        pid = running.get("pid")
        typer.echo(
            f"error: a controller (pid {pid}) is running on {data_dir}; stop it first (it "
            "loads the key at start), then rotate",
            err=True,
        )
        raise typer.Exit(1)
    try:
        rotation = rotate_signing_key(_key_dir(data_dir))
    except KeyStoreError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(
        f"rotated: {rotation.old_key_id} -> {rotation.new_key_id}; agents that pinned any "
        "earlier key follow the endorsement on their next manifest"
    )
