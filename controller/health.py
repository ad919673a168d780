"""gRPC health checking under the same rules as every other call.

grpc-health-checking's servicer answers anyone who completes the handshake and keeps a
``Watch`` stream open for as long as the client likes. Here, under mutual TLS, a revoked
certificate is refused like on AgentService and AdminService (any role the CA issued may
ask: a load balancer's probe holds whichever certificate it was given), and every
``Watch`` stream takes one of the controller's watch slots, so health streams cannot
grow without bound beside the agents' assignment streams.
"""

from __future__ import annotations

from typing import Any

import grpc
from grpc_health.v1 import health_pb2

# The aio health servicer (grpc_health.v1.health.aio) is missing from the type stubs.
from grpc_health.v1._async import HealthServicer as AioHealthServicer

from controller.access import Access
from controller.errors import long_lived_rpc, rpc
from controller.limits import RpcLimits

Context = grpc.aio.ServicerContext[Any, Any]


class GuardedHealthServicer(AioHealthServicer):  # type: ignore[misc]
    """The library's health servicer, behind the access check and the RPC limits."""

    def __init__(self, limits: RpcLimits, access: Access) -> None:
        super().__init__()
        self._limits = limits
        self._access = access

    @property
    def limits(self) -> RpcLimits:
        return self._limits

    def authorize(self, request: object, context: Context) -> None:
        self._access.check_peer(context)

    @rpc
    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: Context
    ) -> health_pb2.HealthCheckResponse:
        response: health_pb2.HealthCheckResponse = await super().Check(request, context)
        return response

    @long_lived_rpc
    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Context) -> None:
        await super().Watch(request, _CheckedWrites(context, self._access))


class _CheckedWrites:
    """The call's context, checking the certificate again before every stream write, as
    the assignment watch does: a certificate revoked mid-stream gets PERMISSION_DENIED at
    the next status change instead of hearing about it."""

    def __init__(self, context: Context, access: Access) -> None:
        self._context = context
        self._access = access

    async def write(self, message: health_pb2.HealthCheckResponse) -> None:
        self._access.check_peer(self._context)
        await self._context.write(message)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)
