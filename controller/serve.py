"""`homefleet controller serve`: a typer app the `homefleet` CLI mounts as `controller`.

Importing this module costs only typer: the server, SQLAlchemy and onnx are imported
inside the command, so the operator CLI loads on machines with only gRPC installed.
"""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from controller import keys_cli

LOG_LEVELS = ("debug", "info", "warning", "error")
MISSING_EXTRA_EXIT_CODE = 3  # as the `homefleet` CLI documents

app = typer.Typer(help="The HomeFleet controller (cloud side).", no_args_is_help=True)


@app.callback()
def controller() -> None:
    """The HomeFleet controller (cloud side)."""


app.add_typer(keys_cli.app, name="keys")


@app.command("serve")
def serve(
    data_dir: Path = typer.Option(
        ..., "--data-dir", help="Directory for homefleet.db, blobs/, keys/ and controller.json."
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(50051, "--port", help="TCP port; 0 picks a free one."),
    db_url: str | None = typer.Option(
        None, "--db-url", help="SQLAlchemy URL (default: sqlite:///DATA_DIR/homefleet.db)."
    ),
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning or error."),
    heartbeat_seconds: int = typer.Option(
        5, "--heartbeat-seconds", help="How often watch streams refresh (1..300)."
    ),
    max_model_bytes: int = typer.Option(
        1 << 30, "--max-model-bytes", help="Largest ONNX file AddModel accepts."
    ),
    metrics_port: int | None = typer.Option(
        None,
        "--metrics-port",
        help="Serve the dashboard and Prometheus /metrics on this port of --metrics-host "
        "(0 picks a free one; default: off).",
    ),
    metrics_host: str | None = typer.Option(
        None,
        "--metrics-host",
        help="Address the dashboard and /metrics listen on (plain HTTP; default: --host).",
    ),
    device_classes: Path | None = typer.Option(
        None,
        "--device-classes",
        help="Directory of device-class YAML files (e.g. deploy/device-classes): the budget "
        "loop checks each class's telemetry against its budgets (default: no loop).",
    ),
    budget_window_seconds: int = typer.Option(
        10, "--budget-window-seconds", help="Length of one judged telemetry slice (1..86400)."
    ),
    budget_windows: int = typer.Option(
        3, "--budget-windows", help="K: slices in a row that must miss before acting (1..1000)."
    ),
    budget_min_samples: int = typer.Option(
        50, "--budget-min-samples", help="Fewest inferences for a slice to be judged."
    ),
    budget_check_seconds: float = typer.Option(
        5.0, "--budget-check-seconds", help="How often the budget loop looks (0: never)."
    ),
    canary_share: float = typer.Option(
        0.25, "--canary-share", help="Share of a class's devices that get a candidate first."
    ),
    canary_timeout_seconds: int = typer.Option(
        900, "--canary-timeout-seconds", help="Roll back a canary with no verdict after this."
    ),
    budget_cooldown_seconds: int = typer.Option(
        60, "--budget-cooldown-seconds", help="Quiet time for a class after a rollout ends."
    ),
    compression_workers: int = typer.Option(
        1, "--compression-workers", help="Processes running compression jobs (1..64)."
    ),
    compression_threads: int = typer.Option(
        0,
        "--compression-threads",
        help="Threads each compression process gives torch and onnxruntime (0: every core).",
    ),
    max_active_jobs: int = typer.Option(
        16, "--max-active-jobs", help="Compression jobs queued or running at once (1..10000)."
    ),
    blob_read_threads: int = typer.Option(
        4, "--blob-read-threads", help="Threads reading and hashing blobs for downloads (1..256)."
    ),
    delta_threads: int = typer.Option(
        2, "--delta-threads", help="Threads computing delta payloads, one pair each (1..64)."
    ),
    verified_blob_trust_seconds: float = typer.Option(
        600.0,
        "--verified-blob-trust-seconds",
        help="How long a blob hashed whole is trusted by resumed downloads while its file is "
        "unchanged (0 < s <= 86400): the longest bit rot in place goes unseen by them.",
    ),
    tls: Path | None = typer.Option(
        None,
        "--tls",
        metavar="DIR",
        help="Mutual TLS: a controller certificate's directory (ca.pem, cert.pem, key.pem; "
        "`homefleet certs controller`). Clients then need a device or admin certificate.",
    ),
    insecure: bool = typer.Option(
        False,
        "--insecure",
        help="Allow plaintext on a non-loopback --host (anyone reaching the port can act as "
        "any device or admin).",
    ),
) -> None:
    """Run the controller until SIGTERM or SIGINT (then stop gracefully, exit 0)."""
    from controller.config import LOG_FORMAT, BudgetPolicy, ConfigError, ControllerConfig

    level = log_level.lower()
    if level not in LOG_LEVELS:
        raise typer.BadParameter(
            f"{log_level!r} is not one of {', '.join(LOG_LEVELS)}", param_hint="--log-level"
        )
    try:
        config = ControllerConfig(
            data_dir=data_dir,
            host=host,
            port=port,
            db_url=db_url,
            heartbeat_seconds=heartbeat_seconds,
            max_model_bytes=max_model_bytes,
            metrics_port=metrics_port,
            metrics_host=metrics_host,
            device_classes_dir=device_classes,
            compression_workers=compression_workers,
            compression_threads=compression_threads,
            max_active_jobs=max_active_jobs,
            blob_read_threads=blob_read_threads,
            delta_threads=delta_threads,
            verified_blob_trust_seconds=verified_blob_trust_seconds,
            tls_dir=tls,
            insecure=insecure,
            budget_policy=BudgetPolicy(
                window_seconds=budget_window_seconds,
                windows_in_a_row=budget_windows,
                min_samples=budget_min_samples,
                canary_share=canary_share,
                canary_timeout_seconds=canary_timeout_seconds,
                cooldown_seconds=budget_cooldown_seconds,
                check_seconds=budget_check_seconds,
            ),
        )
    except ConfigError as exc:
        typer.echo(f"error: {_in_flags(str(exc))}", err=True)
        raise typer.Exit(2) from exc
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT)
    try:
        from controller.server import ControllerStartError, serve_forever
    except ImportError as exc:  # the `controller` extra is not installed here
        typer.echo(
            f"error: `homefleet controller serve` is not available in this installation ({exc}); "
            "install it with: pip install 'homefleet[controller]'",
            err=True,
        )
        raise typer.Exit(MISSING_EXTRA_EXIT_CODE) from exc

    try:
        serve_forever(config)
    except ControllerStartError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2 if exc.configuration else 1) from exc


# ControllerConfig names its fields in its errors; an operator typed flags.
_FLAGS = {
    "port": "--port",
    "host": "--host",
    "db_url": "--db-url",
    "heartbeat_seconds": "--heartbeat-seconds",
    "max_model_bytes": "--max-model-bytes",
    "metrics_port": "--metrics-port",
    "metrics_host": "--metrics-host",
    "compression_workers": "--compression-workers",
    "compression_threads": "--compression-threads",
    "max_active_jobs": "--max-active-jobs",
    "blob_read_threads": "--blob-read-threads",
    "delta_threads": "--delta-threads",
    "verified_blob_trust_seconds": "--verified-blob-trust-seconds",
    "budget_window_seconds": "--budget-window-seconds",
    "budget_windows_in_a_row": "--budget-windows",
    "budget_min_samples": "--budget-min-samples",
    "canary_share": "--canary-share",
    "canary_timeout_seconds": "--canary-timeout-seconds",
    "cooldown_seconds": "--budget-cooldown-seconds",
    "budget_check_seconds": "--budget-check-seconds",
}


def _in_flags(message: str) -> str:
    """The flag in place of the config field an error begins with (delta_threads ->
    --delta-threads)."""
    field, space, rest = message.partition(" ")
    return _FLAGS[field] + space + rest if field in _FLAGS else message
