"""
The native protocol's adapter: turns request lines into calls on
L{Responder} and streams its replies back, one at a time; and the factory
that builds connections, as far as L{Admission} lets them in.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IAddress, IProtocolNegotiationFactory, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from filecache import wire
from filecache.daemon.admission import Admission, Network
from filecache.daemon.bodies import Sent
from filecache.daemon.connection import Connection
from filecache.daemon.http import HttpSession
from filecache.daemon.httphead import MAX_HEADER_LINE, is_request_line, starts_like_http
from filecache.daemon.httpkept import KnownRequests, ParsedHeads, ReadyResponses
from filecache.daemon.httpreply import DateCache
from filecache.daemon.listing import ListBody, ListResult
from filecache.daemon.metrics import DaemonMetrics, ReplyFigures
from filecache.daemon.responder import (
    Reply,
    Responder,
    error_reply,
)
from filecache.daemon.transfer import TransferFailed


class FileCacheProtocol(Connection):
    """
    One client connection speaking the native protocol (docs/protocol.md),
    or, from a first line that is HTTP, handing its lines to an
    L{HttpSession} (docs/http.md).
    """

    def dataReceived(self, data: bytes) -> None:
        if self.behind_proxy and not self.admit_behind_proxy(data):
            return
        if self._http is None and not self._buffer:
            if self._lines:
                if self._fast_get(data):
                    return
            elif self.factory.http:
                self._http_from_first_read(data)
        super().dataReceived(data)

    def _http_from_first_read(self, data: bytes) -> None:
        end = data.find(b"\n")
        if 0 < end <= MAX_HEADER_LINE + 1 and is_request_line(data[:end]):
            # The first line decides, as lineReceived would, and the session
            # reads this whole read itself: a head that came whole is read at
            # once, as on every later request.
            self._lines = 1
            self._http = HttpSession(self)

    def _fast_get(self, data: bytes) -> bool:
        """
        Answer a read that is exactly one native C{GET <path> 0} line seen
        before, for a small cached file whose whole reply is kept, with no
        parsing: what L{lineReceived} would send, the same bytes.  C{False}
        (nothing done) otherwise; the line is then read the long way.
        """
        factory = self.factory
        path = factory.native_gets.get(data)
        if path is None or self.paused or factory.access_log:
            return False
        reply = factory.responder.kept_hit(path)
        if reply is None:
            return False
        self._lines += 1
        self.request_arrived()
        factory.replies.fast_native += 1
        self.write_whole(reply)
        self.resetTimeout()
        return True

    def lineLengthExceeded(self, line: bytes) -> None:
        if self._http is None and self._lines == 0 and self.factory.http and starts_like_http(line):
            self._http = HttpSession(self)
        if self._http is not None:
            self._http.line_too_long(line[:8])
            return
        reply = self.factory.responder.malformed(
            wire.TOO_LONG, f"request line longer than {wire.MAX_LINE} bytes"
        )
        self.transport.write(reply.data)
        self._access(b"(too long)", reply, self.factory.clock.seconds())
        self.transport.loseConnection()

    def lineReceived(self, line: bytes) -> None:
        self._lines += 1
        if self._http is not None:
            self._http.line_received(line)
            return
        factory = self.factory
        if self._lines == 1 and factory.http:
            # The first line decides, for the life of the connection.
            if is_request_line(line):
                # From here on the session reads the connection's bytes,
                # those already buffered first.
                self._http = HttpSession(self, self._buffer)
                self._buffer = b""
                self._http.line_received(line)
                return
            # A native connection after all: native lines are shorter.
            self.MAX_LENGTH = FileCacheProtocol.MAX_LENGTH
        self.request_arrived()
        started = factory.clock.seconds()
        try:
            request = wire.parse_request(line)
            if type(request) is wire.GetRequest and request.offset == 0:
                factory.native_gets.keep(line + b"\n", request.path)
        except wire.WireError as e:
            self._finish_simple(line, factory.responder.malformed(e.code, e.message), started)
            if e.code == wire.TOO_LONG:
                self.transport.loseConnection()
            return
        try:
            reply = factory.responder.respond(request)
        except Exception:  # noqa: BLE001 - logged, and the client told
            self._log.failure("Error answering {request!r}", request=line[:200])
            reply = error_reply(wire.UNAVAILABLE, "internal error")
        if reply is None:  # QUIT
            factory.replies.answered(False, "OK", factory.clock.seconds() - started)
            self.transport.loseConnection()
            return
        if isinstance(reply, Deferred):
            self._set_replying(True)
            self._pending = reply
            reply.addCallbacks(
                self._deliver,
                self._internal_error,
                callbackArgs=(line, started),
                errbackArgs=(line, started),
            )
        else:
            self._deliver(reply, line, started)

    def _internal_error(self, reason: Failure, line: bytes, started: float) -> None:
        self._pending = None
        if reason.check(CancelledError):
            return  # the client left while its answer was being worked out
        self._log.failure("Error answering {request!r}", reason, request=wire.printable_bytes(line[:200]))
        self._deliver(error_reply(wire.UNAVAILABLE, "internal error"), line, started)

    # Replies

    def _deliver(self, reply: Reply, line: bytes, started: float) -> None:
        self._pending = None
        if reply.body is None:
            self._finish_simple(line, reply, started)
            return
        if self.transport is None or not self.connected:
            reply.body.discard()
            self.gone()
            return
        body = reply.body
        if isinstance(body, ListBody):
            self.stream_steps(reply.data, body).addCallbacks(
                self._list_sent,
                self._body_failed,
                callbackArgs=(reply, line, started),
                errbackArgs=(reply, line, started),
            )
            return
        self.stream(reply.data, body).addCallbacks(
            self._body_sent,
            self._body_failed,
            callbackArgs=(reply, line, started),
            errbackArgs=(reply, line, started),
        )

    def _finish_simple(self, line: bytes, reply: Reply, started: float) -> None:
        if self.transport is None or not self.connected:
            self.gone()
            return
        self.write_whole(reply.data)
        self.factory.responder.delivered(reply)
        self._access(line, reply, started)
        self.finish_simple()

    def _list_sent(self, result: ListResult, reply: Reply, line: bytes, started: float) -> None:
        status = "OK" if result.error is None else "ERR " + wire.UNAVAILABLE
        self._access(line, reply, started, status, result.sent)
        self.reply_done()

    def _body_sent(self, sent: Sent, reply: Reply, line: bytes, started: float) -> None:
        if sent.changed or sent.digest is None:
            # Changed on disk while being sent: cut the reply short rather
            # than end it with a digest the client would take as good.
            self._log.warn(
                "{path} changed while being sent to {peer}; connection dropped",
                path=wire.printable_bytes(line[4:200]),
                peer=self.peer,
            )
            self._access(line, reply, started, "cut", sent.sent)
            self.transport.abortConnection()
            return
        self._access(line, reply, started)
        self.reply_done(wire.format_end(sent.digest))

    def _body_failed(self, reason: Failure, reply: Reply, line: bytes, started: float) -> None:
        sent = reason.value.sent if isinstance(reason.value, TransferFailed) else 0
        self._access(line, reply, started, "cut", sent)
        if self.transport is not None and self.connected:
            self.transport.abortConnection()

    def _access(
        self, line: bytes, reply: Reply, started: float, status: str = "", size: int | None = None
    ) -> None:
        self.access(line, status or reply.status, reply.size if size is None else size, started, reply.cache)

if TYPE_CHECKING:
    _ProtocolFactory = Factory[Protocol]
else:
    # Twisted 23.10, the oldest we support, cannot subscript Factory at run
    # time; newer releases type it by the protocols it builds.
    _ProtocolFactory = Factory


@implementer(IProtocolNegotiationFactory)
class FileCacheFactory(_ProtocolFactory):
    """
    Builds L{FileCacheProtocol}s that share one L{Responder}, as far as
    L{Admission} lets them in.
    """

    protocol = FileCacheProtocol
    noisy = False

    def __init__(
        self,
        responder: Responder,
        *,
        clock: IReactorTime | None = None,
        access_log: bool = True,
        idle_timeout: float | None = 120,
        max_connections: int = 1024,
        max_per_ip: int = 64,
        allow: Sequence[Network] | None = None,
        admission: Admission | None = None,
        http: bool = True,
        trusted_proxies: Sequence[Network] | None = None,
    ) -> None:
        if clock is None:
            from twisted.internet import reactor

            clock = reactor
        self.responder = responder
        self.clock: IReactorTime = clock
        self.access_log = access_log
        self.idle_timeout = idle_timeout
        self.http = http
        self.dates = DateCache(clock.seconds)
        self.http_ready = ReadyResponses()
        self.http_heads = ParsedHeads()
        # Plain GETs read before, by their exact bytes: HTTP heads (with
        # their target) and native lines (with their path).
        self.http_plain: KnownRequests[bytes] = KnownRequests()
        self.native_gets: KnownRequests[str] = KnownRequests()
        self.replies = ReplyFigures()
        # Set when /metrics is served on this port (L{filecache.daemon.metrics}).
        self.metrics: DaemonMetrics | None = None
        if admission is None:
            admission = Admission(
                clock,
                max_connections=max_connections,
                max_per_ip=max_per_ip,
                allow=allow,
                http=http,
                trusted_proxies=trusted_proxies,
            )
        self.admission = admission
        responder.add_figures(admission.figures)

    def acceptableProtocols(self) -> list[bytes]:
        """
        What TLS connections may agree on by ALPN: HTTP/1.1 when it is
        served.  Twisted refuses a TLS handshake whose client offers ALPN
        protocols none of which the server names, so without this curl and
        browsers could not connect at all.
        """
        return [b"http/1.1"] if self.http else []

    @property
    def draining(self) -> bool:
        return self.admission.draining

    def drain(self, timeout: float) -> Deferred[None]:
        return self.admission.drain(timeout)

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        return self.admission.build(addr, lambda: super(FileCacheFactory, self).buildProtocol(addr))

    def behind_proxy(self) -> ProxyPortFactory:
        """The factory for a PROXY protocol port (C{haproxy:...}) serving the same daemon."""
        return ProxyPortFactory(self)


class ProxyPortFactory(_ProtocolFactory):
    """
    Builds the connections of a PROXY protocol port for a
    L{FileCacheFactory}: Twisted's wrapper calls L{buildProtocol} before the
    header is read, with the proxy's address, so only L{Admission.trusted}
    is asked now; each connection is admitted by its client's address once
    the header has been read.
    """

    noisy = False

    def __init__(self, factory: FileCacheFactory) -> None:
        self.factory = factory

    def logPrefix(self) -> str:
        # Twisted's wrapper adds " (PROXY)": "FileCacheFactory (PROXY) starting on 5000".
        return str(self.factory.logPrefix())

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        factory = self.factory

        def make() -> Protocol:
            protocol = factory.protocol()
            protocol.factory = factory
            protocol.behind_proxy = True
            return protocol

        return factory.admission.build(addr, make, proxied=True)
