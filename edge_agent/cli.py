"""`homefleet agent ...`: the device-side commands. Needs only the `edge` extra.

Exit codes: 0 stopped cleanly (SIGTERM/SIGINT), 1 could not start for a reason that may
pass (state directory in use by another agent or out of space, --listen or
--metrics-listen address in use by another process), 2 usage or configuration error that
retrying cannot fix (bad option, trust key, neither --trust-key nor
--allow-unsigned-manifests, TLS directory, a --listen path that is not a socket or whose
directory is missing, a state directory the agent cannot write: read-only or not its
user's, a registration the controller refuses for good: the device id is taken with
another class or hardware, or the request is invalid). The systemd unit retries 1, not 2.
Configuration errors are found before anything is written to the state directory.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from edge_agent.errors import AgentError, ErrorCode

app = typer.Typer(
    help="The HomeFleet edge agent: keeps this device's models in sync and serves them locally.",
    no_args_is_help=True,
    add_completion=False,
)

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
ALLOW_UNSIGNED = "--allow-unsigned-manifests"


def trust_choice_error(trust_key: Path | None, allow_unsigned: bool) -> str | None:
    """Why the manifest-trust options do not make sense together, or None when they do.

    Verifying manifests is the default: running without a pinned key must be asked for
    by name, so it is never the result of a forgotten flag.
    """
    if trust_key is None and not allow_unsigned:
        return (
            "--trust-key: no controller key is pinned, so manifests could not be verified: "
            "pass --trust-key PEM (the controller's DATA_DIR/keys/signing.pub.pem, "
            f"`homefleet controller keys show`), or {ALLOW_UNSIGNED} to deploy whatever "
            "the controller sends unverified (tests and demos only)"
        )
    if trust_key is not None and allow_unsigned:
        return (
            f"{ALLOW_UNSIGNED} contradicts --trust-key {trust_key}: give one of them "
            "(--trust-key to verify manifests)"
        )
    return None


def _state_dir(value: str) -> Path:
    """An empty --state-dir (an unset variable in a unit file) is refused, not read as the
    working directory."""
    if not value.strip():
        typer.echo("error: --state-dir is empty: name the agent's state directory", err=True)
        raise typer.Exit(2)
    return Path(value)


@app.callback()
def agent() -> None:
    """The HomeFleet edge agent."""


@app.command()
def run(
    device_id: Annotated[str, typer.Option("--device-id", help="This device's id (a name).")],
    device_class: Annotated[
        str, typer.Option("--device-class", help="The device class it belongs to, e.g. home-hub.")
    ],
    state_dir: Annotated[
        str, typer.Option("--state-dir", help="Where artifacts, slots.json and agent.json live.")
    ],
    controller: Annotated[
        str,
        typer.Option("--controller", envvar="HOMEFLEET_CONTROLLER", help="Controller HOST:PORT."),
    ] = "127.0.0.1:50051",
    listen: Annotated[
        str,
        typer.Option(
            "--listen", help="Local inference API: HOST:PORT (port 0 = any) or unix:/path."
        ),
    ] = "127.0.0.1:0",
    trust_key: Annotated[
        Path | None,
        typer.Option(
            "--trust-key",
            help="The controller's ed25519 public key (PEM) to pin: unsigned, tampered, "
            "expired or older manifests are refused. Required unless "
            f"{ALLOW_UNSIGNED} is given.",
        ),
    ] = None,
    allow_unsigned_manifests: Annotated[
        bool,
        typer.Option(
            ALLOW_UNSIGNED,
            help="Tests and demos only: run without --trust-key and deploy any manifest "
            "without checking its signature (warned at start and at every deployment).",
        ),
    ] = False,
    insecure_listen: Annotated[
        bool,
        typer.Option(
            "--insecure-listen",
            help="Allow --listen beyond loopback (anyone who reaches it can run the models).",
        ),
    ] = False,
    tls: Annotated[
        Path | None,
        typer.Option(
            "--tls",
            metavar="DIR",
            help="Mutual TLS: this device's certificate directory (ca.pem, cert.pem, key.pem; "
            "`homefleet certs device`). Default: plaintext.",
        ),
    ] = None,
    threads: Annotated[
        int, typer.Option("--threads", help="onnxruntime intra-op threads per model.")
    ] = 1,
    log_level: Annotated[
        str, typer.Option("--log-level", help=f"One of {', '.join(LOG_LEVELS)}.")
    ] = "INFO",
    metrics_listen: Annotated[
        str | None,
        typer.Option(
            "--metrics-listen", help="Serve Prometheus /metrics on HOST:PORT (off by default)."
        ),
    ] = None,
    idle_watts: Annotated[
        float | None,
        typer.Option(
            "--idle-watts",
            help="The device class's idle power; with --active-watts, estimates energy "
            "from CPU time when the device has no RAPL or hwmon power meter.",
        ),
    ] = None,
    active_watts: Annotated[
        float | None,
        typer.Option("--active-watts", help="The device class's power with all cores busy."),
    ] = None,
    sysfs_root: Annotated[
        Path, typer.Option("--sysfs-root", help="Where sys/class/powercap and hwmon are read.")
    ] = Path("/"),
    emulate_slowdown: Annotated[
        float,
        typer.Option(
            "--emulate-slowdown",
            help="Demos and tests only: report latency, CPU time and energy FACTOR times what "
            "was measured, as a slower device would (1, or up to 100 with at most one decimal "
            "place, e.g. 2.5; the energy source is marked).",
        ),
    ] = 1.0,
    telemetry_window_seconds: Annotated[
        float,
        typer.Option(
            "--telemetry-window-seconds",
            help="Length of one telemetry window (the controller judges budgets on slices "
            "at least this long).",
        ),
    ] = 10.0,
) -> None:
    """Register with the controller, deploy the assigned models, and serve them locally."""
    level = log_level.upper()
    if level not in LOG_LEVELS:
        typer.echo(
            f"error: --log-level must be one of {', '.join(LOG_LEVELS)}, got {log_level!r}",
            err=True,
        )
        raise typer.Exit(2)
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("grpc", "asyncio"):  # their DEBUG output drowns the agent's own
        logging.getLogger(noisy).setLevel(max(logging.INFO, logging.getLevelName(level)))
    # imported here so `--help` stays fast and light
    from edge_agent.agent import serve
    from edge_agent.config import AgentConfig, ListenAddress

    try:
        config = AgentConfig(
            controller=controller,
            device_id=device_id,
            device_class=device_class,
            state_dir=_state_dir(state_dir),
            listen=ListenAddress(listen),
            insecure_listen=insecure_listen,
            trust_key=trust_key,
            tls_dir=tls,
            threads=threads,
            metrics_listen=metrics_listen,
            idle_watts=idle_watts,
            active_watts=active_watts,
            sysfs_root=sysfs_root,
            emulate_slowdown=emulate_slowdown,
            telemetry_window_s=telemetry_window_seconds,
        )
    except AgentError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(2) from None
    trust_error = trust_choice_error(trust_key, allow_unsigned_manifests)
    if trust_error is not None:
        typer.echo(f"error: {trust_error}", err=True)
        raise typer.Exit(2)
    try:
        asyncio.run(serve(config))
    except AgentError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(2 if exc.code is ErrorCode.INVALID_CONFIG else 1) from None
