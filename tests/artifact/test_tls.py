"""TLS directories: what `homefleet certs` writes loads, and what cannot work is refused early.

Every refusal names the file and what to do, instead of surfacing later as an opaque
handshake failure that looks like an unreachable controller.
"""

from __future__ import annotations

import shutil
import stat
from pathlib import Path

import pytest
from cryptography import x509

from artifact.tls import CA_FILE, CERT_FILE, KEY_FILE, Role, TlsBundle, TlsError
from controller.certs import CA_KEY_FILE, CertificateAuthority, create_ca
from tests.support.pki import Pki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_issued_directories_load_with_their_identity(pki: Pki) -> None:
    device = TlsBundle.load(pki.device("hub-1"))
    assert (device.identity.name, device.identity.role) == ("hub-1", Role.DEVICE)
    admin = TlsBundle.load(pki.admin("alice"))
    assert (admin.identity.name, admin.identity.role) == ("alice", Role.ADMIN)
    controller = TlsBundle.load(pki.controller())
    assert controller.identity.role is Role.CONTROLLER
    assert controller.require_role(Role.CONTROLLER) is controller


def test_private_keys_are_readable_by_their_owner_only(pki: Pki) -> None:
    for path in (pki.ca_dir / CA_KEY_FILE, pki.device("hub-1") / KEY_FILE):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_a_certificate_for_another_role_is_refused(pki: Pki) -> None:
    with pytest.raises(TlsError, match=r"is a device certificate .* needs an admin one"):
        TlsBundle.load(pki.device("hub-1")).require_role(Role.ADMIN)


def test_missing_files_name_the_layout(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(TlsError, match="not a directory"):
        TlsBundle.load(tmp_path / "nowhere")
    partial = tmp_path / "partial"
    shutil.copytree(pki.device("hub-1"), partial)
    (partial / KEY_FILE).unlink()
    with pytest.raises(TlsError, match=r"key\.pem is missing: a TLS directory holds"):
        TlsBundle.load(partial)


def test_a_key_that_is_not_the_certificates_is_refused(pki: Pki, tmp_path: Path) -> None:
    mixed = tmp_path / "mixed"
    shutil.copytree(pki.device("hub-1"), mixed)
    shutil.copy(pki.admin("alice") / KEY_FILE, mixed / KEY_FILE)
    with pytest.raises(TlsError, match=r"key\.pem is not the key of .*cert\.pem"):
        TlsBundle.load(mixed)


def test_garbage_instead_of_pem_is_refused(pki: Pki, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(pki.device("hub-1"), broken)
    (broken / CERT_FILE).write_bytes(b"not a certificate")
    with pytest.raises(TlsError, match="is not a PEM certificate"):
        TlsBundle.load(broken)


def test_a_certificate_from_another_ca_is_refused(pki: Pki, tmp_path: Path) -> None:
    other = make_pki(tmp_path / "other")
    foreign = tmp_path / "foreign"
    shutil.copytree(other.device("hub-1"), foreign)
    shutil.copy(pki.ca_dir / CA_FILE, foreign / CA_FILE)
    with pytest.raises(TlsError, match="was not issued by the CA"):
        TlsBundle.load(foreign)


def test_an_expired_certificate_is_refused_with_its_date(pki: Pki) -> None:
    with pytest.raises(TlsError, match=r"expired on .* issue a new one"):
        TlsBundle.load(pki.expired_device("hub-9"))


def test_the_ca_is_never_replaced(pki: Pki) -> None:
    before = (pki.ca_dir / CA_KEY_FILE).read_bytes()
    with pytest.raises(TlsError, match="would invalidate every certificate"):
        create_ca(pki.ca_dir)
    assert (pki.ca_dir / CA_KEY_FILE).read_bytes() == before


def test_reissuing_needs_replace_and_then_makes_a_new_key(pki: Pki, tmp_path: Path) -> None:
    ca = CertificateAuthority.load(pki.ca_dir)
    out = tmp_path / "hub-2"
    ca.issue(out, "hub-2", Role.DEVICE, device_class="home-hub")
    first = (out / KEY_FILE).read_bytes()
    with pytest.raises(TlsError, match=r"already exists: .* --replace"):
        ca.issue(out, "hub-2", Role.DEVICE, device_class="home-hub")
    assert (out / KEY_FILE).read_bytes() == first
    ca.issue(out, "hub-2", Role.DEVICE, device_class="home-hub", replace=True)
    assert (out / KEY_FILE).read_bytes() != first
    assert TlsBundle.load(out).identity.name == "hub-2"


def test_bad_names_and_hosts_are_refused_before_anything_is_written(
    pki: Pki, tmp_path: Path
) -> None:
    ca = CertificateAuthority.load(pki.ca_dir)
    with pytest.raises(TlsError, match="device name 'Hub 1' is not valid"):
        ca.issue(tmp_path / "a", "Hub 1", Role.DEVICE, device_class="home-hub")
    with pytest.raises(TlsError, match="needs the names clients dial"):
        ca.issue(tmp_path / "b", "homefleet-controller", Role.CONTROLLER)
    with pytest.raises(TlsError, match="neither a DNS name nor an IP address"):
        ca.issue(tmp_path / "c", "homefleet-controller", Role.CONTROLLER, hosts=("a b",))
    with pytest.raises(TlsError, match="validity must be"):
        ca.issue(tmp_path / "d", "hub-3", Role.DEVICE, device_class="home-hub", days=0)
    assert not any((tmp_path / n).exists() for n in "abcd")


def test_client_certificates_carry_uris_not_host_names_and_sign_only(pki: Pki) -> None:
    cert = x509.load_pem_x509_certificate((pki.device("hub-1") / CERT_FILE).read_bytes())
    alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert alt.get_values_for_type(x509.DNSName) == []  # cannot pass for a controller
    assert alt.get_values_for_type(x509.UniformResourceIdentifier) == [
        "homefleet:device:hub-1",
        "homefleet:device-class:home-hub",
    ]
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature
    assert not (usage.value.key_cert_sign or usage.value.crl_sign)
    assert TlsBundle.load(pki.device("hub-1")).identity.device_class == "home-hub"


def test_a_device_certificate_must_name_its_class(pki: Pki, tmp_path: Path) -> None:
    ca = CertificateAuthority.load(pki.ca_dir)
    with pytest.raises(TlsError, match="--class CLASS"):
        ca.issue(tmp_path / "x", "hub-5", Role.DEVICE)
    assert not (tmp_path / "x").exists()
