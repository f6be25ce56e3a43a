"""
The client's side of each reply: one reader per request, which takes the
reply's lines (and a GET's body) and fires the request's Deferred.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

from twisted.internet.defer import Deferred

from filecache import wire
from filecache.client.bodyhash import BodyHash, body_hash
from filecache.client.errors import BrokenReply, ServerError
from filecache.client.reply_lines import (
    parse_count,
    parse_end,
    parse_get_status,
    parse_hash_status,
    parse_list_end,
    parse_list_row,
    parse_stats_row,
    parse_status,
)


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


@dataclass(frozen=True)
class FileHash:
    """The reply to HASH: the whole file as the server has it now."""

    size: int
    version: str
    digest: str


MAX_LIST_BYTES = 128 * 1024 * 1024
"""The most bytes of rows a LIST reply may hold, beside its
L{wire.MAX_LIST_ROWS} rows: together they bound the client's memory."""

MAX_STATS_ROWS = 10_000
"""The most rows a STATS reply may announce (a daemon sends a few dozen)."""


class Next(Enum):
    """What a reader expects after the line it was given."""

    LINE = "line"
    BODY = "body"
    """Raw body bytes, as many as the status line announced."""
    DONE = "done"
    """Nothing: the reply is whole and the request's Deferred has fired."""


class ReplyReader:
    """One request in flight: it consumes reply lines (and raw bytes)."""

    def __init__(self) -> None:
        self.on_cancel: Callable[[ReplyReader], None] = lambda reader: None
        self.deferred: Deferred[Any] = Deferred(lambda d: self.on_cancel(self))

    def line(self, line: bytes, size: int) -> Next:
        """
        Take a reply line (without its C{\\r\\n} or C{\\n}) that took
        C{size} bytes on the wire; say what comes next.
        """
        raise NotImplementedError

    def raw(self, data: bytes) -> bytes | None:
        """Take raw body bytes; return what is left over once the body is whole."""
        raise BrokenReply("unexpected raw data")

    def abandon(self) -> None:
        """The reply will not be read to its end (the connection is gone): let go of what it holds."""


def ok(line: bytes) -> wire.Status:
    """The status line of a reply: its fields if OK, else L{ServerError}."""
    status = parse_status(line)
    if not status.ok:
        raise ServerError(status.code, status.message)
    return status


class ListReader(ReplyReader):
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

    def line(self, line: bytes, size: int) -> Next:
        if not self._started:
            if ok(line).fields:
                raise BrokenReply("malformed LIST status line (expected OK alone)")
            self._started = True
            return Next.LINE
        count = parse_list_end(line)
        if count is not None:
            if count != len(self._rows):
                raise BrokenReply(
                    f"the LIST reply ends with END {count} after {len(self._rows)} rows"
                )
            self.deferred.callback(self._rows)
            return Next.DONE
        if line.startswith(b"ERR "):
            self._rows = []  # a listing cut short is no listing
            ok(line)
        if len(self._rows) >= wire.MAX_LIST_ROWS:
            raise BrokenReply(f"the LIST reply holds more than {wire.MAX_LIST_ROWS:,} rows")
        self._bytes += size
        if self._bytes > MAX_LIST_BYTES:
            raise BrokenReply(
                f"the LIST reply holds more than {MAX_LIST_BYTES // (1024 * 1024)} MiB of rows"
            )
        self._rows.append(parse_list_row(line))
        return Next.LINE


class StatsReader(ReplyReader):
    """STATS: C{OK <n>} then n C{<key> <value>} rows."""

    def __init__(self) -> None:
        super().__init__()
        self._expected: int | None = None
        self._rows: list[tuple[str, wire.StatValue]] = []

    def line(self, line: bytes, size: int) -> Next:
        if self._expected is None:
            self._expected = parse_count(ok(line))
            if self._expected > MAX_STATS_ROWS:
                raise BrokenReply(f"the STATS reply announces more than {MAX_STATS_ROWS:,} rows")
        else:
            self._rows.append(parse_stats_row(line))
        if len(self._rows) == self._expected:
            self.deferred.callback(self._rows)
            return Next.DONE
        return Next.LINE


class HashReader(ReplyReader):
    """HASH: one status line."""

    def line(self, line: bytes, size: int) -> Next:
        self.deferred.callback(FileHash(*parse_hash_status(ok(line))))
        return Next.DONE


class GetReader(ReplyReader):
    """GET: C{OK <size> <version>}, the body, C{END <sha256>}."""

    def __init__(self, sink: BodySink) -> None:
        super().__init__()
        self._sink = sink
        self._hash: BodyHash = body_hash(0)
        self._size = -1
        self._left = 0
        self._version = ""

    def line(self, line: bytes, size: int) -> Next:
        if self._size < 0:
            self._size, self._version = parse_get_status(ok(line))
            self._left = self._size
            self._hash = body_hash(self._size)
            self._sink.begin(self._size, self._version)
            return Next.BODY if self._left else Next.LINE
        digest = parse_end(line)
        if digest != self._hash.hexdigest():
            raise BrokenReply("SHA-256 of the bytes received does not match the server's END line")
        self.deferred.callback(Download(self._size, self._version, digest))
        return Next.DONE

    def raw(self, data: bytes) -> bytes | None:
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

    def abandon(self) -> None:
        self._hash.abandon()

    @property
    def received(self) -> int:
        return self._size - self._left if self._size >= 0 else 0
