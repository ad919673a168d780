"""The agent's settings: one frozen dataclass, checked when it is built.

Every refusal names the setting and what it accepts, so a wrong flag is fixed at once
instead of surfacing later as a confusing runtime failure.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from artifact.energy_sources import EnergySourceError, check_slowdown
from artifact.names import InvalidNameError, check_name
from artifact.tls import Role, TlsBundle, TlsError, is_loopback
from edge_agent.errors import AgentError, ErrorCode
from edge_agent.meters import PowerModel

MAX_MESSAGE_BYTES = 8 * 1024 * 1024
MIN_CHUNK_BYTES = 64 * 1024
MAX_CHUNK_BYTES = 1024 * 1024
DEFAULT_CHUNK_BYTES = 256 * 1024
MAX_TELEMETRY_WINDOW_S = 3600.0  # an hour: longer windows would keep budgets blind
UNIX_PREFIX = "unix:"
# The local API's socket is bound at a temporary name beside its path (BIND_PREFIX and 8
# hex digits), then linked into place; sockaddr_un holds at most 107 characters on Linux,
# and the temporary name may be 11 longer than the path.
BIND_PREFIX = ".hf-"
MAX_UNIX_PATH = 96


def _invalid(field: str, message: str) -> AgentError:
    return AgentError(ErrorCode.INVALID_CONFIG, f"{field}: {message}")


def check_host_port(value: str, *, field: str, allow_port_zero: bool) -> str:
    """Accept ``HOST:PORT`` (IPv6 hosts in brackets); the error says what is accepted."""
    host, sep, port_text = value.rpartition(":")
    lowest = 0 if allow_port_zero else 1
    if not sep or not host or not port_text.isdigit() or not lowest <= int(port_text) <= 65535:
        raise _invalid(field, f"expected HOST:PORT with a port in {lowest}..65535, got {value!r}")
    return value


@dataclass(frozen=True)
class ListenAddress:
    """Where the local inference API listens: a TCP ``HOST:PORT`` or ``unix:/path``."""

    text: str

    def __post_init__(self) -> None:
        if self.is_unix:
            path = self.text[len(UNIX_PREFIX) :]
            if not path.startswith("/") or len(path) > MAX_UNIX_PATH:
                raise _invalid(
                    "--listen",
                    f"a unix socket needs an absolute path of at most {MAX_UNIX_PATH} "
                    f"characters (unix:/path/agent.sock), got {self.text!r}",
                )
        else:
            check_host_port(self.text, field="--listen", allow_port_zero=True)

    @property
    def is_unix(self) -> bool:
        return self.text.startswith(UNIX_PREFIX)

    @property
    def unix_path(self) -> Path:
        return Path(self.text[len(UNIX_PREFIX) :])


@dataclass(frozen=True)
class AgentConfig:
    controller: str
    device_id: str
    device_class: str
    state_dir: Path
    listen: ListenAddress = ListenAddress("127.0.0.1:0")
    # The local inference API has no client identities: beyond loopback, only when asked.
    insecure_listen: bool = False
    # None: manifests are deployed unverified (warned); `agent run` allows that only
    # with --allow-unsigned-manifests (cli.trust_choice_error)
    trust_key: Path | None = None
    tls_dir: Path | None = None  # mutual TLS: this device's certificate (artifact.tls)
    threads: int = 1
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    rpc_timeout_s: float = 10.0
    fetch_timeout_s: float = 300.0
    fetch_attempts: int = 5
    # a failed deployment that may pass by itself is tried again after this, doubling
    # per failure up to the maximum (a reconnect starts over)
    deploy_retry_initial_s: float = 30.0
    deploy_retry_max_s: float = 900.0
    watch_renew_s: float = 3600.0
    max_concurrent_predicts: int = 8
    # telemetry: meters are read under sysfs_root (tests point it at a prepared tree)
    sysfs_root: Path = Path("/")
    idle_watts: float | None = None  # the class's power model, for the estimate meter
    active_watts: float | None = None
    telemetry_window_s: float = 10.0
    telemetry_max_windows: int = 10_000  # on-disk queue bound; older windows are summarised
    telemetry_batch: int = 500  # windows per ReportTelemetry (the controller takes 1000)
    telemetry_poll_s: float = 1.0  # how often an idle sender looks at the queue
    metrics_listen: str | None = None  # HOST:PORT for Prometheus /metrics; None: off
    emulate_slowdown: float = 1.0  # demos/tests only: report latency, CPU, energy x this

    @property
    def power_model(self) -> PowerModel | None:
        if self.idle_watts is None or self.active_watts is None:
            return None
        return PowerModel(self.idle_watts, self.active_watts)

    def device_tls(self) -> TlsBundle | None:
        """This device's TLS directory, checked: read again for every connection, so a
        renewed certificate is used from the next reconnect on."""
        if self.tls_dir is None:
            return None
        try:
            bundle = TlsBundle.load(self.tls_dir).require_role(Role.DEVICE)
        except TlsError as exc:
            raise _invalid("--tls", str(exc)) from None
        if bundle.identity.name != self.device_id:
            raise _invalid(
                "--tls",
                f"{self.tls_dir} holds device {bundle.identity.name!r}'s certificate, but this "
                f"agent runs as --device-id {self.device_id!r}: the controller would refuse it",
            )
        if bundle.identity.device_class != self.device_class:
            raise _invalid(
                "--tls",
                f"{self.tls_dir} holds a certificate for class "
                f"{bundle.identity.device_class!r}, but this agent runs as --device-class "
                f"{self.device_class!r}: the controller would refuse it",
            )
        return bundle

    def __post_init__(self) -> None:
        check_host_port(self.controller, field="--controller", allow_port_zero=False)
        for field, value in (
            ("--device-id", self.device_id),
            ("--device-class", self.device_class),
        ):
            try:
                check_name(value, field=field)
            except InvalidNameError as exc:
                raise AgentError(ErrorCode.INVALID_CONFIG, str(exc)) from exc
        if self.state_dir.exists() and not self.state_dir.is_dir():
            raise _invalid("--state-dir", f"{self.state_dir} exists and is not a directory")
        if self.trust_key is not None and not self.trust_key.is_file():
            raise _invalid("--trust-key", f"{self.trust_key} is not a readable PEM file")
        if self.tls_dir is not None:
            self.device_tls()  # refuse a certificate that cannot work before dialing
        if (
            not self.listen.is_unix
            and not self.insecure_listen
            and not is_loopback(self.listen.text.rpartition(":")[0])
        ):
            raise _invalid(
                "--listen",
                f"{self.listen.text} would let anyone on the network run this device's models "
                "(the local API has no client identities): listen on 127.0.0.1 or a unix "
                "socket, or pass --insecure-listen on a network you trust",
            )
        if not 1 <= self.threads <= 256:
            raise _invalid("--threads", f"expected 1..256, got {self.threads}")
        if not MIN_CHUNK_BYTES <= self.chunk_bytes <= MAX_CHUNK_BYTES:
            raise _invalid(
                "chunk_bytes",
                f"expected {MIN_CHUNK_BYTES}..{MAX_CHUNK_BYTES}, got {self.chunk_bytes}",
            )
        if not 0 < self.backoff_initial_s <= self.backoff_max_s:
            raise _invalid("backoff", "expected 0 < backoff_initial_s <= backoff_max_s")
        if not 0 < self.deploy_retry_initial_s <= self.deploy_retry_max_s:
            raise _invalid(
                "deploy_retry", "expected 0 < deploy_retry_initial_s <= deploy_retry_max_s"
            )
        for field, seconds in (
            ("rpc_timeout_s", self.rpc_timeout_s),
            ("fetch_timeout_s", self.fetch_timeout_s),
            ("watch_renew_s", self.watch_renew_s),
        ):
            if not seconds > 0:
                raise _invalid(field, f"expected a positive number of seconds, got {seconds}")
        if self.fetch_attempts < 1:
            raise _invalid("fetch_attempts", f"expected at least 1, got {self.fetch_attempts}")
        if self.max_concurrent_predicts < 1:
            raise _invalid(
                "max_concurrent_predicts",
                f"expected at least 1, got {self.max_concurrent_predicts}",
            )
        self._check_telemetry()

    def _check_telemetry(self) -> None:
        if (self.idle_watts is None) != (self.active_watts is None):
            raise _invalid("--idle-watts/--active-watts", "give both or neither")
        if (
            self.idle_watts is not None
            and self.active_watts is not None
            and not 0 <= self.idle_watts <= self.active_watts
        ):
            raise _invalid(
                "--idle-watts/--active-watts",
                f"expected 0 <= idle <= active, got {self.idle_watts} and {self.active_watts}",
            )
        for field, seconds in (
            ("--telemetry-window-seconds", self.telemetry_window_s),
            ("telemetry_poll_s", self.telemetry_poll_s),
        ):
            if not 0 < seconds <= MAX_TELEMETRY_WINDOW_S:
                raise _invalid(
                    field,
                    f"expected a positive number of seconds, at most {MAX_TELEMETRY_WINDOW_S:g} "
                    f"(telemetry is sent as windows close), got {seconds}",
                )
        if self.telemetry_max_windows < 2:
            raise _invalid(
                "telemetry_max_windows", f"expected at least 2, got {self.telemetry_max_windows}"
            )
        try:  # the controller's rule: a factor it refuses loses every telemetry window
            check_slowdown(self.emulate_slowdown)
        except EnergySourceError as exc:
            raise _invalid("--emulate-slowdown", str(exc)) from None
        if not 1 <= self.telemetry_batch <= 1000:
            raise _invalid("telemetry_batch", f"expected 1..1000, got {self.telemetry_batch}")
        if self.metrics_listen is not None:
            check_host_port(self.metrics_listen, field="--metrics-listen", allow_port_zero=True)
