"""The controller's HTTP port: Prometheus ``/metrics``, the dashboard page and its JSON API.

One small threaded ``http.server`` serves everything, so a Prometheus scrape and a person
opening the page use the same address (``metrics_address`` in controller.json). Routes:

- ``/metrics``: the telemetry collector (``controller.telemetry_metrics``), in the text
  or OpenMetrics format the scraper asks for.
- ``/``: the page (``static/index.html`` with its script and style): vanilla JS drawing
  SVG charts from the API — nothing from a CDN, so it works offline.
- ``/api/fleet``, ``/api/classes``, ``/api/series``, ``/api/decisions``: JSON views
  (``controller.dashboard.api``); a bad query parameter gets 400 with what is accepted.

Only GET (and HEAD) is served; the page's Content-Security-Policy allows scripts, styles
and requests from this origin only.
"""

from __future__ import annotations

import json
import logging
import socket
import socketserver
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from types import MappingProxyType
from typing import Any
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from pydantic import BaseModel

from controller.clock import unix_ms
from controller.dashboard import api
from controller.device_classes import DeviceClass
from controller.store import Store
from controller.telemetry_metrics import BudgetCollector, DownloadCollector, TelemetryCollector

log = logging.getLogger(__name__)

MAX_QUERY_FIELDS = 16
REQUEST_TIMEOUT_S = 30.0
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
# URL path -> (file in controller/dashboard/static, content type)
STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
    "/favicon.svg": ("favicon.svg", "image/svg+xml"),
}


@dataclass(frozen=True)
class Response:
    status: HTTPStatus
    body: bytes
    content_type: str
    headers: tuple[tuple[str, str], ...] = ()


@dataclass
class DashboardApp:
    """Routes a request to a view; knows nothing of sockets (tests may call it directly)."""

    store: Store
    classes: Mapping[str, DeviceClass] = field(default_factory=lambda: MappingProxyType({}))
    clock: Callable[[], int] = unix_ms
    registry: CollectorRegistry = field(init=False)
    _static: dict[str, bytes] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(TelemetryCollector(self.store, self.clock))
        self.registry.register(DownloadCollector(self.store))
        self.registry.register(BudgetCollector(self.classes))
        folder = resources.files("controller.dashboard") / "static"
        self._static = {name: (folder / name).read_bytes() for name, _ in STATIC.values()}

    def handle(self, target: str, accept: str) -> Response:
        parts = urlsplit(target)
        try:
            query = parse_qs(parts.query, keep_blank_values=True, max_num_fields=MAX_QUERY_FIELDS)
        except ValueError:
            return _error(HTTPStatus.BAD_REQUEST, f"at most {MAX_QUERY_FIELDS} query parameters")
        path = parts.path
        try:
            if path == "/metrics":
                encoder, content_type = choose_encoder(accept)
                return Response(HTTPStatus.OK, encoder(self.registry), content_type)
            if path in STATIC:
                name, content_type = STATIC[path]
                api.only_parameters(query, set())
                return Response(
                    HTTPStatus.OK,
                    self._static[name],
                    content_type,
                    (("Content-Security-Policy", CSP), ("Cache-Control", "no-cache")),
                )
            view = self._api_view(path, query)
            if view is None:
                routes = ", ".join(["/metrics", *STATIC, *API_ROUTES])
                return _error(HTTPStatus.NOT_FOUND, f"no page at {path[:100]!r}; try {routes}")
            return _json(HTTPStatus.OK, view())
        except api.BadRequest as exc:
            return _error(HTTPStatus.BAD_REQUEST, str(exc))
        except Exception:
            log.exception("dashboard request %s failed", path[:200])
            return _error(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error; see controller log")

    def _api_view(self, path: str, query: api.Query) -> Callable[[], BaseModel] | None:
        if path == "/api/fleet":
            fleet_query = api.parse_fleet_query(query)
            return lambda: api.fleet(self.store, fleet_query)
        if path == "/api/classes":
            api.only_parameters(query, set())
            return lambda: api.classes(self.store, self.classes)
        if path == "/api/series":
            series_query = api.parse_series_query(query, self.clock())
            return lambda: api.series(self.store, series_query)
        if path == "/api/decisions":
            limit = api.parse_decisions_query(query)
            return lambda: api.decisions(self.store, limit)
        return None


API_ROUTES = ("/api/fleet", "/api/classes", "/api/series", "/api/decisions")


def _json(status: HTTPStatus, model: BaseModel) -> Response:
    return Response(status, model.model_dump_json().encode(), "application/json")


def _error(status: HTTPStatus, message: str) -> Response:
    body = json.dumps({"error": message}).encode()
    return Response(status, body, "application/json")


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = REQUEST_TIMEOUT_S

    def version_string(self) -> str:
        return "homefleet-controller"

    def do_GET(self) -> None:
        self._respond(head=False)

    def do_HEAD(self) -> None:
        self._respond(head=True)

    def _respond(self, *, head: bool) -> None:
        response = self.server.app.handle(self.path, self.headers.get("Accept", ""))
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        for name, value in response.headers:
            self.send_header(name, value)
        self.end_headers()
        if not head:
            self.wfile.write(response.body)

    def _refuse(self) -> None:
        body = json.dumps({"error": "only GET is served"}).encode()
        self.send_response(HTTPStatus.METHOD_NOT_ALLOWED)
        self.send_header("Allow", "GET, HEAD")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a slow client never holds up the controller's stop

    def __init__(self, address: tuple[str, int], app: DashboardApp) -> None:
        self.app = app
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks up the host's FQDN, which can stall on DNS.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)


class _Server6(_Server):
    address_family = socket.AF_INET6


@dataclass
class DashboardServer:
    """The HTTP port in a thread of its own."""

    server: _Server
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def serve_dashboard(
    store: Store,
    host: str,
    port: int,
    classes: Mapping[str, DeviceClass] | None = None,
) -> DashboardServer:
    """Serve /metrics, the page and the API on ``host:port`` (0: any free port); OSError
    if it cannot bind. ``classes`` gives the budgets drawn on the charts."""
    app = DashboardApp(store, MappingProxyType(dict(classes or {})))
    bare = host.strip("[]")
    server_type = _Server6 if ":" in bare else _Server
    server = server_type((bare, port), app)
    thread = threading.Thread(target=server.serve_forever, name="controller-http", daemon=True)
    thread.start()
    return DashboardServer(server, thread)
