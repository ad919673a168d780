"""gRPC health checking under the same rules as every other call.

grpc-health-checking's servicer answers anyone who completes the handshake and keeps a
``Watch`` stream open for as long as the client likes, for any service name it is sent.
Here, under mutual TLS, a revoked certificate is refused like on AgentService and
AdminService (any role the CA issued may ask: a load balancer's probe holds whichever
certificate it was given); only the services this controller serves may be asked about
(a name is not kept per stream unless it is one of them); every ``Watch`` stream takes one
of the controller's watch slots and one of its client's few, so health streams cannot grow
without bound beside the agents' assignment streams; and ``Check`` takes no slot at all,
so a probe gets its answer however busy the short calls are.
"""

from __future__ import annotations

from typing import Any

import grpc
from grpc_health.v1 import health_pb2

# The aio health servicer (grpc_health.v1.health.aio) is missing from the type stubs.
from grpc_health.v1._async import HealthServicer as AioHealthServicer

from controller.access import Access
from controller.errors import invalid, long_lived_rpc, not_found, unqueued_rpc
from controller.limits import RpcLimits, peer_key
from protos import fleet_pb2

Context = grpc.aio.ServicerContext[Any, Any]

MAX_SERVICE_NAME = 200
# "" is the server as a whole; then every service it serves a status for.
SERVICES = (
    "",
    *(
        fleet_pb2.DESCRIPTOR.services_by_name[name].full_name
        for name in ("AgentService", "AdminService")
    ),
)


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

    def _check_service(self, service: str) -> None:
        if len(service) > MAX_SERVICE_NAME:
            raise invalid(
                f"service is {len(service)} characters long; a service name has at most "
                f"{MAX_SERVICE_NAME}: ask for one of {', '.join(map(repr, SERVICES))}"
            )
        if service not in SERVICES and service not in self._server_status:
            raise not_found(
                f"this controller serves no service {service!r}: ask for one of "
                f"{', '.join(map(repr, SERVICES))} ('' is the server as a whole)"
            )

    @unqueued_rpc
    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: Context
    ) -> health_pb2.HealthCheckResponse:
        self._check_service(request.service)
        response: health_pb2.HealthCheckResponse = await super().Check(request, context)
        return response

    @long_lived_rpc
    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Context) -> None:
        self._check_service(request.service)
        with self._limits.health_watch_slot(peer_key(context, self._access)):
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
