"""Mutual TLS credentials: one directory per party, the same layout everywhere.

A *TLS directory* holds three PEM files (``homefleet certs`` writes them):

    ca.pem     the HomeFleet CA certificate: what the other side's certificate must chain to
    cert.pem   this party's certificate (the controller, a device, or an admin)
    key.pem    its private key (mode 0600)

The controller serves with its directory and requires a client certificate signed by the
CA; the agent and the operator CLI dial with theirs. Who a client is comes from its
certificate, never from a request field: the subject's common name is the device id or
the admin's name, and its organizational unit is the role (`Role`).

Loading checks what would otherwise surface as an opaque handshake failure much later:
the files exist and are PEM, the key belongs to the certificate, the certificate is
within its validity period and signed by ``ca.pem``.
"""

from __future__ import annotations

import datetime
import enum
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

CA_FILE = "ca.pem"
CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"
CRL_FILE = "crl.pem"  # optional, in the controller's directory: revoked certificates
ENV_TLS = "HOMEFLEET_TLS"  # the operator CLI's TLS directory (the agent takes --tls)
ORGANIZATION = "HomeFleet"


class Role(enum.Enum):
    """What a certificate lets its holder do; stored as the subject's organizational unit."""

    CONTROLLER = "controller"  # serves AgentService and AdminService
    DEVICE = "device"  # AgentService, as the device named by the common name only
    ADMIN = "admin"  # AdminService


class TlsError(ValueError):
    """A TLS directory or certificate that cannot be used; the message says what to fix."""


CLASS_URI = "homefleet:device-class:"  # a device certificate's SAN: the class it may join
NAME_URI = "homefleet:{role}:"  # a client certificate's SAN: never a DNS name (so no
# device named like a host could pass for the controller, even without the EKU check)


@dataclass(frozen=True)
class Identity:
    """Who a certificate names: the common name, the role, which certificate, and for a
    device the class it was issued for."""

    name: str
    role: Role
    serial: int = 0
    device_class: str | None = None

    @classmethod
    def of(cls, cert: x509.Certificate) -> Identity:
        """The identity in ``cert``'s subject, or TlsError when it is not a HomeFleet one."""
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        units = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
        if len(names) != 1 or len(units) != 1:
            raise TlsError(
                f"certificate {cert.subject.rfc4514_string()!r} is not a HomeFleet one: it needs "
                "exactly one CN (the name) and one OU (the role: controller, device or admin)"
            )
        unit = str(units[0].value)
        try:
            role = Role(unit)
        except ValueError:
            raise TlsError(
                f"certificate for {names[0].value!r} has role (OU) {unit!r}; expected one of "
                f"{', '.join(r.value for r in Role)}"
            ) from None
        name = str(names[0].value)
        device_class = None
        if role is Role.DEVICE:
            classes = [u[len(CLASS_URI) :] for u in _uris(cert) if u.startswith(CLASS_URI)]
            if len(classes) != 1:
                raise TlsError(
                    f"device certificate for {name!r} names {len(classes)} device classes; it "
                    f"needs exactly one (a {CLASS_URI}NAME subject alternative name: issue it "
                    "with `homefleet certs device ID DIR --class CLASS`)"
                )
            device_class = classes[0]
        return cls(name, role, cert.serial_number, device_class)


def _uris(cert: x509.Certificate) -> list[str]:
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(u) for u in names.get_values_for_type(x509.UniformResourceIdentifier)]


def _read(directory: Path, name: str) -> bytes:
    path = directory / name
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise TlsError(
            f"{path} is missing: a TLS directory holds {CA_FILE}, {CERT_FILE} and {KEY_FILE} "
            "(`homefleet certs ...` writes them)"
        ) from None
    except OSError as exc:
        raise TlsError(f"cannot read {path}: {exc.strerror or exc}") from None


def _certificate(data: bytes, path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise TlsError(f"{path} is not a PEM certificate (-----BEGIN CERTIFICATE-----)") from None


def check_validity(cert: x509.Certificate, what: str, now: datetime.datetime | None = None) -> None:
    now = now or datetime.datetime.now(datetime.UTC)
    if now < cert.not_valid_before_utc:
        raise TlsError(f"{what} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
    if now > cert.not_valid_after_utc:
        raise TlsError(
            f"{what} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC: issue a new one "
            "with `homefleet certs`"
        )


@dataclass(frozen=True)
class TlsBundle:
    """A checked TLS directory, ready to become gRPC credentials."""

    directory: Path
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes
    identity: Identity
    not_after: datetime.datetime

    @classmethod
    def load(cls, directory: Path) -> TlsBundle:
        directory = Path(directory).expanduser()
        if not directory.is_dir():
            raise TlsError(
                f"{directory} is not a directory: --tls takes a directory holding {CA_FILE}, "
                f"{CERT_FILE} and {KEY_FILE}"
            )
        ca_pem, cert_pem, key_pem = (_read(directory, n) for n in (CA_FILE, CERT_FILE, KEY_FILE))
        ca = _certificate(ca_pem, directory / CA_FILE)
        cert = _certificate(cert_pem, directory / CERT_FILE)
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError):
            raise TlsError(
                f"{directory / KEY_FILE} is not an unencrypted PEM private key"
            ) from None
        public = serialization.PublicFormat.SubjectPublicKeyInfo
        if key.public_key().public_bytes(
            serialization.Encoding.DER, public
        ) != cert.public_key().public_bytes(serialization.Encoding.DER, public):
            raise TlsError(f"{directory / KEY_FILE} is not the key of {directory / CERT_FILE}")
        check_validity(ca, f"the CA certificate {directory / CA_FILE}")
        check_validity(cert, f"the certificate {directory / CERT_FILE}")
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            raise TlsError(
                f"{directory / CERT_FILE} was not issued by the CA in {directory / CA_FILE}"
            ) from None
        identity = Identity.of(cert)
        return cls(directory, ca_pem, cert_pem, key_pem, identity, cert.not_valid_after_utc)

    def require_role(self, role: Role) -> TlsBundle:
        if self.identity.role is not role:
            raise TlsError(
                f"{self.directory / CERT_FILE} is a {self.identity.role.value} certificate "
                f"({self.identity.name!r}); this needs {_article(role.value)} {role.value} one"
            )
        return self

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Dial with this certificate; trust only servers the CA signed."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_pem,
            private_key=self.key_pem,
            certificate_chain=self.cert_pem,
        )

    def server_credentials(self) -> grpc.ServerCredentials:
        """Serve with this certificate; every client must present one the CA signed."""
        return grpc.ssl_server_credentials(
            [(self.key_pem, self.cert_pem)],
            root_certificates=self.ca_pem,
            require_client_auth=True,
        )


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an IP, IPv6 possibly in brackets) only accepts
    connections from this machine: where plaintext without identities is acceptable."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def peer_identity(auth_context: Mapping[str, Iterable[bytes]]) -> Identity | None:
    """The client's identity from a gRPC auth context; None on a plaintext connection.

    The server already verified the certificate against the CA during the handshake.
    """
    pems = list(auth_context.get("x509_pem_cert", ()))
    if not pems:
        return None
    return Identity.of(x509.load_pem_x509_certificate(pems[0]))
