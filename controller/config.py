"""Controller settings: one frozen object, checked when built, so a bad flag fails at start."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from artifact.tls import is_loopback
from controller.blobstore import VERIFIED_TTL_SECONDS

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # controller and workers
KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB

MIN_CHUNK_BYTES = 64 * KIB
MAX_CHUNK_BYTES = 1 * MIB
MAX_MESSAGE_BYTES = 8 * MIB
# protobuf cannot parse a message of 2 GiB or more, and an ONNX file is one message.
MAX_MODEL_BYTES_LIMIT = 2 * GIB - 1
MAX_TRUST_SECONDS = 86_400.0  # a day: bit rot in place must be looked for at least daily


class ConfigError(ValueError):
    """A controller setting is out of range; the message names the field and what is accepted."""


@dataclass(frozen=True)
class BudgetPolicy:
    """How eagerly the budget loop acts: slice length, hysteresis, sample floor, canary."""

    # One judged slice of telemetry; agents' windows (default 10 s) fall into slices by
    # their end time, so a slice should be at least one agent window long.
    window_seconds: int = 10
    # K: this many slices in a row must miss (or, for a canary, meet) before acting.
    windows_in_a_row: int = 3
    # A slice with fewer inferences than this has no verdict (a p95 of 5 samples is noise).
    min_samples: int = 50
    # Share of the class's devices that get a candidate first (at least one device).
    canary_share: float = 0.25
    # The recompression aims this far under the budget (0.9: 10 % headroom).
    latency_margin: float = 0.9
    # A canary with no verdict after this long is rolled back (it could not be judged).
    canary_timeout_seconds: int = 900
    # After a rollout ends, the same (model, class) is not judged again for this long,
    # and only on telemetry sent after the rollout ended.
    cooldown_seconds: int = 60
    # How often the loop looks (0: never by itself; tests call ``tick``).
    check_seconds: float = 5.0

    def __post_init__(self) -> None:
        _check_range("budget_window_seconds", self.window_seconds, 1, 86_400)
        _check_range("budget_windows_in_a_row", self.windows_in_a_row, 1, 1_000)
        _check_range("budget_min_samples", self.min_samples, 1, 10_000_000)
        _check_range("canary_timeout_seconds", self.canary_timeout_seconds, 1, 7 * 86_400)
        _check_range("cooldown_seconds", self.cooldown_seconds, 0, 7 * 86_400)
        if not 0 < self.canary_share <= 1:
            raise ConfigError(f"canary_share must be in (0, 1], got {self.canary_share}")
        if not 0 < self.latency_margin <= 1:
            raise ConfigError(f"latency_margin must be in (0, 1], got {self.latency_margin}")
        if not 0 <= self.check_seconds <= 3600:
            raise ConfigError(f"budget_check_seconds must be 0..3600, got {self.check_seconds}")

    @property
    def window_ms(self) -> int:
        return self.window_seconds * 1000

    def canary_size(self, devices: int) -> int:
        """How many of ``devices`` get the candidate first: the share, at least one, and
        never the whole class when it has more than one device (a canary needs a rest)."""
        if devices <= 1:
            return devices
        return min(max(1, round(devices * self.canary_share)), devices - 1)


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
    # Artifact downloads have a pool of their own (they last as long as their client
    # reads, so they must not hold short-call slots), with a cap per device.
    max_fetch_streams: int = 128
    max_fetches_per_device: int = 4
    # A chunk the client does not take within this long ends its download
    # (DEADLINE_EXCEEDED): a reader that stopped cannot hold a download slot for good.
    fetch_write_timeout_seconds: float = 60.0
    # Downloads read and hash blobs on a pool of this many threads, never queued behind
    # the database calls every other RPC waits for (a blob hashed whole reads ~1 GB/s).
    blob_read_threads: int = 4
    # Delta payloads are computed (base and target hashed, encoded, stored) on a pool of
    # this many threads: a burst of new (base, target) pairs runs at most this many
    # encodes at once and never queues ahead of the database calls.
    delta_threads: int = 2
    # A blob hashed whole is trusted this long while its file stays the same (inode,
    # size, mtime): a resumed download skips its prefix instead of hashing it again. The
    # longest that bit rot in place goes unseen by resumed downloads.
    verified_blob_trust_seconds: float = VERIFIED_TTL_SECONDS
    # Client-streamed uploads (AddModel, StartCompression) have a pool of their own too
    # (they last as long as their client sends), with a cap per client: its certificate
    # under mutual TLS, else its IP address (so on a plaintext loopback controller every
    # local client shares it).
    max_upload_streams: int = 8
    max_uploads_per_peer: int = 6
    # An upload that sends nothing for this long is ended (DEADLINE_EXCEEDED) and nothing
    # is stored.
    upload_idle_timeout_seconds: float = 60.0
    # ...and so is one that, after its first ``upload_rate_grace_seconds``, has received
    # fewer than ``upload_min_bytes_per_second`` bytes per second since then on average:
    # an upload of N bytes lasts at most grace + N / rate (a 1 GiB model at 64 KiB/s:
    # 4.6 h), so a client sending a byte every 59 s cannot hold a slot for ever.
    upload_min_bytes_per_second: int = 64 * KIB
    upload_rate_grace_seconds: float = 60.0
    # Health Watch streams one client (certificate, or address without TLS) may hold.
    max_health_watches_per_peer: int = 4
    grace_seconds: float = 5.0
    # Compression jobs run in a process pool of this many workers (each loads torch).
    compression_workers: int = 1
    # Threads each worker gives torch and numpy (0: the libraries' default, every core).
    compression_threads: int = 0
    # Jobs queued or running on this controller at once; more are refused.
    max_active_jobs: int = 16
    # Prometheus /metrics on this TCP port of ``host`` (0: any free port; None: off).
    metrics_port: int | None = None
    # Where the dashboard and /metrics listen (plain HTTP, no client identities): default
    # ``host``; keep it on loopback or a private address when gRPC faces the internet.
    metrics_host: str | None = None
    # Device-class YAML files whose budgets the budget loop checks (None: no loop).
    device_classes_dir: Path | None = None
    # How the budget loop judges and acts (slices, hysteresis, canary share).
    budget_policy: BudgetPolicy = field(default_factory=BudgetPolicy)
    # Mutual TLS: the controller's TLS directory (artifact.tls; None: plaintext).
    tls_dir: Path | None = None
    # Plaintext beyond loopback: anyone who reaches the port could act as any device or
    # admin, so it must be asked for.
    insecure: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir).expanduser().resolve())
        if self.device_classes_dir is not None:
            classes = Path(self.device_classes_dir).expanduser().resolve()
            object.__setattr__(self, "device_classes_dir", classes)
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
        _check_range("max_fetch_streams", self.max_fetch_streams, 1, 100_000)
        _check_range("max_fetches_per_device", self.max_fetches_per_device, 1, 64)
        _check_seconds("fetch_write_timeout_seconds", self.fetch_write_timeout_seconds)
        _check_range("blob_read_threads", self.blob_read_threads, 1, 256)
        _check_range("delta_threads", self.delta_threads, 1, 64)
        _check_seconds(
            "verified_blob_trust_seconds", self.verified_blob_trust_seconds, MAX_TRUST_SECONDS
        )
        _check_range("max_upload_streams", self.max_upload_streams, 1, 10_000)
        _check_range("max_uploads_per_peer", self.max_uploads_per_peer, 1, 10_000)
        _check_seconds("upload_idle_timeout_seconds", self.upload_idle_timeout_seconds)
        _check_range("upload_min_bytes_per_second", self.upload_min_bytes_per_second, 1, GIB)
        _check_seconds("upload_rate_grace_seconds", self.upload_rate_grace_seconds)
        _check_range("max_health_watches_per_peer", self.max_health_watches_per_peer, 1, 1_000)
        _check_range("compression_workers", self.compression_workers, 1, 64)
        _check_range("compression_threads", self.compression_threads, 0, 256)
        _check_range("max_active_jobs", self.max_active_jobs, 1, 10_000)
        if self.metrics_port is not None:
            _check_range("metrics_port", self.metrics_port, 0, 65535)
        if self.metrics_host is not None and (
            not self.metrics_host or any(c.isspace() for c in self.metrics_host)
        ):
            raise ConfigError(
                f"metrics_host must be a host name or IP address, got {self.metrics_host!r}"
            )
        if not 0 <= self.grace_seconds <= 600:
            raise ConfigError(f"grace_seconds must be 0..600, got {self.grace_seconds}")
        if self.metrics_port is not None and not self.insecure and not is_loopback(self.http_host):
            raise ConfigError(
                f"the dashboard and /metrics are plain HTTP without client identities: serving "
                f"them on {self.http_host} shows the fleet to anyone who reaches the port; pass "
                "--metrics-host 127.0.0.1 (scrape there or through a proxy), or --insecure on a "
                "network you trust"
            )
        if self.tls_dir is not None:
            object.__setattr__(self, "tls_dir", Path(self.tls_dir).expanduser().resolve())
        elif not self.insecure and not is_loopback(self.host):
            raise ConfigError(
                f"listening on {self.host} without TLS would let anyone who reaches the port "
                "act as any device or admin: pass --tls DIR (a controller certificate from "
                "`homefleet certs controller`), or --insecure on a network you trust"
            )

    @property
    def http_host(self) -> str:
        """Where the dashboard and /metrics listen."""
        return self.metrics_host or self.host

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


def _check_seconds(field: str, value: float, high: float = 3600.0) -> None:
    """A timeout or a trust window: a positive number of seconds (a 0 timeout would end
    every stream at once)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= high:
        raise ConfigError(f"{field} must be a number of seconds in (0, {high:g}], got {value!r}")
