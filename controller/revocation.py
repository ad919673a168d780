"""Revoked client certificates: the CA's CRL, read from the controller's TLS directory.

`homefleet certs revoke` adds a certificate's serial to the CA's ``crl.pem``; copied to
``crl.pem`` in the controller's TLS directory, it takes effect without a restart: the
file is looked at again at most every ``CHECK_INTERVAL_S`` seconds and reloaded when it
changed. gRPC's Python server cannot check a CRL during the handshake, so `Access`
checks each call's certificate serial here.

A CRL must be signed by the CA. One that is not (or cannot be parsed) is refused at
start; appearing later, it is logged and the previous list stays in force — a broken
file never silently lets a revoked device back in.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from artifact.tls import TlsError

log = logging.getLogger(__name__)

CHECK_INTERVAL_S = 2.0


def load_crl(data: bytes, ca: x509.Certificate, path: Path) -> frozenset[int]:
    """The revoked serials in a PEM CRL, after checking the CA signed it."""
    try:
        crl = x509.load_pem_x509_crl(data)
    except ValueError:
        raise TlsError(f"{path} is not a PEM certificate revocation list") from None
    public = ca.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey) or not crl.is_signature_valid(public):
        raise TlsError(f"{path} is not signed by the CA this controller trusts")
    return frozenset(revoked.serial_number for revoked in crl)


@dataclass(frozen=True)
class _Seen:
    mtime_ns: int
    size: int


class RevocationList:
    """The serials revoked by ``path`` (absent file: none), kept current."""

    def __init__(
        self, path: Path, ca: x509.Certificate, check_interval_s: float = CHECK_INTERVAL_S
    ) -> None:
        self.path = path
        self._ca = ca
        self._interval = check_interval_s
        self._lock = threading.Lock()
        self._serials: frozenset[int] = frozenset()
        self._seen: _Seen | None = None
        self._checked = 0.0
        self._reload(strict=True)

    def _stat(self) -> _Seen | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return _Seen(st.st_mtime_ns, st.st_size)

    def _reload(self, *, strict: bool) -> None:
        seen = self._stat()
        self._checked = time.monotonic()
        if seen == self._seen:
            return
        if seen is None:
            serials: frozenset[int] = frozenset()
        else:
            try:
                serials = load_crl(self.path.read_bytes(), self._ca, self.path)
            except (TlsError, OSError) as exc:
                if strict:
                    raise TlsError(str(exc)) from None
                log.error("keeping the previous revocation list (%d serials): %s", len(self), exc)
                self._seen = seen  # do not retry a broken file every call
                return
        if seen is not None or self._serials:
            log.info("revocation list %s: %d revoked certificate(s)", self.path, len(serials))
        self._serials, self._seen = serials, seen

    def __len__(self) -> int:
        return len(self._serials)

    def is_revoked(self, serial: int) -> bool:
        if time.monotonic() - self._checked >= self._interval:
            with self._lock:
                if time.monotonic() - self._checked >= self._interval:
                    self._reload(strict=False)
        return serial in self._serials
