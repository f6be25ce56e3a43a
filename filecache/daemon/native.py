"""
The daemon's side of the connection: a thin adapter that turns request lines
into calls on L{Responder} and streams its replies back, one at a time.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import (
    IAddress,
    IConsumer,
    IDelayedCall,
    IPushProducer,
    IReactorTime,
    ITCPTransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from filecache import wire
from filecache.daemon.admission import Admission, Network
from filecache.daemon.bodies import Sent
from filecache.daemon.listing import ListBody, ListResult
from filecache.daemon.responder import (
    Reply,
    Responder,
    error_reply,
)
from filecache.daemon.sockets import (
    describe_peer,
    direct_socket,
    plain_socket,
    unsent_bytes,
    write_now,
)
from filecache.daemon.transfer import TransferFailed


class _IConnection(ITCPTransport, IConsumer):
    """
    What a daemon connection's transport is, for the type checker: TCP, UNIX
    and TLS transports all have the methods of both interfaces.
    """


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
        self._protocol.resetTimeout()
        self._protocol._set_backpressure(False)

    def stopProducing(self) -> None:
        pass


class FileCacheProtocol(LineReceiver, TimeoutMixin):
    """
    One client connection of the filecache daemon.

    Its timer runs for the factory's C{idle_timeout}: it is reset by every
    byte received and by every step a reply makes; when it fires, an idle
    connection is closed and a stuck reply is aborted.
    """

    delimiter = b"\n"
    # A request line may be MAX_LINE bytes plus the \r of a \r\n.
    MAX_LENGTH = wire.MAX_LINE + 1

    factory: FileCacheFactory
    # Set by makeConnection, before any of our methods that use it run.
    transport: _IConnection
    _log = Logger()

    def __init__(self) -> None:
        self._replying = False
        self._backpressure = False
        self._lines = 0
        self._socket: socket.socket | None = None
        # The plain socket under the transport (TLS included), for asking
        # the kernel whether a slow reader is still reading.
        self._queue_socket: socket.socket | None = None
        self._unsent: int | None = None
        self._pending: Deferred[Reply] | None = None
        self._gate = _SendBufferGate(self)
        self.peer = "-"

    # Reading, paused while a reply is under way or the send buffer is full.

    def _set_backpressure(self, on: bool) -> None:
        self._backpressure = on
        self._update_reading()

    def _set_replying(self, on: bool) -> None:
        self._replying = on
        if not on and self.factory.draining:
            # Shutting down: this reply was the last one.
            self.transport.loseConnection()
            return
        self._update_reading()

    @property
    def replying(self) -> bool:
        """Whether a reply is under way (waited for or being sent)."""
        return self._replying

    def _update_reading(self) -> None:
        hold = self._replying or self._backpressure
        if hold and not self.paused:
            self.pauseProducing()
        elif not hold and self.paused and self.transport is not None:
            self.resumeProducing()

    # Connection events

    def connectionMade(self) -> None:
        factory = self.factory
        self._socket = direct_socket(self.transport)
        self._queue_socket = plain_socket(self.transport)
        self.peer = describe_peer(self.transport.getPeer())
        factory.admission.opened(self)
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            # A status line, a body sent by the kernel and an END line are
            # separate segments: Nagle would hold the last one back.
            try:
                set_no_delay(True)
            except OSError:
                pass
        self.transport.registerProducer(self._gate, True)
        self.setTimeout(factory.idle_timeout)

    def callLater(self, period: float, func: Callable[[], object]) -> IDelayedCall:
        # TimeoutMixin's timer runs on the factory's clock.
        return self.factory.clock.callLater(period, func)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.connected = False
        self.setTimeout(None)
        pending, self._pending = self._pending, None
        if pending is not None:
            # Disk work for a client who has gone is dropped before it runs.
            pending.cancel()
        self.factory.admission.closed(self)

    def dataReceived(self, data: bytes) -> None:
        # Bytes that only lengthen an unfinished line do not postpone the
        # timer: a request line must arrive whole within the timeout, so a
        # client sending a byte a second cannot hold a connection forever.
        lines = self._lines
        super().dataReceived(data)
        if self._lines != lines or not self._buffer:
            self.resetTimeout()

    def _progressed(self) -> None:
        """A reply made a step: restart the timer, note the kernel's queue."""
        self.resetTimeout()
        self._unsent = unsent_bytes(self._queue_socket)

    def timeoutConnection(self) -> None:
        stuck = self._replying or self._backpressure
        if stuck and self._pending is None:
            unsent = unsent_bytes(self._queue_socket)
            if unsent is not None and self._unsent is not None and unsent < self._unsent:
                # The kernel's queue shrank: the client is reading, only
                # slower than the socket reports writability.
                self._unsent = unsent
                self.setTimeout(self.factory.idle_timeout)
                return
        self._log.info(
            "{peer}: {what} for {seconds} s; closing",
            peer=self.peer,
            what="reply not read" if stuck else "idle",
            seconds=self.factory.idle_timeout,
        )
        if stuck:
            # A polite close would wait on a send buffer that never drains.
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()

    def lineLengthExceeded(self, line: bytes) -> None:
        reply = self.factory.responder.malformed(
            wire.TOO_LONG, f"request line longer than {wire.MAX_LINE} bytes"
        )
        self.transport.write(reply.data)
        self._access(b"(too long)", reply, self.factory.clock.seconds())
        self.transport.loseConnection()

    def lineReceived(self, line: bytes) -> None:
        self._lines += 1
        factory = self.factory
        started = factory.clock.seconds() if factory.access_log else 0.0
        try:
            request = wire.parse_request(line)
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
            return
        self._set_replying(True)
        transport = self.transport
        # The gate comes off before the status line is written: a pause the
        # transport gave it now would never be lifted (the body's producer
        # is resumed instead), and reading is held by _replying meanwhile.
        transport.unregisterProducer()
        self._backpressure = False
        transport.write(reply.data)
        self._progressed()
        body = reply.body
        if isinstance(body, ListBody):
            body.send(
                transport,
                on_progress=self._progressed,
                unsent=lambda: unsent_bytes(self._queue_socket),
                call_later=self.factory.clock.callLater,
            ).addCallbacks(
                self._list_sent,
                self._body_failed,
                callbackArgs=(reply, line, started),
                errbackArgs=(reply, line, started),
            )
            return
        body.send(transport, on_progress=self._progressed).addCallbacks(
            self._body_sent,
            self._body_failed,
            callbackArgs=(reply, line, started),
            errbackArgs=(reply, line, started),
        )

    def _finish_simple(self, line: bytes, reply: Reply, started: float) -> None:
        if self.transport is None or not self.connected:
            return
        write_now(self.transport, reply.data, self._socket)
        self.factory.responder.delivered(reply)
        self._access(line, reply, started)
        if self._replying:
            self.resetTimeout()
            self._set_replying(False)

    def _list_sent(self, result: ListResult, reply: Reply, line: bytes, started: float) -> None:
        self.transport.registerProducer(self._gate, True)
        status = "OK" if result.error is None else "ERR " + wire.UNAVAILABLE
        self._access(line, reply, started, status, result.sent)
        self.resetTimeout()
        self._set_replying(False)

    def _body_sent(self, sent: Sent, reply: Reply, line: bytes, started: float) -> None:
        if sent.digest is None:
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
        self.transport.registerProducer(self._gate, True)
        self.transport.write(wire.format_end(sent.digest))
        self._access(line, reply, started)
        self.resetTimeout()
        self._set_replying(False)

    def _body_failed(self, reason: Failure, reply: Reply, line: bytes, started: float) -> None:
        sent = reason.value.sent if isinstance(reason.value, TransferFailed) else 0
        self._access(line, reply, started, "cut", sent)
        if self.transport is not None and self.connected:
            self.transport.abortConnection()

    def _access(
        self, line: bytes, reply: Reply, started: float, status: str = "", size: int | None = None
    ) -> None:
        factory = self.factory
        if not factory.access_log:
            return
        self._log.info(
            "{peer} {request} {status} {size} {seconds:.6f} {cache}",
            peer=self.peer,
            # Escaped: a request line must not be able to forge log lines.
            request=wire.printable_bytes(line[:200].rstrip(b"\r")),
            status=status or reply.status,
            size=reply.size if size is None else size,
            seconds=factory.clock.seconds() - started,
            cache=reply.cache,
        )


if TYPE_CHECKING:
    _ProtocolFactory = Factory[Protocol]
else:
    # Twisted 23.10, the oldest we support, cannot subscript Factory at run
    # time; newer releases type it by the protocols it builds.
    _ProtocolFactory = Factory


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
    ) -> None:
        if clock is None:
            from twisted.internet import reactor

            clock = reactor
        self.responder = responder
        self.clock: IReactorTime = clock
        self.access_log = access_log
        self.idle_timeout = idle_timeout
        if admission is None:
            admission = Admission(
                clock, max_connections=max_connections, max_per_ip=max_per_ip, allow=allow
            )
        self.admission = admission
        responder.add_figures(admission.figures)

    @property
    def draining(self) -> bool:
        return self.admission.draining

    def drain(self, timeout: float) -> Deferred[None]:
        return self.admission.drain(timeout)

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        return self.admission.build(addr, lambda: super(FileCacheFactory, self).buildProtocol(addr))
