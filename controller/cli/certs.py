"""`homefleet certs ...`: the HomeFleet CA and the certificates mutual TLS runs on.

Offline (cryptography only). A typical setup:

    homefleet certs ca ca/
    homefleet certs controller tls/controller --ca ca/ --host fleet.example.org
    homefleet certs device hub-livingroom tls/hub-livingroom --ca ca/ --class home-hub
    homefleet certs admin alice ~/.homefleet/alice --ca ca/

then `homefleet controller serve --tls tls/controller`, `homefleet agent run --tls
tls/hub-livingroom ...` on the device, and `HOMEFLEET_TLS=~/.homefleet/alice` for the
operator commands. Keep ``ca/`` (it holds the CA's key) off the controller host.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from artifact.tls import CRL_FILE, Role, TlsBundle, TlsError
from controller.cli.errors import ExitCode

if TYPE_CHECKING:
    from controller.certs import Issued

app = typer.Typer(
    help="The HomeFleet CA and the certificates for mutual TLS (offline).",
    no_args_is_help=True,
)

CaOption = Annotated[
    Path, typer.Option("--ca", metavar="DIR", help="The CA directory `homefleet certs ca` made.")
]
DaysOption = Annotated[
    int | None,
    typer.Option(
        "--days",
        min=1,
        help="Validity in days (default: CA 3650, controller and device 397, "
        "admin 90; never past the CA's own).",
    ),
]
ADMIN_DAYS = 90
ReplaceOption = Annotated[
    bool,
    typer.Option("--replace", help="Replace a certificate and key already in the directory."),
]


def _usage_error(exc: TlsError) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(int(ExitCode.USAGE))


def _report(issued: Issued, what: str) -> None:
    typer.echo(
        f"{what} {issued.name!r} ({issued.role.value}) in {issued.directory}, valid until "
        f"{issued.not_after:%Y-%m-%d} (serial {issued.serial:x})"
    )


def _issue(
    ca_dir: Path,
    out_dir: Path,
    name: str,
    role: Role,
    *,
    hosts: tuple[str, ...] = (),
    device_class: str | None = None,
    days: int | None,
    replace: bool,
) -> None:
    from controller.certs import LEAF_DAYS, CertificateAuthority  # cryptography's x509: lazily

    try:
        issued = CertificateAuthority.load(ca_dir).issue(
            out_dir,
            name,
            role,
            hosts=hosts,
            device_class=device_class,
            days=days or LEAF_DAYS,
            replace=replace,
        )
    except TlsError as exc:
        raise _usage_error(exc) from None
    _report(issued, "issued")


@app.command("ca")
def ca(
    directory: Annotated[Path, typer.Argument(help="Where to write ca.pem and ca.key.")],
    name: Annotated[str, typer.Option("--name", help="The CA's common name.")] = "HomeFleet CA",
    days: DaysOption = None,
) -> None:
    """Create the CA (refuses to replace one: every certificate it signed would stop working)."""
    from controller.certs import CA_DAYS, create_ca

    try:
        issued = create_ca(directory, name=name, days=days or CA_DAYS)
    except TlsError as exc:
        raise _usage_error(exc) from None
    typer.echo(
        f"created CA {issued.name!r} in {issued.directory}, valid until "
        f"{issued.not_after:%Y-%m-%d} (serial {issued.serial:x}); keep its key offline"
    )


@app.command("controller")
def controller(
    out_dir: Annotated[Path, typer.Argument(help="The controller's TLS directory to write.")],
    ca_dir: CaOption,
    hosts: Annotated[
        list[str],
        typer.Option(
            "--host", help="A DNS name or IP address agents and operators dial (repeatable)."
        ),
    ],
    days: DaysOption = None,
    replace: ReplaceOption = False,
) -> None:
    """A server certificate for `homefleet controller serve --tls OUT_DIR`."""
    _issue(
        ca_dir,
        out_dir,
        "homefleet-controller",
        Role.CONTROLLER,
        hosts=tuple(hosts),
        days=days,
        replace=replace,
    )


@app.command("device")
def device(
    device_id: Annotated[str, typer.Argument(help="The device id the agent runs as.")],
    out_dir: Annotated[Path, typer.Argument(help="The device's TLS directory to write.")],
    ca_dir: CaOption,
    device_class: Annotated[
        str, typer.Option("--class", help="The device class it may register in (home-hub).")
    ],
    days: DaysOption = None,
    replace: ReplaceOption = False,
) -> None:
    """A client certificate for one device: it may act as that device id, in that class."""
    _issue(
        ca_dir,
        out_dir,
        device_id,
        Role.DEVICE,
        device_class=device_class,
        days=days,
        replace=replace,
    )


@app.command("admin")
def admin(
    name: Annotated[str, typer.Argument(help="Who holds it (shown in the controller's log).")],
    out_dir: Annotated[Path, typer.Argument(help="The operator's TLS directory to write.")],
    ca_dir: CaOption,
    days: DaysOption = None,
    replace: ReplaceOption = False,
) -> None:
    """A client certificate for the operator commands (set HOMEFLEET_TLS=OUT_DIR)."""
    _issue(ca_dir, out_dir, name, Role.ADMIN, days=days or ADMIN_DAYS, replace=replace)


def _serial_of(target: str) -> int:
    """A TLS directory's certificate serial, or a hexadecimal serial as printed by `issued`."""
    path = Path(target).expanduser()
    if path.is_dir():
        return TlsBundle.load(path).identity.serial
    try:
        return int(target, 16)
    except ValueError:
        raise TlsError(
            f"{target!r} is neither a TLS directory nor a hexadecimal certificate serial "
            "(as `homefleet certs show` prints it)"
        ) from None


@app.command("revoke")
def revoke(
    target: Annotated[
        str, typer.Argument(help="The TLS directory of the certificate, or its serial (hex).")
    ],
    ca_dir: CaOption,
    crl: Annotated[
        Path | None,
        typer.Option("--crl", help="The revocation list to update (default: CA_DIR/crl.pem)."),
    ] = None,
) -> None:
    """Revoke a certificate (a lost or stolen device): the controller refuses it once the
    list is in its TLS directory as crl.pem (read again within seconds, no restart)."""
    from controller.certs import CertificateAuthority
    from controller.revocation import load_crl

    path = crl or Path(ca_dir).expanduser() / CRL_FILE
    master = Path(ca_dir).expanduser() / CRL_FILE
    try:
        serial = _serial_of(target)
        ca = CertificateAuthority.load(ca_dir)
        already = any(
            serial in load_crl(p.read_bytes(), ca.cert, p).serials
            for p in {path, master}
            if p.is_file()
        )
        revoked = ca.revoke(serial, path)
    except TlsError as exc:
        raise _usage_error(exc) from None
    also = "" if path.resolve() == master.resolve() else f" (and the CA's own {master})"
    copy = (
        ""
        if path.name == CRL_FILE and path.resolve() != master.resolve()
        else f": copy it to the controller's TLS directory as {CRL_FILE}"
    )
    said = (
        f"serial {serial:x} was already revoked (the list is signed again, valid for longer)"
        if already
        else f"revoked serial {serial:x}"
    )
    typer.echo(f"{said}; {path}{also} lists {len(revoked)} certificate(s){copy}")


def _hosts(cert_pem: bytes) -> list[str]:
    """The DNS names and IP addresses a certificate is valid for (clients dial these)."""
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [
        *names.get_values_for_type(x509.DNSName),
        *(str(ip) for ip in names.get_values_for_type(x509.IPAddress)),
    ]


@app.command("show")
def show(
    directory: Annotated[Path, typer.Argument(help="A TLS directory (ca.pem, cert.pem, key.pem).")],
) -> None:
    """Check a TLS directory and say whose certificate it holds and until when."""
    try:
        bundle = TlsBundle.load(directory)
    except TlsError as exc:
        raise _usage_error(exc) from None
    table = Table(show_header=False, box=None)
    table.add_row("directory", str(bundle.directory))
    table.add_row("name", bundle.identity.name)
    table.add_row("role", bundle.identity.role.value)
    if bundle.identity.device_class is not None:
        table.add_row("device class", bundle.identity.device_class)
    hosts = _hosts(bundle.cert_pem)
    if hosts:  # a controller's: the names clients may dial
        table.add_row("hosts", ", ".join(hosts))
    table.add_row("serial", f"{bundle.identity.serial:x}")
    table.add_row("valid until", f"{bundle.not_after:%Y-%m-%d %H:%M} UTC")
    Console().print(table)
