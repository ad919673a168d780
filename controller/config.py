"""Controller settings: one frozen object, checked when built, so a bad flag fails at start."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB

MIN_CHUNK_BYTES = 64 * KIB
MAX_CHUNK_BYTES = 1 * MIB
MAX_MESSAGE_BYTES = 8 * MIB
# protobuf cannot parse a message of 2 GiB or more, and an ONNX file is one message.
MAX_MODEL_BYTES_LIMIT = 2 * GIB - 1


class ConfigError(ValueError):
    """A controller setting is out of range; the message names the field and what is accepted."""


@dataclass(frozen=True)
class ControllerConfig:
    """Where the controller keeps its state, where it listens, and the limits it enforces."""

    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 50051
    db_url: str | None = None
    max_model_bytes: int = 1 * GIB
    chunk_bytes: int = 256 * KIB
    heartbeat_seconds: int = 5
    max_concurrent_rpcs: int = 64
    max_watch_streams: int = 10_000
    grace_seconds: float = 5.0
    # Compression jobs run in a process pool of this many workers (each loads torch).
    compression_workers: int = 1
    # Threads each worker gives torch and numpy (0: the libraries' default, every core).
    compression_threads: int = 0
    # Jobs queued or running on this controller at once; more are refused.
    max_active_jobs: int = 16
    # Prometheus /metrics on this TCP port of ``host`` (0: any free port; None: off).
    metrics_port: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir).expanduser().resolve())
        if not self.host or any(c.isspace() for c in self.host):
            raise ConfigError(f"host must be a host name or IP address, got {self.host!r}")
        _check_range("port", self.port, 0, 65535)
        if self.db_url is not None and "://" not in self.db_url:
            raise ConfigError(
                f"db_url must be an SQLAlchemy URL such as sqlite:///PATH or "
                f"postgresql+psycopg://HOST/DB, got {self.db_url!r}"
            )
        _check_range("max_model_bytes", self.max_model_bytes, 1, MAX_MODEL_BYTES_LIMIT)
        _check_range("chunk_bytes", self.chunk_bytes, MIN_CHUNK_BYTES, MAX_CHUNK_BYTES)
        _check_range("heartbeat_seconds", self.heartbeat_seconds, 1, 300)
        _check_range("max_concurrent_rpcs", self.max_concurrent_rpcs, 1, 100_000)
        _check_range("max_watch_streams", self.max_watch_streams, 1, 1_000_000)
        _check_range("compression_workers", self.compression_workers, 1, 64)
        _check_range("compression_threads", self.compression_threads, 0, 256)
        _check_range("max_active_jobs", self.max_active_jobs, 1, 10_000)
        if self.metrics_port is not None:
            _check_range("metrics_port", self.metrics_port, 0, 65535)
        if not 0 <= self.grace_seconds <= 600:
            raise ConfigError(f"grace_seconds must be 0..600, got {self.grace_seconds}")

    @property
    def database_url(self) -> str:
        """The configured URL, or SQLite in the data directory."""
        return self.db_url or f"sqlite:///{self.data_dir / 'homefleet.db'}"

    @property
    def blob_dir(self) -> Path:
        return self.data_dir / "blobs"

    @property
    def key_dir(self) -> Path:
        return self.data_dir / "keys"

    @property
    def jobs_dir(self) -> Path:
        """Working directories of compression jobs (calibration, progress, outputs)."""
        return self.data_dir / "jobs"

    @property
    def info_path(self) -> Path:
        """controller.json: written once the server listens, so others learn the address."""
        return self.data_dir / "controller.json"


def _check_range(field: str, value: int, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{field} must be an integer in {low}..{high}, got {value!r}")
