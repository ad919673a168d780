"""A throwaway HomeFleet CA and certificates, made with `controller.certs` as operators do."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from artifact.files import atomic_write_bytes
from artifact.tls import CA_FILE, CERT_FILE, CLASS_URI, KEY_FILE, Role
from controller.certs import CertificateAuthority, create_ca, leaf_subject, pem_private_key


@dataclass(frozen=True)
class Pki:
    """One CA's directory and the TLS directories issued from it, under ``root``."""

    root: Path

    @property
    def ca_dir(self) -> Path:
        return self.root / "ca"

    def ca(self) -> CertificateAuthority:
        return CertificateAuthority.load(self.ca_dir)

    def controller(self) -> Path:
        out = self.root / "controller"
        if not (out / CERT_FILE).exists():
            self.ca().issue(out, "homefleet-controller", Role.CONTROLLER, hosts=("127.0.0.1",))
        return out

    def device(self, device_id: str, device_class: str = "home-hub") -> Path:
        out = self.root / "devices" / device_id
        if not (out / CERT_FILE).exists():
            self.ca().issue(out, device_id, Role.DEVICE, device_class=device_class)
        return out

    def admin(self, name: str = "alice") -> Path:
        out = self.root / "admins" / name
        if not (out / CERT_FILE).exists():
            self.ca().issue(out, name, Role.ADMIN)
        return out

    def expired_device(self, device_id: str) -> Path:
        """A device certificate from this CA whose validity ended yesterday.

        `CertificateAuthority.issue` refuses to make one, so it is built here by hand.
        """
        out = self.root / "expired" / device_id
        ca = self.ca()
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(leaf_subject(device_id, Role.DEVICE))
            .issuer_name(ca.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=30))
            .not_valid_after(now - datetime.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(f"{CLASS_URI}home-hub")]
                ),
                critical=False,
            )
            .sign(ca.key, hashes.SHA256())
        )
        atomic_write_bytes(out / KEY_FILE, pem_private_key(key))
        atomic_write_bytes(out / CERT_FILE, cert.public_bytes(serialization.Encoding.PEM))
        atomic_write_bytes(out / CA_FILE, ca.pem)
        return out


def make_pki(root: Path) -> Pki:
    create_ca(root / "ca")
    return Pki(root)
