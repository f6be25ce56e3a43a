"""
A client connection's mechanics, shared by both protocols' adapters: when
to read, the idle timer, streaming a body, and the access log line.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IPushProducer,
    ITCPTransport,
)
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from filecache import wire
from filecache.daemon.admission import NOT_ALLOWED, host_of, refusal_reply
from filecache.daemon.bodies import DiskBody, MemoryBody, Sent
from filecache.daemon.httphead import MAX_HEADER_LINE, is_request_line, starts_like_http
from filecache.daemon.listing import ListResult, SteppedBody
from filecache.daemon.sockets import (
    buffer_empty,
    describe_peer,
    direct_socket,
    is_tcp,
    plain_socket,
    unsent_bytes,
    unwrapped,
    write_now,
)
from filecache.daemon.transfer import TURN

if TYPE_CHECKING:
    from filecache.daemon.http import HttpSession
    from filecache.daemon.native import FileCacheFactory


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

    def __init__(self, protocol: Connection) -> None:
        self._protocol = protocol

    def pauseProducing(self) -> None:
        self._protocol._set_backpressure(True)

    def resumeProducing(self) -> None:
        self._protocol.resetTimeout()
        self._protocol._set_backpressure(False)

    def stopProducing(self) -> None:
        pass


class Connection(LineReceiver, TimeoutMixin):
    """
    One client connection of the filecache daemon, whichever protocol it
    speaks: reading (held while a reply is under way or the send buffer is
    full), its timer, streaming reply bodies, and the access log.  The
    native adapter (L{filecache.daemon.native.FileCacheProtocol}) reads its
    lines and hands a connection whose first line is HTTP to an
    L{filecache.daemon.http.HttpSession}.

    Its timer runs for the factory's C{idle_timeout}: it is reset by every
    byte received and by every step a reply makes; when it fires, an idle
    connection is closed and a stuck reply is aborted.
    """

    delimiter = b"\n"
    # A request line may be MAX_LINE bytes plus the \r of a \r\n.
    MAX_LENGTH = wire.MAX_LINE + 1

    factory: FileCacheFactory
    behind_proxy = False
    """On a PROXY protocol port, until the first bytes after the header: not yet admitted."""
    # Set by makeConnection, before any of our methods that use it run.
    transport: _IConnection
    _log = Logger()

    def __init__(self) -> None:
        self._replying = False
        self._backpressure = False
        self._lines = 0
        self._requests = 0
        self._socket: socket.socket | None = None
        # The plain socket under the transport (TLS included), for asking
        # the kernel whether a slow reader is still reading.
        self._queue_socket: socket.socket | None = None
        self._queue_tcp = False
        self._unsent: int | None = None
        self._pending: Deferred[Any] | None = None
        self._gate = _SendBufferGate(self)
        self._gated = False
        self._http: HttpSession | None = None
        self._writer: Any = None
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
        # What write_now writes to: beneath a PROXY wrapper when the socket is ours to write.
        self._writer = unwrapped(self.transport) if self._socket is not None else self.transport
        self._queue_socket = plain_socket(self.transport)
        self._queue_tcp = self._queue_socket is not None and is_tcp(self._queue_socket)
        self.peer = describe_peer(self.transport.getPeer())
        if not self.behind_proxy:
            factory.admission.opened(self, host_of(self.transport.getPeer()))
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            # A status line, a body sent by the kernel and an END line are
            # separate segments: Nagle would hold the last one back.
            try:
                set_no_delay(True)
            except OSError:
                pass
        self.transport.registerProducer(self._gate, True)
        self._gated = True
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
            self.gone()
            pending.cancel()
        admission = self.factory.admission
        if self.behind_proxy:
            under = unwrapped(self.transport).getPeer()
            if self.transport.getPeer() == under:
                # No header read (an invalid one, or none before the end):
                # the wrapper closed it, or the proxy hung up.
                admission.bad_proxy_header(host_of(under))
        admission.closed(self)

    def admit_behind_proxy(self, data: bytes) -> bool:
        """
        On a PROXY protocol port, at the first bytes after the header:
        admit the connection by the client's address the header gave, or
        refuse it as a direct one would be (and say C{False}).
        """
        self.behind_proxy = False
        peer = self.transport.getPeer()
        self.peer = describe_peer(peer)
        host = host_of(peer)
        admission = self.factory.admission
        why = admission.refusal(host)
        if why is None:
            admission.opened(self, host)
            return True
        if why is NOT_ALLOWED:
            self.transport.abortConnection()
            return False
        end = data.find(b"\n")
        http = self.factory.http and (is_request_line(data[:end]) if end >= 0 else starts_like_http(data))
        self.transport.write(refusal_reply(why, self.factory.dates if http else None))
        self.transport.loseConnection()
        return False

    def dataReceived(self, data: bytes) -> None:
        # Bytes that only lengthen an unfinished request do not postpone the
        # timer: a request line (an HTTP head) must arrive whole within the
        # timeout, so a client sending a byte a second cannot hold a
        # connection forever.
        requests = self._requests
        http = self._http
        if http is not None:
            http.data_received(data)
        else:
            if (
                self._lines == 0
                and self.factory.http
                and self.MAX_LENGTH == Connection.MAX_LENGTH
                and starts_like_http(self._buffer + data[:64])
            ):
                # An HTTP request line may be longer than a native one.
                self.MAX_LENGTH = MAX_HEADER_LINE + 1
            super().dataReceived(data)
            http = self._http
            if http is not None:
                # The first line made this an HTTP connection: the bytes
                # after it are the session's to read.
                http.data_received(b"")
        if self._requests != requests or not (self._buffer or (http is not None and http.head_open)):
            self.resetTimeout()

    def request_arrived(self) -> None:
        """A whole request (a native line, an HTTP head) was read: it restarts the timer."""
        self._requests += 1

    def _progressed(self) -> None:
        """A reply made a step: restart the timer, note the kernel's queue."""
        self.resetTimeout()
        self._unsent = unsent_bytes(self._queue_socket, self._queue_tcp)

    def timeoutConnection(self) -> None:
        stuck = self._replying or self._backpressure
        if stuck and self._pending is None:
            unsent = unsent_bytes(self._queue_socket, self._queue_tcp)
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

    # What both protocols' adapters do with a connection

    def _start_stream(self, head: bytes) -> Any:
        self._set_replying(True)
        transport = self.transport
        # The gate comes off before the head is written: a pause the
        # transport gave it now would never be lifted (the body's producer
        # is resumed instead), and reading is held by _replying meanwhile.
        transport.unregisterProducer()
        self._gated = False
        self._backpressure = False
        # Straight to the socket when nothing is queued, so that a body sent
        # from the socket too may follow at once.
        write_now(self._writer, head, self._socket)
        self._progressed()
        return transport

    def stream(self, head: bytes, body: MemoryBody | DiskBody) -> Deferred[Sent]:
        """Write C{head}, then send C{body}; no request is read meanwhile."""
        sock = self._socket
        if sock is not None and isinstance(body, DiskBody) and body.by_kernel and buffer_empty(self._writer):
            # Head and body straight to the socket, now: a body the socket
            # takes whole is sent with no producer, no pause in reading and
            # no reactor turn; whatever it does not take goes the usual way.
            try:
                # MSG_MORE: the head waits for the body's first bytes and
                # leaves in the same segment (sendfile pushes its last one),
                # so the client wakes once per reply, not twice.
                written = sock.send(head, socket.MSG_MORE if body.length else 0)
            except OSError:
                written = 0
            if written == len(head):
                sent = body.send_now(sock.fileno(), TURN)
                if sent is not None:
                    return succeed(sent)
            head = head[written:]
        return body.send(self._start_stream(head), on_progress=self._progressed)

    def stream_steps(self, head: bytes, body: SteppedBody[Any]) -> Deferred[ListResult]:
        """Write C{head}, then a body made in disk steps, only as fast as the client reads."""
        return body.send(
            self._start_stream(head),
            on_progress=self._progressed,
            unsent=lambda: unsent_bytes(self._queue_socket, self._queue_tcp),
            call_later=self.factory.clock.callLater,
        )

    def reply_done(self, tail: bytes = b"") -> None:
        """The streamed reply is over, once C{tail} is written: read the next request."""
        if not self._gated:
            self.transport.registerProducer(self._gate, True)
            self._gated = True
        if tail:
            # After the gate is back, so that a full buffer pauses it.
            self.transport.write(tail)
        self.resetTimeout()
        self._set_replying(False)

    def write_whole(self, data: bytes) -> None:
        """Write a whole reply at once (straight to the socket when nothing is queued)."""
        write_now(self._writer, data, self._socket)

    def wait(self, pending: Deferred[Any], then: Callable[[Any], None], failed: Callable[[Failure], None]) -> None:
        """Hold reading until C{pending} (disk work) fires; cancelled if the client leaves."""
        self._set_replying(True)
        self._pending = pending

        def done(result: Any) -> None:
            self._pending = None
            then(result)

        def error(reason: Failure) -> None:
            self._pending = None
            if not reason.check(CancelledError):
                failed(reason)

        pending.addCallbacks(done, error)

    def finish_simple(self) -> None:
        """A reply written whole after a wait is over: read the next request."""
        if self._replying:
            self.resetTimeout()
            self._set_replying(False)

    def access(self, request: bytes, status: str, size: int, started: float, cache: str) -> None:
        """The end of one reply, of either protocol: counted for the metrics, and the access log's line."""
        factory = self.factory
        seconds = factory.clock.seconds() - started
        factory.replies.answered(self._http is not None, status, seconds)
        if not factory.access_log:
            return
        self._log.info(
            "{peer} {request} {status} {size} {seconds:.6f} {cache}",
            peer=self.peer,
            # Escaped: a request line must not be able to forge log lines.
            request=wire.printable_bytes(request[:200].rstrip(b"\r")),
            status=status,
            size=size,
            seconds=seconds,
            cache=cache,
        )

    def gone(self) -> None:
        """A request whose client left before its reply was written (counted for the metrics)."""
        self.factory.replies.gone(self._http is not None)
