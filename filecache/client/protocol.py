"""
The client's connection to a filecache daemon: a LineReceiver that sends one
request at a time and hands each reply's lines to that request's reader.
"""

from __future__ import annotations

import builtins
import sys
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IDelayedCall, IReactorTime, ITCPTransport
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from filecache import wire
from filecache.client.errors import (
    BrokenReply,
    ConnectionLostEarly,
    HandshakeFailed,
    ServerError,
)
from filecache.client.pace import Pace
from filecache.client.readers import (
    BodySink,
    Download,
    FileHash,
    GetReader,
    HashReader,
    ListReader,
    Next,
    ReplyReader,
    StatsReader,
)

READ_SIZE = 1 << 20
"""The most bytes one read of the socket takes."""


class FileCacheClientProtocol(LineReceiver, TimeoutMixin):
    """
    A connection to a filecache daemon.  Each method returns a Deferred of
    the parsed reply.  Up to C{pipeline} requests are sent before their
    replies come (docs/protocol.md: the server answers them in order); the
    rest wait their turn here.

    @param timeout: seconds without a byte from the server, while a reply is
        awaited, after which the connection is aborted; also the window of
        L{Pace}'s rule (C{None}: wait forever).
    """

    delimiter = b"\n"
    MAX_LENGTH = 64 * 1024
    # Set by makeConnection, before any request can be sent.
    transport: ITCPTransport
    _log = Logger()

    def __init__(
        self, timeout: float | None = None, clock: IReactorTime | None = None, pipeline: int = 1
    ) -> None:
        self._timeout = timeout
        self._pipeline = max(1, pipeline)
        self._queue: deque[tuple[bytes, ReplyReader]] = deque()
        self._current: ReplyReader | None = None
        # Sent after the current one, their replies not begun (pipelining).
        self._sent: deque[ReplyReader] = deque()
        self._failed: Failure | None = None
        self.closed: Deferred[None] = Deferred()
        """Fires when the connection is gone."""
        self._clock = clock
        self._pace = Pace(self.callLater, timeout, self._give_up)
        self._status_seen = False

    def connectionMade(self) -> None:
        # Reads of up to 1 MiB, not Twisted's 64 KiB: a 100 MiB body then
        # costs a tenth of the trips through dataReceived (measured: 0.62 s
        # -> 0.56 s for two such files over the loopback interface).
        if hasattr(self.transport, "bufferSize"):
            self.transport.bufferSize = READ_SIZE

    def callLater(self, period: float, func: Callable[[], object]) -> IDelayedCall:
        # TimeoutMixin's timer runs on the injected clock, if there is one.
        if self._clock is not None:
            return self._clock.callLater(period, func)
        call: IDelayedCall = super().callLater(period, func)
        return call

    # Requests

    def list(self, cached: bool = False) -> Deferred[list[wire.ListRow]]:
        return self._request(wire.ListRequest(cached), ListReader())

    def stats(self) -> Deferred[builtins.list[tuple[str, wire.StatValue]]]:
        return self._request(wire.StatsRequest(), StatsReader())

    def hash(self, path: str) -> Deferred[FileHash]:
        return self._request(wire.HashRequest(path), HashReader())

    def get(self, path: str, sink: BodySink, offset: int = 0) -> Deferred[Download]:
        return self._request(wire.GetRequest(path, offset), GetReader(sink))

    @property
    def usable(self) -> bool:
        """Whether requests can still be sent on this connection."""
        return self._failed is None

    def quit(self) -> Deferred[None]:
        """Ask the server to close, close our side; fires once closed."""
        if self._failed is None and self.transport is not None:
            self._failed = Failure(ConnectionLostEarly("connection closed by the client"))
            self.transport.write(wire.format_request(wire.QuitRequest()))
            self.transport.loseConnection()
        return self.closed

    def _request(self, request: wire.Request, op: ReplyReader) -> Deferred[Any]:
        if self._failed is not None:
            return fail(self._failed)
        op.on_cancel = self._cancelled
        self._queue.append((wire.format_request(request), op))
        self._next()
        return op.deferred

    @property
    def outstanding(self) -> int:
        """Requests sent or waiting to be sent whose replies are not whole yet."""
        return (self._current is not None) + len(self._sent) + len(self._queue)

    def _next(self) -> None:
        batch = []
        while self._queue and (self._current is not None) + len(self._sent) < self._pipeline:
            data, op = self._queue.popleft()
            batch.append(data)
            if self._current is None:
                self._begin(op)
            else:
                self._sent.append(op)
        if batch:
            # One write for the lot: requests pipelined in one segment.
            self.transport.write(b"".join(batch))

    def _begin(self, op: ReplyReader) -> None:
        """C{op}'s reply is the next to come: its timers start now."""
        self._current = op
        self._status_seen = False
        self.setTimeout(self._timeout)
        self._pace.request_sent()

    def _reply_done(self) -> None:
        self._current = None
        if self._sent:
            # The next reply's timers start now: _begin moves them.
            self._begin(self._sent.popleft())
        else:
            self.setTimeout(None)
            self._pace.stop()
        self._next()

    def _cancelled(self, op: ReplyReader) -> None:
        # Deferred.cancel fails op's Deferred with CancelledError after this.
        if op is self._current or op in self._sent:
            # Its reply (or the rest of it) may be on the way: the connection is spent.
            op.abandon()
            if op is self._current:
                self._current = None
            else:
                self._sent.remove(op)
            self._fail(ConnectionLostEarly("request cancelled"))
            return
        for entry in self._queue:
            if entry[1] is op:
                self._queue.remove(entry)
                return

    # Replies

    def dataReceived(self, data: bytes) -> None:
        if self._current is not None:
            self.resetTimeout()
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if self._failed is not None:
            return
        op = self._current
        if op is None:
            return self._fail(BrokenReply("reply line with no request outstanding"))
        size = len(line) + 1  # as it came, its \n included
        if line.endswith(b"\r"):
            # The one place a line's CR goes: readers see the line alone.
            line = line[:-1]
        if self._status_seen:
            self._pace.received(size)
        else:
            self._status_seen = True
            self._pace.status_received()
        try:
            step = op.line(line, size)
        except ServerError as e:
            # An ERR reply ends that request; the connection stays usable.
            self._reply_done()
            op.deferred.errback(Failure(e))
            return
        except Exception as e:  # noqa: BLE001 - any other error breaks the connection
            return self._fail(e)
        if step is Next.BODY:
            self.setRawMode()
        elif step is Next.DONE:
            self._reply_done()

    def rawDataReceived(self, data: bytes) -> None:
        if self._failed is not None:
            return
        op = self._current
        if op is None:
            return self._fail(BrokenReply("unexpected data from server"))
        self._pace.received(len(data))
        try:
            rest = op.raw(data)
        except Exception as e:  # noqa: BLE001
            # The sink could not take the bytes (a local write error).
            return self._fail(e)
        if rest is not None:
            self.setLineMode(rest)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._fail(BrokenReply("reply line too long"))

    def _fail(self, error: Exception) -> None:
        self._failed = Failure(error)
        self._pace.stop()
        self.transport.abortConnection()

    def _give_up(self, why: str) -> None:
        self._fail(ConnectionLostEarly(why))

    def timeoutConnection(self) -> None:
        self._give_up("timed out waiting for the server")

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.setTimeout(None)
        self._pace.stop()
        if self._failed is None:
            tls = _tls_error(reason)
            if tls is not None:
                self._failed = Failure(HandshakeFailed(f"TLS handshake failed: {tls}"))
        failure = self._failed or Failure(ConnectionLostEarly(_lost_text(self._current)))
        if self._failed is None:
            self._failed = failure
        pending = list(self._sent) + [op for _, op in self._queue]
        if self._current is not None:
            pending.insert(0, self._current)
        self._current = None
        self._sent.clear()
        self._queue.clear()
        for op in pending:
            op.abandon()
            op.deferred.errback(failure)
        if not self.closed.called:
            self.closed.callback(None)


def _lost_text(op: ReplyReader | None) -> str:
    if isinstance(op, GetReader) and op.received:
        return f"connection lost after {op.received} bytes of the file"
    return "connection lost"


def _tls_error(reason: Failure) -> str | None:
    if "OpenSSL" not in sys.modules:
        # No TLS in this process (cli.load_reactor): nothing to look for,
        # and no import of pyOpenSSL at every connection's end.
        return None
    try:
        from OpenSSL import SSL
    except ImportError:  # pragma: no cover - TLS extra not installed
        return None
    try:
        from service_identity import VerificationError
    except ImportError:  # pragma: no cover - TLS extra not installed
        pass
    else:
        if reason.check(VerificationError):
            return f"the certificate does not match the host name: {reason.value}"
    error = reason.value
    if reason.check(SSL.Error) and error is not None:
        detail = error.args[0] if error.args else error
        if isinstance(detail, list) and detail and isinstance(detail[0], tuple):
            return "; ".join(str(part[-1]) for part in detail)
        return str(detail) or "certificate rejected"
    return None
