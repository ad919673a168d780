"""Who may call what, decided from the client's certificate (mutual TLS).

With TLS (`controller serve --tls DIR`) the handshake already proved the client holds a
certificate the HomeFleet CA signed; here its subject decides:

- AgentService: a *device* certificate, and only for the device it names — a request's
  ``device_id`` must equal the certificate's common name, so one home's device cannot
  register, watch, fetch or report as another — and registering only in the device class
  the certificate names, so a device cannot choose another class's models;
- AdminService: an *admin* certificate;
- health checks: any certificate the CA issued (`health.py`);
- and never a certificate the CA revoked (`revocation.py`).

Without TLS (the embedded default on loopback, and tests) there is no identity to check
and every call is allowed: ``ControllerConfig`` refuses to listen beyond loopback that way
unless told ``--insecure``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc

from artifact.tls import Identity, Role, TlsError, peer_identity
from controller.errors import ErrorCode, FleetError
from controller.revocation import RevocationList

Context = grpc.aio.ServicerContext[Any, Any]


def _denied(message: str) -> FleetError:
    return FleetError(ErrorCode.PERMISSION_DENIED, message)


@dataclass(frozen=True)
class Access:
    """The controller's access policy; ``mtls`` False allows everything (no identities)."""

    mtls: bool
    revoked: RevocationList | None = None

    def _peer(self, context: Context) -> Identity:
        try:
            identity = peer_identity(context.auth_context())
        except TlsError as exc:
            raise _denied(str(exc)) from None
        if identity is None:
            raise _denied("this controller requires a client certificate (mutual TLS)")
        if self.revoked is not None and self.revoked.is_revoked(identity.serial):
            raise _denied(
                f"the certificate of {identity.name!r} (serial {identity.serial:x}) was revoked"
            )
        return identity

    def check_agent(
        self, context: Context, device_id: str, device_class: str | None = None
    ) -> None:
        """An AgentService call for ``device_id`` (registering in ``device_class``): only
        that device's own certificate, and only in the class it was issued for."""
        if not self.mtls:
            return
        peer = self._peer(context)
        if peer.role is not Role.DEVICE:
            raise _denied(
                f"AgentService needs a device certificate; {peer.name!r} holds "
                f"{'an' if peer.role is Role.ADMIN else 'a'} {peer.role.value} one"
            )
        if peer.name != device_id:
            raise _denied(
                f"the certificate is device {peer.name!r}'s; it cannot act as device {device_id!r}"
            )
        if device_class is not None and device_class != peer.device_class:
            raise _denied(
                f"device {peer.name!r}'s certificate is for class {peer.device_class!r}; it "
                f"cannot register in class {device_class!r}"
            )

    def check_peer(self, context: Context) -> None:
        """A call any certificate the CA issued may make (health checks), unless revoked."""
        if self.mtls:
            self._peer(context)

    def check_admin(self, context: Context) -> None:
        """An AdminService call: only an admin certificate."""
        if not self.mtls:
            return
        peer = self._peer(context)
        if peer.role is not Role.ADMIN:
            raise _denied(
                f"AdminService needs an admin certificate; {peer.name!r} holds a "
                f"{peer.role.value} one (issue one with `homefleet certs admin`)"
            )


OPEN = Access(mtls=False)
