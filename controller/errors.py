"""The controller's one error type, its one mapping to gRPC status, and the wrapper every RPC uses.

Handlers raise FleetError with a code and a message that says what was wrong and what is
accepted; the wrapper turns it into that status. Anything else is a bug: it is logged in
full and the client sees INTERNAL without the detail.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import grpc

if TYPE_CHECKING:
    from controller.limits import RpcLimits

log = logging.getLogger(__name__)


class ErrorCode(enum.Enum):
    INVALID_ARGUMENT = "invalid_argument"
    NOT_FOUND = "not_found"
    ALREADY_EXISTS = "already_exists"
    FAILED_PRECONDITION = "failed_precondition"
    OUT_OF_RANGE = "out_of_range"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    DEADLINE_EXCEEDED = "deadline_exceeded"  # the client stopped sending or reading
    CANCELLED = "cancelled"  # the controller ended the stream (a newer one replaced it)
    PERMISSION_DENIED = "permission_denied"
    UNAVAILABLE = "unavailable"
    DATA_LOSS = "data_loss"  # stored bytes the controller should have are gone
    INTERNAL = "internal"


GRPC_STATUS: dict[ErrorCode, grpc.StatusCode] = {
    ErrorCode.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorCode.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    ErrorCode.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorCode.OUT_OF_RANGE: grpc.StatusCode.OUT_OF_RANGE,
    ErrorCode.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorCode.CANCELLED: grpc.StatusCode.CANCELLED,
    ErrorCode.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    ErrorCode.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.DATA_LOSS: grpc.StatusCode.DATA_LOSS,
    ErrorCode.INTERNAL: grpc.StatusCode.INTERNAL,
}

INTERNAL_MESSAGE = "internal controller error; the controller log has the detail"


class FleetError(Exception):
    """An expected failure: bad input, a missing object, a conflict. Carries its code."""

    def __init__(self, code: ErrorCode, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason  # a short fixed word for counting refusals of a kind ("clock")


def invalid(message: str, reason: str = "") -> FleetError:
    return FleetError(ErrorCode.INVALID_ARGUMENT, message, reason)


def not_found(message: str) -> FleetError:
    return FleetError(ErrorCode.NOT_FOUND, message)


def grpc_status(error: FleetError) -> grpc.StatusCode:
    return GRPC_STATUS[error.code]


class GuardedServicer(Protocol):
    """A servicer whose RPCs share one set of concurrency limits and one access check."""

    @property
    def limits(self) -> RpcLimits: ...

    def authorize(self, request: object, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """Raise FleetError (PERMISSION_DENIED) when the caller may not make this call."""


S = TypeVar("S", bound=GuardedServicer)
Req = TypeVar("Req")
Resp = TypeVar("Resp")
Method = Callable[[S, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]]


@contextlib.asynccontextmanager
async def _status_on_error(
    name: str, context: grpc.aio.ServicerContext[Req, Resp]
) -> AsyncIterator[None]:
    try:
        yield
    except FleetError as exc:
        # DATA_LOSS is the controller's own fault (bytes missing from its blob store):
        # an operator must hear of it; every other refusal is the caller's to fix.
        level = logging.ERROR if exc.code is ErrorCode.DATA_LOSS else logging.INFO
        log.log(level, "%s refused: %s %s", name, exc.code.name, exc.message)
        await context.abort(grpc_status(exc), exc.message)
    except grpc.aio.AbortError:
        raise
    except Exception:
        log.exception("%s failed unexpectedly", name)
        await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)


class _Slot(enum.Enum):
    SHORT = "short"
    WATCH = "watch"
    NONE = "none"


def _guard(method: Method[S, Req, Resp], slot: _Slot) -> Method[S, Req, Resp]:
    name = method.__name__

    @functools.wraps(method)
    async def wrapper(self: S, request: Req, context: grpc.aio.ServicerContext[Req, Resp]) -> Resp:
        async with _status_on_error(name, context):
            self.authorize(request, context)
            if slot is _Slot.NONE:
                return await method(self, request, context)
            held = self.limits.watch_slot() if slot is _Slot.WATCH else self.limits.slot()
            async with held:
                return await method(self, request, context)
        raise AssertionError("unreachable: context.abort raises")  # pragma: no cover

    return wrapper


def rpc(method: Method[S, Req, Resp]) -> Method[S, Req, Resp]:
    """For every unary and short server-streaming RPC (writes via context); client-streamed
    uploads use ``unqueued_rpc`` and an upload slot, since they last as long as their client."""
    return _guard(method, _Slot.SHORT)


def long_lived_rpc(method: Method[S, Req, Resp]) -> Method[S, Req, Resp]:
    """For a server stream that lives as long as its client (WatchAssignments).

    It writes through ``context.write`` and returns None; it takes a watch slot, not a
    short-call slot, so open streams never starve short calls.
    """
    return _guard(method, _Slot.WATCH)


def unqueued_rpc(method: Method[S, Req, Resp]) -> Method[S, Req, Resp]:
    """For an RPC that must not wait behind short calls, and takes no slot from them.

    FetchArtifact: its handler holds a download slot of its own (a download lasts as
    long as its client reads). AddModel and StartCompression: their handlers hold an
    upload slot of their own (an upload lasts as long as its client sends). Health Check:
    answered from memory at once, so a load balancer probing a busy controller still gets
    its answer.
    """
    return _guard(method, _Slot.NONE)
