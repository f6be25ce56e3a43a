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


class _Operation:
    """One request in flight: it consumes reply lines (and raw bytes)."""

    def __init__(self) -> None:
        self.deferred: Deferred[Any] = Deferred()

    def line(self, client: FileCacheClientProtocol, line: bytes) -> bool:
        """Take a reply line; return True when the reply is complete."""
        raise NotImplementedError

    def raw(self, client: FileCacheClientProtocol, data: bytes) -> bytes | None:
        """Take raw body bytes; return what is left over once the body is whole."""
        raise BrokenReply("unexpected raw data")


class _Rows(_Operation):
    """LIST and STATS: C{OK <n>} then n rows."""

    def __init__(self, parse_row: Callable[[bytes], Any]) -> None:
        super().__init__()
        self._parse_row = parse_row
        self._expected: int | None = None
        self._rows: list[Any] = []

    def line(self, client: FileCacheClientProtocol, line: bytes) -> bool:
        if self._expected is None:
            status = wire.parse_status(line)
            if not status.ok:
                raise ServerError(status.code, status.message)
            self._expected = wire.parse_count(status)
        else:
            self._rows.append(self._parse_row(line))
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
        status = wire.parse_status(line)
        if not status.ok:
            raise ServerError(status.code, status.message)
        self.deferred.callback(FileHash(*wire.parse_hash_status(status)))
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
            status = wire.parse_status(line)
            if not status.ok:
                raise ServerError(status.code, status.message)
            self._size, self._version = wire.parse_get_status(status)
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


class FileCacheClientProtocol(LineReceiver, TimeoutMixin):
    """
    A connection to a filecache daemon.  Requests are sent one at a time;
    each method returns a Deferred of the parsed reply.

    @param timeout: seconds without a byte from the server, while a reply is
        awaited, after which the connection is aborted (C{None}: wait forever).
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

    def callLater(self, period: float, func: Callable[[], object]) -> IDelayedCall:
        # TimeoutMixin's timer runs on the injected clock, if there is one.
        if self._clock is not None:
            return self._clock.callLater(period, func)
        call: IDelayedCall = super().callLater(period, func)
        return call

    # Requests

    def list(self, cached: bool = False) -> Deferred[list[wire.ListRow]]:
        return self._request(wire.ListRequest(cached), _Rows(wire.parse_list_row))

    def stats(self) -> Deferred[builtins.list[tuple[str, int]]]:
        return self._request(wire.StatsRequest(), _Rows(wire.parse_stats_row))

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
        self._queue.append((wire.format_request(request), op))
        self._next()
        return op.deferred

    def _next(self) -> None:
        if self._current is not None or not self._queue:
            return
        data, self._current = self._queue.popleft()
        self.setTimeout(self._timeout)
        self.transport.write(data)

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
        try:
            done = op.line(self, line)
        except ServerError as e:
            # An ERR reply ends that request; the connection stays usable.
            self._current = None
            self.setTimeout(None)
            op.deferred.errback(Failure(e))
            self._next()
            return
        except wire.WireError as e:
            return self._fail(BrokenReply(f"malformed reply from server: {e.message}"))
        except Exception as e:  # noqa: BLE001 - any other error breaks the connection
            return self._fail(e)
        if done:
            self._current = None
            self.setTimeout(None)
            self._next()

    def rawDataReceived(self, data: bytes) -> None:
        if self._failed is not None:
            return
        op = self._current
        if op is None:
            return self._fail(BrokenReply("unexpected data from server"))
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
        self.transport.abortConnection()

    def timeoutConnection(self) -> None:
        self._failed = Failure(ConnectionLostEarly("timed out waiting for the server"))
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.setTimeout(None)
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
