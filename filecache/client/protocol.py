"""
The client side of the wire protocol: a Twisted protocol that sends one
request at a time and turns replies into Deferred results.
"""

from __future__ import annotations

import builtins
import hashlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IDelayedCall, IReactorTime, ITCPTransport
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from filecache import wire


class ServerError(Exception):
    """The server answered C{ERR <code> <message>}."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class BrokenReply(Exception):
    """The server broke the protocol: a malformed line, a wrong size or digest."""


class ConnectionLostEarly(Exception):
    """The connection ended, or stalled past the timeout, before the reply was whole."""


class HandshakeFailed(ConnectionLostEarly):
    """TLS could not be set up: the certificate was refused.  Not worth retrying."""


class BodySink(Protocol):
    """Where the bytes of a GET body go."""

    def begin(self, size: int, version: str) -> None:
        """The status line came: C{size} bytes of C{version} follow."""

    def write(self, data: bytes) -> None:
        """The next bytes of the body."""


@dataclass(frozen=True)
class Download:
    """A GET reply received whole and checked against its END digest."""

    size: int
    version: str
    digest: str


MAX_LIST_BYTES = 128 * 1024 * 1024
"""The most bytes of rows a LIST reply may hold, beside its
L{wire.MAX_LIST_ROWS} rows: together they bound the client's memory."""

MAX_STATS_ROWS = 10_000
"""The most rows a STATS reply may announce (a daemon sends a few dozen)."""

MIN_PROGRESS = 16 * 1024
"""Once a reply's status line is in, every C{timeout} window must bring at
least this many bytes of it, or its end."""


class _Operation:
    """One request in flight: it consumes reply lines (and raw bytes)."""

    def __init__(self) -> None:
        self.on_cancel: Callable[[_Operation], None] = lambda op: None
        self.deferred: Deferred[Any] = Deferred(lambda d: self.on_cancel(self))

    def line(self, client: FileCacheClientProtocol, line: bytes) -> bool:
        """Take a reply line; return True when the reply is complete."""
        raise NotImplementedError

    def raw(self, client: FileCacheClientProtocol, data: bytes) -> bytes | None:
        """Take raw body bytes; return what is left over once the body is whole."""
        raise BrokenReply("unexpected raw data")


def _ok(line: bytes) -> wire.Status:
    """The status line of a reply: its fields if OK, else L{ServerError}."""
    status = wire.parse_status(line)
    if not status.ok:
        raise ServerError(status.code, status.message)
    return status


class _List(_Operation):
    """
    LIST: C{OK}, rows, C{END <n>}.  An C{ERR} line in place of C{END} means
    the listing failed part-way: the rows so far are dropped and the request
    fails with that error.
    """

    def __init__(self) -> None:
        super().__init__()
        self._started = False
        self._rows: list[wire.ListRow] = []
        self._bytes = 0

    def line(self, client: FileCacheClientProtocol, line: bytes) -> bool:
        if not self._started:
            if _ok(line).fields:
                raise BrokenReply("malformed LIST status line (expected OK alone)")
            self._started = True
            return False
        count = wire.parse_list_end(line)
        if count is not None:
            if count != len(self._rows):
                raise BrokenReply(
                    f"the LIST reply ends with END {count} after {len(self._rows)} rows"
                )
            self.deferred.callback(self._rows)
            return True
        if line.startswith(b"ERR "):
            self._rows = []  # a listing cut short is no listing
            _ok(line)
        if len(self._rows) >= wire.MAX_LIST_ROWS:
            raise BrokenReply(f"the LIST reply holds more than {wire.MAX_LIST_ROWS:,} rows")
        self._bytes += len(line) + 1  # and its \n
        if self._bytes > MAX_LIST_BYTES:
            raise BrokenReply(
                f"the LIST reply holds more than {MAX_LIST_BYTES // (1024 * 1024)} MiB of rows"
            )
        self._rows.append(wire.parse_list_row(line))
        return False


class _Stats(_Operation):
    """STATS: C{OK <n>} then n C{<key> <value>} rows."""

    def __init__(self) -> None:
        super().__init__()
        self._expected: int | None = None
        self._rows: list[tuple[str, wire.StatValue]] = []

    def line(self, client: FileCacheClientProtocol, line: bytes) -> bool:
        if self._expected is None:
            self._expected = wire.parse_count(_ok(line))
            if self._expected > MAX_STATS_ROWS:
                raise BrokenReply(f"the STATS reply announces more than {MAX_STATS_ROWS:,} rows")
        else:
            self._rows.append(wire.parse_stats_row(line))
        if len(self._rows) == self._expected:
            self.deferred.callback(self._rows)
            return True
        return False


@dataclass(frozen=True)
class FileHash:
    """The reply to HASH: the whole file as the server has it now."""

    size: int
    version: str
    digest: str


class _Hash(_Operation):
    """HASH: one status line."""

    def line(self, client: FileCacheClientProtocol, line: bytes) -> bool:
        self.deferred.callback(FileHash(*wire.parse_hash_status(_ok(line))))
        return True


class _Get(_Operation):
    """GET: C{OK <size> <version>}, the body, C{END <sha256>}."""

    def __init__(self, sink: BodySink) -> None:
        super().__init__()
        self._sink = sink
        self._hash = hashlib.sha256()
        self._size = -1
        self._left = 0
        self._version = ""

    def line(self, client: FileCacheClientProtocol, line: bytes) -> bool:
        if self._size < 0:
            self._size, self._version = wire.parse_get_status(_ok(line))
            self._left = self._size
            self._sink.begin(self._size, self._version)
            if self._left:
                client.setRawMode()
            return False
        digest = wire.parse_end(line)
        if digest != self._hash.hexdigest():
            raise BrokenReply("SHA-256 of the bytes received does not match the server's END line")
        self.deferred.callback(Download(self._size, self._version, digest))
        return True

    def raw(self, client: FileCacheClientProtocol, data: bytes) -> bytes | None:
        if len(data) <= self._left:
            body, rest = data, None
        else:
            body, rest = data[: self._left], data[self._left :]
        self._left -= len(body)
        self._hash.update(body)
        self._sink.write(body)
        if self._left == 0:
            return rest or b""
        return None

    @property
    def received(self) -> int:
        return self._size - self._left if self._size >= 0 else 0


class _Pace:
    """
    What C{--timeout} bounds beyond silence: a reply's status line must be
    whole within C{period} of its request, and from then on every C{period}
    must bring at least L{MIN_PROGRESS} bytes of the reply, or its end.  A
    server that sends a byte now and then resets a silence timer for ever;
    this one it cannot.
    """

    def __init__(
        self,
        call_later: Callable[[float, Callable[[], object]], IDelayedCall],
        period: float | None,
        give_up: Callable[[str], None],
    ) -> None:
        self._call_later = call_later
        self._period = period
        self._give_up = give_up
        self._call: IDelayedCall | None = None
        self._bytes = 0

    def request_sent(self) -> None:
        self._start(self._no_status)

    def status_received(self) -> None:
        self._start(self._window_ended)

    def received(self, count: int) -> None:
        self._bytes += count

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _start(self, then: Callable[[], None]) -> None:
        self.stop()
        self._bytes = 0
        if self._period is not None:
            self._call = self._call_later(self._period, then)

    def _no_status(self) -> None:
        self._call = None
        self._give_up("timed out waiting for the server")

    def _window_ended(self) -> None:
        self._call = None
        if self._bytes < MIN_PROGRESS:
            self._give_up(
                f"the server is too slow: under {MIN_PROGRESS // 1024} KiB "
                f"in {self._period:g} s"
            )
            return
        self._start(self._window_ended)


class FileCacheClientProtocol(LineReceiver, TimeoutMixin):
    """
    A connection to a filecache daemon.  Requests are sent one at a time;
    each method returns a Deferred of the parsed reply.

    @param timeout: seconds without a byte from the server, while a reply is
        awaited, after which the connection is aborted; also the window of
        L{_Pace}'s rule (C{None}: wait forever).
    """

    delimiter = b"\n"
    MAX_LENGTH = 64 * 1024
    # Set by makeConnection, before any request can be sent.
    transport: ITCPTransport
    _log = Logger()

    def __init__(self, timeout: float | None = None, clock: IReactorTime | None = None) -> None:
        self._timeout = timeout
        self._queue: deque[tuple[bytes, _Operation]] = deque()
        self._current: _Operation | None = None
        self._failed: Failure | None = None
        self.closed: Deferred[None] = Deferred()
        """Fires when the connection is gone."""
        self._clock = clock
        self._pace = _Pace(self.callLater, timeout, self._give_up)
        self._status_seen = False

    def callLater(self, period: float, func: Callable[[], object]) -> IDelayedCall:
        # TimeoutMixin's timer runs on the injected clock, if there is one.
        if self._clock is not None:
            return self._clock.callLater(period, func)
        call: IDelayedCall = super().callLater(period, func)
        return call

    # Requests

    def list(self, cached: bool = False) -> Deferred[list[wire.ListRow]]:
        return self._request(wire.ListRequest(cached), _List())

    def stats(self) -> Deferred[builtins.list[tuple[str, wire.StatValue]]]:
        return self._request(wire.StatsRequest(), _Stats())

    def hash(self, path: str) -> Deferred[FileHash]:
        return self._request(wire.HashRequest(path), _Hash())

    def get(self, path: str, sink: BodySink, offset: int = 0) -> Deferred[Download]:
        return self._request(wire.GetRequest(path, offset), _Get(sink))

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

    def _request(self, request: wire.Request, op: _Operation) -> Deferred[Any]:
        if self._failed is not None:
            return fail(self._failed)
        op.on_cancel = self._cancelled
        self._queue.append((wire.format_request(request), op))
        self._next()
        return op.deferred

    def _next(self) -> None:
        if self._current is not None or not self._queue:
            return
        data, self._current = self._queue.popleft()
        self._status_seen = False
        self.setTimeout(self._timeout)
        self._pace.request_sent()
        self.transport.write(data)

    def _reply_done(self) -> None:
        self._current = None
        self.setTimeout(None)
        self._pace.stop()
        self._next()

    def _cancelled(self, op: _Operation) -> None:
        # Deferred.cancel fails op's Deferred with CancelledError after this.
        if op is self._current:
            # The rest of its reply may be on the way: the connection is spent.
            self._current = None
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
        if self._status_seen:
            self._pace.received(len(line) + 1)
        else:
            self._status_seen = True
            self._pace.status_received()
        try:
            done = op.line(self, line)
        except ServerError as e:
            # An ERR reply ends that request; the connection stays usable.
            self._reply_done()
            op.deferred.errback(Failure(e))
            return
        except wire.WireError as e:
            return self._fail(BrokenReply(f"malformed reply from server: {e.message}"))
        except Exception as e:  # noqa: BLE001 - any other error breaks the connection
            return self._fail(e)
        if done:
            self._reply_done()

    def rawDataReceived(self, data: bytes) -> None:
        if self._failed is not None:
            return
        op = self._current
        if op is None:
            return self._fail(BrokenReply("unexpected data from server"))
        self._pace.received(len(data))
        try:
            rest = op.raw(self, data)
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
        pending = [op for _, op in self._queue]
        if self._current is not None:
            pending.insert(0, self._current)
        self._current = None
        self._queue.clear()
        for op in pending:
            op.deferred.errback(failure)
        if not self.closed.called:
            self.closed.callback(None)


def _lost_text(op: _Operation | None) -> str:
    if isinstance(op, _Get) and op.received:
        return f"connection lost after {op.received} bytes of the file"
    return "connection lost"


def _tls_error(reason: Failure) -> str | None:
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
