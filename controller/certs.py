"""The HomeFleet CA: issue the certificates mutual TLS runs on (cryptography only).

A CA directory holds ``ca.pem`` and ``ca.key`` (0600). Every certificate it issues goes
into a TLS directory (`artifact.tls`) with a copy of ``ca.pem``. Keys are ECDSA P-256:
small, fast on a device, and what every TLS stack (gRPC's BoringSSL included) accepts.
Nothing here overwrites a key unless asked to (``replace``), so a typo cannot destroy
the CA or a device's identity.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from artifact.files import atomic_write_bytes
from artifact.names import InvalidNameError, check_name
from artifact.tls import (
    CA_FILE,
    CERT_FILE,
    CLASS_URI,
    CRL_FILE,
    KEY_FILE,
    NAME_URI,
    ORGANIZATION,
    Role,
    TlsError,
    check_validity,
)
from controller.revocation import load_crl

CA_KEY_FILE = "ca.key"
CA_DAYS = 3650
LEAF_DAYS = 397  # what browsers accept for a server certificate; renew yearly
CRL_DAYS = 30  # the CRL's next_update (informational: the controller uses the latest file)
MAX_DAYS = 36500
BACKDATE = datetime.timedelta(minutes=5)  # tolerate a little clock skew between machines


@dataclass(frozen=True)
class Issued:
    """What a command wrote, for its summary line."""

    directory: Path
    name: str
    role: Role
    not_after: datetime.datetime
    serial: int


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _check_days(days: int) -> None:
    if not 1 <= days <= MAX_DAYS:
        raise TlsError(f"validity must be 1..{MAX_DAYS} days, got {days}")


def leaf_subject(name: str, role: Role) -> x509.Name:
    """A HomeFleet identity as a certificate subject: CN the name, OU the role."""
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role.value),
        ]
    )


def pem_private_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _refuse_overwrite(paths: list[Path], replace: bool) -> None:
    existing = [p for p in paths if p.exists()]
    if existing and not replace:
        raise TlsError(
            f"{existing[0]} already exists: choose another directory, or pass --replace to "
            "issue a new key and certificate in its place"
        )


def _refuse_ca_overwrite(directory: Path) -> None:
    for path in (directory / CA_FILE, directory / CA_KEY_FILE):
        if path.exists():
            raise TlsError(
                f"{path} already exists: a new CA would invalidate every certificate the "
                "old one signed; choose another directory"
            )


def create_ca(directory: Path, *, name: str = "HomeFleet CA", days: int = CA_DAYS) -> Issued:
    """A new self-signed CA in ``directory`` (refuses to replace an existing one)."""
    _check_days(days)
    directory = Path(directory).expanduser()
    _refuse_ca_overwrite(directory)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
        ]
    )
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(directory / CA_KEY_FILE, pem_private_key(key))  # mkstemp: mode 0600
    atomic_write_bytes(directory / CA_FILE, _pem_cert(cert))
    return Issued(directory, name, Role.CONTROLLER, cert.not_valid_after_utc, cert.serial_number)


@dataclass(frozen=True)
class CertificateAuthority:
    """A loaded CA: its certificate and signing key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    pem: bytes
    directory: Path | None = None  # where it was loaded from: its own crl.pem lives there

    @classmethod
    def load(cls, directory: Path) -> CertificateAuthority:
        directory = Path(directory).expanduser()
        try:
            pem = (directory / CA_FILE).read_bytes()
            key_pem = (directory / CA_KEY_FILE).read_bytes()
        except FileNotFoundError as exc:
            raise TlsError(
                f"{exc.filename} is missing: --ca takes the directory `homefleet certs ca` "
                f"made ({CA_FILE} and {CA_KEY_FILE})"
            ) from None
        except OSError as exc:
            raise TlsError(f"cannot read the CA in {directory}: {exc.strerror or exc}") from None
        try:
            cert = x509.load_pem_x509_certificate(pem)
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError):
            raise TlsError(
                f"{directory} does not hold a PEM CA certificate and unencrypted key"
            ) from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise TlsError(f"{directory / CA_KEY_FILE} is not an ECDSA key")
        check_validity(cert, f"the CA certificate {directory / CA_FILE}")
        return cls(cert, key, pem, directory)

    def revoke(self, serial: int, crl_path: Path) -> frozenset[int]:
        """Add ``serial`` to the CRL at ``crl_path`` (made when absent), re-signed; the
        revoked serials after.

        The CA's own ``crl.pem`` is the record of every revocation: the new list holds
        its serials and those of ``crl_path`` with a number above both, and is written to
        both. Two lists kept apart (one beside the CA, one in the controller's directory)
        would each miss the other's revocations, and copying one over the other would
        let a revoked device back in.
        """
        revoked, number = frozenset[int](), 0
        paths = [crl_path]
        if self.directory is not None and (self.directory / CRL_FILE).resolve() != (
            crl_path.resolve()
        ):
            paths.append(self.directory / CRL_FILE)
        for path in paths:
            if path.exists():
                current = load_crl(path.read_bytes(), self.cert, path)
                revoked, number = revoked | current.serials, max(number, current.number)
        revoked |= {serial}
        now = _now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(now - BACKDATE)
            .next_update(now + datetime.timedelta(days=CRL_DAYS))
            .add_extension(x509.CRLNumber(number + 1), critical=False)  # newer lists count up
        )
        for revoked_serial in sorted(revoked):
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(revoked_serial)
                .revocation_date(now - BACKDATE)
                .build()
            )
        crl = builder.sign(self.key, hashes.SHA256())
        for path in paths:
            atomic_write_bytes(path, crl.public_bytes(serialization.Encoding.PEM))
        return revoked

    def issue(
        self,
        out_dir: Path,
        name: str,
        role: Role,
        *,
        hosts: tuple[str, ...] = (),
        device_class: str | None = None,
        days: int = LEAF_DAYS,
        replace: bool = False,
    ) -> Issued:
        """A key and certificate for ``name`` in ``role``, written as a TLS directory.

        Who may use it is in its subject alternative names: a controller's the hosts
        clients dial; a device's its id and the class it may register in (so a device
        cannot pick another class's models); an admin's its name — never a DNS name.
        """
        _check_days(days)
        if role is Role.CONTROLLER:
            if not hosts:
                raise TlsError(
                    "a controller certificate needs the names clients dial: --host NAME or "
                    "--host IP (repeatable), e.g. --host controller.example.org --host 127.0.0.1"
                )
            alt_names = [_general_name(h) for h in hosts]
        else:
            _check_tls_name(name, f"{role.value} name")
            uri = NAME_URI.format(role=role.value) + name
            alt_names = [x509.UniformResourceIdentifier(uri)]
            if role is Role.DEVICE:
                if device_class is None:
                    raise TlsError(
                        f"a device certificate names the class {name!r} may register in: "
                        "--class CLASS (e.g. --class home-hub)"
                    )
                _check_tls_name(device_class, "device class")
                alt_names.append(x509.UniformResourceIdentifier(CLASS_URI + device_class))
        out_dir = Path(out_dir).expanduser()
        _refuse_overwrite([out_dir / CERT_FILE, out_dir / KEY_FILE], replace)
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        not_after = min(now + datetime.timedelta(days=days), self.cert.not_valid_after_utc)
        usage = (
            ExtendedKeyUsageOID.SERVER_AUTH
            if role is Role.CONTROLLER
            else ExtendedKeyUsageOID.CLIENT_AUTH
        )
        builder = (
            x509.CertificateBuilder()
            .subject_name(leaf_subject(name, role))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_LEAF_KEY_USAGE, critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        cert = builder.sign(self.key, hashes.SHA256())
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out_dir / KEY_FILE, pem_private_key(key))
        atomic_write_bytes(out_dir / CERT_FILE, _pem_cert(cert))
        atomic_write_bytes(out_dir / CA_FILE, self.pem)
        return Issued(out_dir, name, role, cert.not_valid_after_utc, cert.serial_number)


def _check_tls_name(value: str, field: str) -> None:
    try:
        check_name(value, field=field)
    except InvalidNameError as exc:
        raise TlsError(str(exc)) from None


# an ECDHE handshake only signs with a leaf key: nothing else may be done with it
_LEAF_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        pass
    if not host or any(c.isspace() or c in "/:@" for c in host):
        raise TlsError(f"--host {host!r} is neither a DNS name nor an IP address")
    return x509.DNSName(host)
