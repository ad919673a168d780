"""ControllerConfig refuses bad settings up front, naming the field and the accepted range."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.config import ConfigError, ControllerConfig


def test_defaults_and_derived_paths(tmp_path: Path) -> None:
    config = ControllerConfig(data_dir=tmp_path)
    assert (config.host, config.port) == ("127.0.0.1", 50051)
    assert config.max_model_bytes == 1 << 30
    assert config.chunk_bytes == 256 * 1024
    assert config.heartbeat_seconds == 5
    assert config.database_url == f"sqlite:///{tmp_path.resolve() / 'homefleet.db'}"
    assert config.blob_dir == tmp_path.resolve() / "blobs"
    assert config.info_path == tmp_path.resolve() / "controller.json"
    assert ControllerConfig(data_dir=tmp_path, db_url="postgresql://db/x").database_url == (
        "postgresql://db/x"
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("port", -1),
        ("port", 70000),
        ("chunk_bytes", 1024),
        ("chunk_bytes", 2 << 20),
        ("heartbeat_seconds", 0),
        ("max_model_bytes", 0),
        ("max_model_bytes", 3 << 30),
        ("host", ""),
        ("db_url", "homefleet.db"),
    ],
)
def test_bad_values_name_the_field(tmp_path: Path, field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        ControllerConfig(data_dir=tmp_path, **{field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"])
def test_plaintext_on_loopback_needs_nothing(tmp_path: Path, host: str) -> None:
    assert ControllerConfig(data_dir=tmp_path, host=host).tls_dir is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "fleet.example.org"])
def test_plaintext_beyond_loopback_must_be_asked_for(tmp_path: Path, host: str) -> None:
    with pytest.raises(ConfigError, match=r"without TLS .* --tls DIR .* --insecure"):
        ControllerConfig(data_dir=tmp_path, host=host)
    assert ControllerConfig(data_dir=tmp_path, host=host, insecure=True).insecure
    tls = ControllerConfig(data_dir=tmp_path, host=host, tls_dir=tmp_path / "tls")
    assert tls.tls_dir == (tmp_path / "tls").resolve()


def test_the_dashboard_listens_on_host_unless_told_otherwise(tmp_path: Path) -> None:
    config = ControllerConfig(data_dir=tmp_path, host="0.0.0.0", insecure=True)
    assert config.http_host == "0.0.0.0"
    local = ControllerConfig(data_dir=tmp_path, host="0.0.0.0", insecure=True, metrics_host="::1")
    assert local.http_host == "::1"
    with pytest.raises(ConfigError, match="metrics_host"):
        ControllerConfig(data_dir=tmp_path, metrics_host=" ")


def test_a_public_dashboard_must_be_asked_for(tmp_path: Path) -> None:
    tls = tmp_path / "tls"
    with pytest.raises(ConfigError, match=r"plain HTTP .* --metrics-host 127\.0\.0\.1"):
        ControllerConfig(data_dir=tmp_path, host="0.0.0.0", tls_dir=tls, metrics_port=9100)
    local = ControllerConfig(
        data_dir=tmp_path, host="0.0.0.0", tls_dir=tls, metrics_port=9100, metrics_host="127.0.0.1"
    )
    assert local.http_host == "127.0.0.1"
    assert ControllerConfig(
        data_dir=tmp_path, host="0.0.0.0", tls_dir=tls, metrics_port=9100, insecure=True
    ).insecure
