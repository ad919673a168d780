"""Revoked client certificates: the CA's CRL, read from the controller's TLS directory.

`homefleet certs revoke` adds a certificate's serial to the CA's ``crl.pem``; copied to
``crl.pem`` in the controller's TLS directory, it takes effect without a restart: the
file is looked at again at most every ``CHECK_INTERVAL_S`` seconds and reloaded when it
changed. gRPC's Python server cannot check a CRL during the handshake, so `Access`
checks each call's certificate serial here.

A CRL must be signed by the CA. One that is not (or cannot be parsed) is refused at
start; appearing later, it is logged and the previous list stays in force, as it does
when the file disappears, is replaced by an older list (a lower CRL number), or by one
that no longer names a certificate revoked before: no broken, missing, stale or partial
file silently lets a revoked device back in.
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


@dataclass(frozen=True)
class Crl:
    """What a CRL says: the revoked serials, and its number (each new list counts up)."""

    serials: frozenset[int]
    number: int  # its CRLNumber extension; 0 when it has none


def load_crl(data: bytes, ca: x509.Certificate, path: Path) -> Crl:
    """The revoked serials in a PEM CRL, after checking the CA signed it."""
    try:
        crl = x509.load_pem_x509_crl(data)
    except ValueError:
        raise TlsError(f"{path} is not a PEM certificate revocation list") from None
    public = ca.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey) or not crl.is_signature_valid(public):
        raise TlsError(f"{path} is not signed by the CA this controller trusts")
    try:
        number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        number = 0
    return Crl(frozenset(revoked.serial_number for revoked in crl), number)


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
        self._number: int | None = None  # the CRL number in force; None: no list yet
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
        self._seen = seen  # a bad file is judged once, not on every call
        if seen is None:
            if self._number is not None:  # it was there: a deletion revokes nothing back
                log.error(
                    "%s disappeared; the %d revocation(s) it held stay in force (restart the "
                    "controller without it to drop them)",
                    self.path,
                    len(self),
                )
            return
        try:
            crl = load_crl(self.path.read_bytes(), self._ca, self.path)
        except (TlsError, OSError) as exc:
            if strict:
                raise TlsError(str(exc)) from None
            log.error("keeping the previous revocation list (%d serials): %s", len(self), exc)
            return
        if self._number is not None and crl.number < self._number:
            log.error(
                "%s is revocation list number %d, older than number %d in force: ignored (an "
                "old copy would let revoked certificates back in)",
                self.path,
                crl.number,
                self._number,
            )
            return
        dropped = self._serials - crl.serials
        if dropped:
            log.error(
                "%s (number %d) no longer lists %d certificate(s) revoked before (serials %s): "
                "ignored, a revocation is for good. Revoke with `homefleet certs revoke --ca "
                "CA_DIR`, which keeps every revocation in the CA's own crl.pem, and copy that",
                self.path,
                crl.number,
                len(dropped),
                ", ".join(f"{s:x}" for s in sorted(dropped)[:5]),
            )
            return
        log.info("revocation list %s: %d revoked certificate(s)", self.path, len(crl.serials))
        self._serials, self._number = crl.serials, crl.number

    def __len__(self) -> int:
        return len(self._serials)

    def is_revoked(self, serial: int) -> bool:
        if time.monotonic() - self._checked >= self._interval:
            with self._lock:
                if time.monotonic() - self._checked >= self._interval:
                    self._reload(strict=False)
        return serial in self._serials
