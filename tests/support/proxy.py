"""A loopback TCP proxy that puts real network faults between a client and a real server.

It stands in for a home uplink, never for one of our components: every byte a client
receives was sent by the real server behind it. What it can do, switchable at runtime
from any thread:

- pass everything through (the default);
- cut a connection once it has carried N bytes downstream (server to client), once or on
  every connection, or cut every open connection now: a link that breaks mid-download;
- black-hole: stop forwarding in both directions on every connection, new ones included,
  while keeping them open; bytes are held, not dropped, so ``pass_through`` later is a
  partition that heals. ``black_hole_after`` turns it on when a connection has carried N
  bytes downstream (a controller that stops answering in the middle of a stream).

It also taps what clients send: the client-to-server HTTP/2 DATA frames are split into
gRPC messages (5-byte length prefix), so a test can check what a client actually asked
for without any hook in the client. Headers are not decoded; decode the messages with
the request type you expect (``requests``).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from google.protobuf.message import DecodeError, Message

M = TypeVar("M", bound=Message)
T = TypeVar("T")

HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME_HEADER_BYTES = 9
DATA_FRAME = 0x0
PADDED_FLAG = 0x8
GRPC_PREFIX_BYTES = 5
READ_BYTES = 64 * 1024
CONTROL_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class TappedMessage:
    """One gRPC message a client sent: its TCP connection (0, 1, ...) and HTTP/2 stream."""

    connection: int
    stream_id: int
    data: bytes


class Http2Tap:
    """Splits a client's HTTP/2 byte stream into the gRPC messages it carries."""

    def __init__(self, connection: int, sink: Callable[[TappedMessage], None]) -> None:
        self._connection = connection
        self._sink = sink
        self._buffer = bytearray()
        self._preface_seen = False
        self._broken = False
        self._streams: dict[int, bytearray] = {}

    def feed(self, data: bytes) -> None:
        if self._broken:
            return
        self._buffer += data
        if not self._preface_seen:
            if len(self._buffer) < len(HTTP2_PREFACE):
                return
            if bytes(self._buffer[: len(HTTP2_PREFACE)]) != HTTP2_PREFACE:
                self._broken = True  # not HTTP/2 (or prior knowledge): nothing to tap
                return
            del self._buffer[: len(HTTP2_PREFACE)]
            self._preface_seen = True
        while len(self._buffer) >= FRAME_HEADER_BYTES:
            length = int.from_bytes(self._buffer[0:3], "big")
            if len(self._buffer) < FRAME_HEADER_BYTES + length:
                return
            kind, flags = self._buffer[3], self._buffer[4]
            stream_id = int.from_bytes(self._buffer[5:9], "big") & 0x7FFFFFFF
            payload = bytes(self._buffer[FRAME_HEADER_BYTES : FRAME_HEADER_BYTES + length])
            del self._buffer[: FRAME_HEADER_BYTES + length]
            if kind == DATA_FRAME:
                if flags & PADDED_FLAG and payload:
                    payload = payload[1 : len(payload) - payload[0]]
                self._data(stream_id, payload)

    def _data(self, stream_id: int, payload: bytes) -> None:
        pending = self._streams.setdefault(stream_id, bytearray())
        pending += payload
        while len(pending) >= GRPC_PREFIX_BYTES:
            size = int.from_bytes(pending[1:5], "big")
            end = GRPC_PREFIX_BYTES + size
            if len(pending) < end:
                return
            self._sink(TappedMessage(self._connection, stream_id, bytes(pending[5:end])))
            del pending[:end]


@dataclass(frozen=True)
class _Fault:
    """An armed fault: what happens once a connection has carried ``after_bytes`` downstream."""

    kind: Literal["cut", "black-hole"]
    after_bytes: int
    every_connection: bool = False


class _Connection:
    def __init__(self, index: int, tap: Http2Tap) -> None:
        self.index = index
        self.tap = tap
        self.downstream = 0
        self.writers: list[asyncio.StreamWriter] = []

    def abort(self) -> None:
        for writer in self.writers:
            writer.transport.abort()


class FaultProxy:
    """Listens on 127.0.0.1:<free port> and forwards to ``upstream_port``, injecting faults.

    Runs its own event loop in a thread, so sync and async tests use it alike; the
    methods that change its behaviour take effect before they return.
    """

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.port = 0
        self.cuts = 0  # connections cut so far
        self.connections = 0  # connections accepted so far
        self._faults: list[_Fault] = []
        self._flowing = asyncio.Event()  # cleared: black-holed
        self._flowing.set()
        self._open: dict[int, _Connection] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._messages: list[TappedMessage] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # -- lifecycle ----------------------------------------------------------------------

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        self._call(self._start())
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(CONTROL_TIMEOUT_S)
        if not self._thread.is_alive():
            self._loop.close()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(CONTROL_TIMEOUT_S)

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        sock: socket.socket = self._server.sockets[0]
        self.port = sock.getsockname()[1]

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for connection in list(self._open.values()):
            connection.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- faults (thread-safe; each takes effect before it returns) -------------------

    def pass_through(self) -> None:
        """Forward everything again: held bytes flow on, armed faults are disarmed."""
        self._call(self._set(flowing=True, faults=[]))

    def black_hole(self) -> None:
        """Stop forwarding on every connection, open or new, without closing any."""
        self._call(self._set(flowing=False, faults=self._faults))

    def black_hole_after(self, downstream_bytes: int) -> None:
        """Black-hole everything once a connection has carried this many bytes downstream."""
        fault = _Fault("black-hole", downstream_bytes)
        self._call(self._set(flowing=True, faults=[*self._faults, fault]))

    def cut_after(self, downstream_bytes: int, *, every_connection: bool = False) -> None:
        """Drop the next connection (or every one) after this many bytes downstream."""
        fault = _Fault("cut", downstream_bytes, every_connection)
        self._call(self._set(flowing=True, faults=[*self._faults, fault]))

    def cut_all(self) -> None:
        """Drop every open connection now (a link reset); new ones flow (armed faults stay)."""
        self._call(self._cut_all())

    async def _cut_all(self) -> None:
        for connection in list(self._open.values()):
            self.cuts += 1
            connection.abort()
        self._flowing.set()

    @property
    def black_holed(self) -> bool:
        return not self._flowing.is_set()

    async def _set(self, *, flowing: bool, faults: list[_Fault]) -> None:
        self._faults = list(faults)
        if flowing:
            self._flowing.set()
        else:
            self._flowing.clear()

    # -- the tap -----------------------------------------------------------------------

    def messages(self) -> list[TappedMessage]:
        """Every gRPC message clients sent through the proxy so far, in order."""
        with self._lock:
            return list(self._messages)

    def requests(self, message_type: type[M], keep: Callable[[M], bool]) -> list[M]:
        """The tapped messages that parse as ``message_type`` and satisfy ``keep``."""
        found: list[M] = []
        for tapped in self.messages():
            try:
                message = message_type.FromString(tapped.data)
            except DecodeError:
                continue
            if keep(message):
                found.append(message)
        return found

    def _record(self, message: TappedMessage) -> None:
        with self._lock:
            self._messages.append(message)

    # -- forwarding ----------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        index = self.connections
        self.connections += 1
        connection = _Connection(index, Http2Tap(index, self._record))
        connection.writers.append(writer)
        self._open[index] = connection
        try:
            try:
                up_reader, up_writer = await asyncio.open_connection(
                    self.upstream_host, self.upstream_port
                )
            except OSError:
                return  # nothing listens upstream: the client sees its connection close
            connection.writers.append(up_writer)
            await asyncio.gather(
                self._pump(connection, reader, up_writer, downstream=False),
                self._pump(connection, up_reader, writer, downstream=True),
            )
        except asyncio.CancelledError:
            pass  # only the proxy's own shutdown cancels a connection
        finally:
            connection.abort()
            del self._open[index]
            if task is not None:
                self._tasks.discard(task)

    async def _pump(
        self,
        connection: _Connection,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        *,
        downstream: bool,
    ) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await src.read(READ_BYTES):
                if not downstream:
                    connection.tap.feed(data)
                elif (fault := self._due(connection, len(data))) is not None:
                    head = data[: max(0, fault.after_bytes - connection.downstream)]
                    data = data[len(head) :]
                    await self._forward(connection, dst, head, downstream=True)
                    if not fault.every_connection:
                        self._faults.remove(fault)
                    if fault.kind == "cut":
                        self.cuts += 1
                        break
                    self._flowing.clear()  # black-hole: hold the rest, keep the connection
                await self._flowing.wait()
                await self._forward(connection, dst, data, downstream=downstream)
        connection.abort()

    def _due(self, connection: _Connection, incoming: int) -> _Fault | None:
        """The nearest armed fault these incoming bytes would reach, if any."""
        due = [f for f in self._faults if connection.downstream + incoming > f.after_bytes]
        return min(due, key=lambda f: f.after_bytes) if due else None

    @staticmethod
    async def _forward(
        connection: _Connection, dst: asyncio.StreamWriter, data: bytes, *, downstream: bool
    ) -> None:
        if not data:
            return
        dst.write(data)
        await dst.drain()
        if downstream:
            connection.downstream += len(data)


class CuttingProxy(FaultProxy):
    """The e2e tests' proxy: drops the first connection after N bytes went downstream.

    Later connections pass through untouched: a home uplink that breaks mid-download once.
    """

    def __init__(self, upstream_port: int, cut_after_bytes: int) -> None:
        super().__init__(upstream_port)
        self.cut_after_bytes = cut_after_bytes

    def __enter__(self) -> CuttingProxy:
        super().__enter__()
        self.cut_after(self.cut_after_bytes)
        return self
