"""What a failed call means for the person at the terminal, and the exit code scripts see.

The one place that turns a gRPC status into a message someone can act on. It branches
on status codes only, never on the server's wording: the server's message is shown as
it is when it describes a refused request.

Exit codes (also in `homefleet --help`):
  0  ok
  1  the controller refused or failed the request (its message is printed)
  2  usage error: bad arguments, or a local file that cannot be read
  3  this command group needs an extra that is not installed here
  4  the controller cannot be reached, or did not answer before the deadline
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import IntEnum

import grpc
import typer


class ExitCode(IntEnum):
    OK = 0
    REFUSED = 1
    USAGE = 2
    MISSING_EXTRA = 3
    UNREACHABLE = 4
    BUDGET_NOT_MET = 5  # compression ran, but no recipe met every budget (best one kept)


@dataclass(frozen=True)
class _Explanation:
    exit_code: ExitCode
    template: str  # fields: address, timeout, code, details


_UNREACHABLE = _Explanation(
    ExitCode.UNREACHABLE,
    "cannot reach the controller at {address}: is `homefleet controller serve` running? "
    "set --controller or HOMEFLEET_CONTROLLER; if it serves mutual TLS (--tls), set "
    "HOMEFLEET_TLS to an admin certificate's directory\n  (gRPC said: {details})",
)
_WRONG_HOST = _Explanation(
    ExitCode.UNREACHABLE,
    "the controller at {address} answered with a certificate that does not name that "
    "host: dial one of the names it was issued for (`homefleet certs show` of the "
    "controller's TLS directory lists them), or issue it again with `homefleet certs "
    "controller ... --host HOST --replace` and restart the controller\n  (gRPC said: {details})",
)
_REFUSED = _Explanation(ExitCode.REFUSED, "{details}")

_EXPLANATIONS: Mapping[grpc.StatusCode, _Explanation] = {
    grpc.StatusCode.UNAVAILABLE: _UNREACHABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: _Explanation(
        ExitCode.UNREACHABLE,
        "the controller at {address} did not answer within {timeout:g} s: it may be "
        "overloaded, waiting on its database (another process holding a lock on it), or "
        "behind a slow link. Retry with a larger --timeout",
    ),
    grpc.StatusCode.INVALID_ARGUMENT: _REFUSED,
    grpc.StatusCode.NOT_FOUND: _REFUSED,
    grpc.StatusCode.ALREADY_EXISTS: _REFUSED,
    grpc.StatusCode.FAILED_PRECONDITION: _REFUSED,
    grpc.StatusCode.RESOURCE_EXHAUSTED: _REFUSED,
    grpc.StatusCode.OUT_OF_RANGE: _REFUSED,
    grpc.StatusCode.ABORTED: _Explanation(
        ExitCode.REFUSED, "{details} (the request conflicted with another change: retry it)"
    ),
    grpc.StatusCode.PERMISSION_DENIED: _Explanation(
        ExitCode.REFUSED, "the controller at {address} refused this operator: {details}"
    ),
    grpc.StatusCode.UNAUTHENTICATED: _Explanation(
        ExitCode.REFUSED, "the controller at {address} needs valid credentials: {details}"
    ),
    grpc.StatusCode.UNIMPLEMENTED: _Explanation(
        ExitCode.REFUSED,
        "the controller at {address} does not offer this call: "
        "do the CLI and the controller run the same HomeFleet version?",
    ),
}
_FAILED = _Explanation(
    ExitCode.REFUSED,
    "the controller at {address} failed ({code}): {details}; its log has the detail",
)
_FAILED_SAID_SO = _Explanation(
    ExitCode.REFUSED, "the controller at {address} failed ({code}): {details}"
)


@dataclass(frozen=True)
class Failure:
    """A failed call, explained: what to print and which exit code to end with."""

    exit_code: ExitCode
    message: str


def explain(error: grpc.RpcError, *, address: str, timeout_s: float) -> Failure:
    """Turn a failed call into a message a person can act on, chosen by status code."""
    if isinstance(error, grpc.Call):
        code, details = error.code(), error.details() or ""
    else:  # not raised by a finished call: nothing to branch on
        code, details = grpc.StatusCode.UNKNOWN, str(error)
    explanation = _EXPLANATIONS.get(code, _FAILED)
    if code == grpc.StatusCode.UNAVAILABLE and "Hostname Verification" in details:
        explanation = _WRONG_HOST  # TLS is set up; the name dialed is not in the certificate
    if explanation is _FAILED and "log has the detail" in details:
        explanation = _FAILED_SAID_SO  # the controller's own text already points at its log
    message = explanation.template.format(
        address=address,
        timeout=timeout_s,
        code=code.name,
        details=details or f"the controller said {code.name} without a message",
    )
    return Failure(explanation.exit_code, message)


def fail(failure: Failure) -> typer.Exit:
    """Print ``failure`` to stderr and return the exit to raise."""
    typer.echo(f"error: {failure.message}", err=True)
    return typer.Exit(int(failure.exit_code))


@contextlib.contextmanager
def rpc_errors(*, address: str, timeout_s: float) -> Iterator[None]:
    """Apply `explain` to every gRPC error raised inside, and exit with its code."""
    try:
        yield
    except grpc.RpcError as error:
        raise fail(explain(error, address=address, timeout_s=timeout_s)) from None
