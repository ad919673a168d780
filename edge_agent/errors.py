"""The agent's one error type, its codes, and how each code maps to a gRPC status.

Deployment failures carry their reason to the controller (StatusReport.reason); local
API failures carry it to the home application (the status details). Either way the
message says what was wrong and what is accepted.
"""

from __future__ import annotations

import enum
import errno
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeVar

import grpc
import grpc.aio

log = logging.getLogger(__name__)

T = TypeVar("T")


class ErrorCode(enum.Enum):
    # local inference API
    INVALID_INPUT = "invalid_input"
    MODEL_NOT_FOUND = "model_not_found"
    UNSUPPORTED = "unsupported"
    # configuration and local state
    INVALID_CONFIG = "invalid_config"
    STATE_CORRUPT = "state_corrupt"
    STATE_LOCKED = "state_locked"
    LISTEN_FAILED = "listen_failed"  # address in use: may pass, so exit 1 (retry), not 2
    # deployment of an assigned artifact
    INVALID_ASSIGNMENT = "invalid_assignment"
    UNTRUSTED_MANIFEST = "untrusted_manifest"
    MANIFEST_MISMATCH = "manifest_mismatch"
    FETCH_FAILED = "fetch_failed"
    NOT_ASSIGNED = "not_assigned"  # the controller no longer assigns it: superseded, not failed
    HASH_MISMATCH = "hash_mismatch"
    LOAD_FAILED = "load_failed"
    SELF_TEST_FAILED = "self_test_failed"
    STORAGE_FAILED = "storage_failed"  # the state directory refused a read or write (errno)


STATUS_OF: dict[ErrorCode, grpc.StatusCode] = {
    ErrorCode.INVALID_INPUT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.MODEL_NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorCode.UNSUPPORTED: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorCode.INVALID_CONFIG: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.STATE_CORRUPT: grpc.StatusCode.DATA_LOSS,
    ErrorCode.STATE_LOCKED: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorCode.LISTEN_FAILED: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.INVALID_ASSIGNMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.UNTRUSTED_MANIFEST: grpc.StatusCode.PERMISSION_DENIED,
    ErrorCode.MANIFEST_MISMATCH: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorCode.FETCH_FAILED: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.NOT_ASSIGNED: grpc.StatusCode.NOT_FOUND,
    ErrorCode.HASH_MISMATCH: grpc.StatusCode.DATA_LOSS,
    ErrorCode.LOAD_FAILED: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorCode.SELF_TEST_FAILED: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorCode.STORAGE_FAILED: grpc.StatusCode.UNAVAILABLE,
}

# Deployment failures that trying the same manifest again would only repeat: the agent
# retries them only when the controller sends another manifest (or after a reconnect).
# Every other failure (a fetch the controller refused, bytes that did not hash, a load,
# the state directory) may pass by itself, and is retried with a backoff.
SETTLED: frozenset[ErrorCode] = frozenset(
    {
        ErrorCode.INVALID_ASSIGNMENT,
        ErrorCode.UNTRUSTED_MANIFEST,  # unsigned, tampered, expired, older, reused version
        ErrorCode.MANIFEST_MISMATCH,
        ErrorCode.SELF_TEST_FAILED,  # verified bytes, a fixed synthetic input: same result
    }
)


def describe_os_error(exc: OSError) -> str:
    """``path: Read-only file system (EROFS)``: the path and the errno, no traceback."""
    name = errno.errorcode.get(exc.errno, str(exc.errno)) if exc.errno else "no errno"
    where = f"{exc.filename}: " if exc.filename is not None else ""
    return f"{where}{exc.strerror or exc} ({name})"


class AgentError(Exception):
    """An expected failure: its message is safe to show and says what to change."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def status(self) -> grpc.StatusCode:
        return STATUS_OF[self.code]


REFUSAL_LOG_WINDOW_S = 60.0


@dataclass
class RefusalLog:
    """Logs a refused call once per RPC and status a minute, then how many followed.

    A local client retrying a bad request in a loop would otherwise write a line per
    call into the device's journal (QA: thousands a minute). The caller is told why on
    every call; the log keeps the first reason and a count.
    """

    window_s: float = REFUSAL_LOG_WINDOW_S
    clock: Callable[[], float] = time.monotonic
    _logged_at: dict[tuple[str, str], float] = field(default_factory=dict)
    _unlogged: dict[tuple[str, str], int] = field(default_factory=dict)

    def refused(self, rpc: str, status: grpc.StatusCode, message: str) -> None:
        key = (rpc, status.name)
        now = self.clock()
        last = self._logged_at.get(key)
        if last is not None and now - last < self.window_s:
            self._unlogged[key] = self._unlogged.get(key, 0) + 1
            return
        more = self._unlogged.pop(key, 0)
        since = f"; {more} more {rpc} refusals ({status.name}) since the last line" if more else ""
        log.info("%s refused: %s (%s)%s", rpc, message, status.name, since)
        self._logged_at[key] = now


async def guarded(
    context: grpc.aio.ServicerContext[Any, Any],
    rpc: str,
    call: Awaitable[T],
    refusals: RefusalLog | None = None,
) -> T:
    """Run one RPC handler; expected errors become their status, anything else INTERNAL."""
    try:
        return await call
    except AgentError as exc:
        message = _fits_a_status(exc.message)
        if refusals is None:
            log.info("%s refused: %s (%s)", rpc, message, exc.status.name)
        else:
            refusals.refused(rpc, exc.status, message)
        await _abort(context, exc.status, message)
    except Exception:
        log.exception("%s failed unexpectedly", rpc)
        await _abort(
            context, grpc.StatusCode.INTERNAL, f"{rpc} failed inside the agent; see its log"
        )


# gRPC sends a status message in the trailers, which clients cap at 8 KiB: longer ones
# (a refused shape of thousands of dimensions, quoted back) would arrive as
# RESOURCE_EXHAUSTED "received metadata size exceeds soft limit" instead of the reason.
MAX_STATUS_TEXT = 2000


def _fits_a_status(message: str) -> str:
    if len(message) <= MAX_STATUS_TEXT:
        return message
    return message[: MAX_STATUS_TEXT - 25] + "... (message shortened)"


async def _abort(
    context: grpc.aio.ServicerContext[Any, Any], code: grpc.StatusCode, message: str
) -> NoReturn:
    await context.abort(code, message)
