"""
The daemon's side of the connection: a thin adapter that turns request lines
into calls on L{FileCacheServer} and streams its replies back, one at a time.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IPushProducer, IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from filecache import wire
from filecache.server import (
    DiskBody,
    FileCacheServer,
    MemoryBody,
    Reply,
    error_reply,
)
from filecache.transfer import TransferResult, send_file, send_memory


def describe_peer(address: IAddress) -> str:
    """C{host:port} of a TCP peer, or the address's own text for others."""
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is not None and port is not None:
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return getattr(address, "name", None) or type(address).__name__


@implementer(IPushProducer)
class _SendBufferGate:
    """
    Registered on the transport between streamed replies, so that a client
    who sends requests without reading the replies is no longer read from
    once Twisted's send buffer fills.
    """

    def __init__(self, protocol: FileCacheProtocol) -> None:
        self._protocol = protocol

    def pauseProducing(self) -> None:
        self._protocol._set_backpressure(True)

    def resumeProducing(self) -> None:
        self._protocol._set_backpressure(False)

    def stopProducing(self) -> None:
        pass


class FileCacheProtocol(LineReceiver):
    """One client connection of the filecache daemon."""

    delimiter = b"\n"
    # A request line may be MAX_LINE bytes plus the \r of a \r\n.
    MAX_LENGTH = wire.MAX_LINE + 1

    factory: FileCacheFactory
    _log = Logger()

    def __init__(self) -> None:
        self._replying = False
        self._backpressure = False
        self._gate = _SendBufferGate(self)
        self.peer = "-"

    # Reading, paused while a reply is under way or the send buffer is full.

    def _set_backpressure(self, on: bool) -> None:
        self._backpressure = on
        self._update_reading()

    def _set_replying(self, on: bool) -> None:
        self._replying = on
        self._update_reading()

    def _update_reading(self) -> None:
        hold = self._replying or self._backpressure
        if hold and not self.paused:
            self.pauseProducing()
        elif not hold and self.paused and self.transport is not None:
            self.resumeProducing()

    # Connection events

    def connectionMade(self) -> None:
        self.peer = describe_peer(self.transport.getPeer())
        self.factory.connection_made(self)
        self.transport.registerProducer(self._gate, True)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.factory.connection_lost(self)

    def lineLengthExceeded(self, line: bytes) -> None:
        reply = error_reply(wire.TOO_LONG, f"request line longer than {wire.MAX_LINE} bytes")
        self.transport.write(reply.data)
        self._access(b"(too long)", reply, self.factory.clock.seconds())
        self.transport.loseConnection()

    def lineReceived(self, line: bytes) -> None:
        started = self.factory.clock.seconds()
        try:
            request = wire.parse_request(line)
        except wire.WireError as e:
            self._finish_simple(line, error_reply(e.code, e.message), started)
            if e.code == wire.TOO_LONG:
                self.transport.loseConnection()
            return
        if isinstance(request, wire.QuitRequest):
            self.transport.loseConnection()
            return
        try:
            reply = self.factory.server.respond(request)
        except Exception:
            self._log.failure("Error answering {request!r}", request=line[:200])
            reply = error_reply(wire.UNAVAILABLE, "internal error")
        if isinstance(reply, Deferred):
            self._set_replying(True)
            reply.addErrback(self._internal_error, line)
            reply.addCallback(self._deliver, line, started)
        else:
            self._deliver(reply, line, started)

    def _internal_error(self, reason: Failure, line: bytes) -> Reply:
        self._log.failure("Error answering {request!r}", reason, request=line[:200])
        return error_reply(wire.UNAVAILABLE, "internal error")

    # Replies

    def _deliver(self, reply: Reply, line: bytes, started: float) -> None:
        if reply.body is None:
            self._finish_simple(line, reply, started)
            return
        self._set_replying(True)
        transport = self.transport
        transport.write(reply.data)
        transport.unregisterProducer()
        body = reply.body
        d: Deferred[TransferResult]
        if isinstance(body, MemoryBody):
            d = send_memory(transport, body.data, body.start).addCallback(TransferResult)
        else:
            d = send_file(
                transport,
                body.opened.fd,
                body.start,
                body.length,
                digest_known=body.digest is not None,
                collect=body.fill,
            )
        d.addCallbacks(
            self._body_sent,
            self._body_failed,
            callbackArgs=(body, reply, line, started),
            errbackArgs=(body, reply, line, started),
        )

    def _finish_simple(self, line: bytes, reply: Reply, started: float) -> None:
        if self.transport is None or not self.connected:
            return
        self.transport.write(reply.data)
        self.factory.server.counters.bytes_sent += reply.size
        self._access(line, reply, started)
        if self._replying:
            self._set_replying(False)

    def _body_sent(
        self,
        result: TransferResult,
        body: MemoryBody | DiskBody,
        reply: Reply,
        line: bytes,
        started: float,
    ) -> None:
        server = self.factory.server
        server.counters.bytes_sent += result.sent
        digest = server.body_sent(body, result)
        if digest is None:
            # Changed on disk while being sent: cut the reply short rather
            # than end it with a digest the client would take as good.
            self._log.warn(
                "{path} changed while being sent to {peer}; connection dropped",
                path=line[4:200],
                peer=self.peer,
            )
            self._access(line, reply, started, "cut")
            self.transport.abortConnection()
            return
        self.transport.write(wire.format_end(digest))
        self._access(line, reply, started)
        self.transport.registerProducer(self._gate, True)
        self._set_replying(False)

    def _body_failed(
        self,
        reason: Failure,
        body: MemoryBody | DiskBody,
        reply: Reply,
        line: bytes,
        started: float,
    ) -> None:
        self.factory.server.body_failed(body)
        self._access(line, reply, started, "cut")
        if self.transport is not None and self.connected:
            self.transport.abortConnection()

    def _access(self, line: bytes, reply: Reply, started: float, status: str = "") -> None:
        factory = self.factory
        if not factory.access_log:
            return
        self._log.info(
            "{peer} {request} {status} {size} {seconds:.6f} {cache}",
            peer=self.peer,
            request=line[:200].rstrip(b"\r").decode("utf-8", "backslashreplace"),
            status=status or reply.status,
            size=reply.size,
            seconds=factory.clock.seconds() - started,
            cache=reply.cache,
        )


class FileCacheFactory(Factory):
    """Builds L{FileCacheProtocol}s that share one L{FileCacheServer}."""

    protocol = FileCacheProtocol
    noisy = False

    def __init__(
        self,
        server: FileCacheServer,
        *,
        clock: IReactorTime | None = None,
        access_log: bool = True,
    ) -> None:
        if clock is None:
            from twisted.internet import reactor as clock  # type: ignore[assignment]
        self.server = server
        self.clock: Any = clock
        self.access_log = access_log

    def connection_made(self, protocol: FileCacheProtocol) -> None:
        counters = self.server.counters
        counters.connections_active += 1
        counters.connections_total += 1

    def connection_lost(self, protocol: FileCacheProtocol) -> None:
        self.server.counters.connections_active -= 1
