"""
In-memory tests of the daemon side: FileCacheProtocol and FileCacheFactory
over a real Responder, SharedFolder and FifoCache, with no sockets.
"""

from __future__ import annotations

import gc
import hashlib
import itertools
import os
import random
import re
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.internet import abstract
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import (
    MemoryReactor,
    StringTransport,
    StringTransportWithDisconnection,
)
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.protocols.basic import FileSender
from twisted.python.failure import Failure
from twisted.test import iosim
from zope.interface import implementer

from filecache import wire
from filecache.client import reply_lines
from filecache.daemon import transfer
from filecache.daemon.cache import FifoCache
from filecache.daemon.folder import FileStat, OpenedFile, SharedFolder, Unreadable
from filecache.daemon.httphead import MAX_HEADER_LINE, starts_like_http
from filecache.daemon.native import FileCacheFactory, FileCacheProtocol
from filecache.daemon.responder import Responder
from filecache.daemon.walk import FolderWalk

PEER = IPv4Address("TCP", "127.0.0.1", 12345)
MTIME_NS = 1_700_000_000_123_456_789
MTIME = MTIME_NS // 1_000_000_000
END_LEN = len(b"END ") + 64 + 2
NOT_FOUND = b"ERR not-found no such file\r\n"
TOO_LONG = b"ERR too-long request line longer than 4096 bytes\r\n"
VERSION_RE = re.compile(r"[0-9a-f]+(?:-[0-9a-f]+)*\Z")
SMALL = b"small file\r\nwith a CRLF inside\n"
BIG_SIZE = 200_000
PROTOCOL_NAMESPACE = "filecache.daemon.native.FileCacheProtocol"


# Files


def noise(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


def put(root: Path, rel: str, data: bytes, mtime_ns: int = MTIME_NS) -> Path:
    """Write C{data} to C{root/rel} with a known modification time."""
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, ns=(mtime_ns, mtime_ns))
    return path


def version_of(path: Path) -> str:
    """The version token of the file as it is on disk now."""
    return FileStat.of(os.stat(path)).version


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def get_reply(data: bytes, version: str) -> bytes:
    """A whole GET reply as docs/protocol.md spells it, written out by hand."""
    return (
        b"OK %d %s\r\n" % (len(data), version.encode("ascii"))
        + data
        + b"END "
        + sha(data).encode("ascii")
        + b"\r\n"
    )


def get_status(size: int, version: str) -> bytes:
    return b"OK %d %s\r\n" % (size, version.encode("ascii"))


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """An empty shared folder, with a sibling folder outside it."""
    shared = tmp_path / "share"
    shared.mkdir()
    (tmp_path / "outside").mkdir()
    return shared


@pytest.fixture
def hostile(root: Path) -> Path:
    """A shared folder with hidden files and ways out of it."""
    put(root, "small.txt", SMALL)
    put(root, "sub/inner.txt", b"inner\n")
    put(root, ".hidden", b"hidden\n")
    put(root, "sub/.hidden", b"hidden too\n")
    put(root, ".git/config", b"[core]\n")
    put(root.parent, "outside/secret.txt", b"secret\n")
    os.symlink("../outside/secret.txt", root / "link_out")
    os.symlink("../outside", root / "dir_out")
    os.symlink(".hidden", root / "link_hidden")
    os.symlink("small.txt", root / "link_in")
    os.mkfifo(root / "fifo")
    return root


# The daemon under test and its transports


def start(
    folder: SharedFolder | Path,
    capacity: int = 1 << 20,
    access_log: bool = True,
) -> tuple[Responder, FileCacheFactory, Clock]:
    if isinstance(folder, Path):
        folder = SharedFolder(str(folder))
    # No per-entry overhead here: these tests count the budget in content
    # bytes; tests/test_cache.py pins the overhead.
    clock = Clock()
    # settle=0: these files were all just written, and a test that wants
    # the second read of a fresh file says so (test_fresh_small_file_*).
    server = Responder(folder, FifoCache(capacity, entry_overhead=0), reactor=clock, settle=0)
    factory = FileCacheFactory(server, clock=clock, access_log=access_log)
    return server, factory, clock


class RecordingTransport(StringTransport):
    """A StringTransport from L{PEER} that also remembers every write's size."""

    def __init__(self) -> None:
        super().__init__(peerAddress=PEER)
        self.writes: list[int] = []

    def write(self, data: bytes) -> None:
        super().write(data)
        self.writes.append(len(data))


class ClosingTransport(StringTransportWithDisconnection):
    """
    A StringTransport from L{PEER} whose loseConnection tells the protocol
    at once, after marking itself disconnecting as a real transport does
    (StringTransportWithDisconnection alone leaves C{disconnecting} False,
    so LineReceiver would go on parsing buffered lines).
    """

    def __init__(self) -> None:
        super().__init__(peerAddress=PEER)

    def loseConnection(self) -> None:
        self.disconnecting = True
        super().loseConnection()


class PushbackTransport(RecordingTransport):
    """
    Emulates the send buffer of Twisted's FileDescriptor on a StringTransport
    (which never pauses anything by itself): written bytes count as unsent
    until the test lets the peer read them; a write that leaves more than
    C{buffer_size} unsent pauses a registered streaming producer; when the
    peer has read everything, a paused streaming producer or a pull producer
    is resumed, as C{FileDescriptor.doWrite} does.
    """

    buffer_size = 2**16

    def __init__(self) -> None:
        super().__init__()
        self.unsent = 0
        self.producer_paused = False

    def write(self, data: bytes) -> None:
        super().write(data)
        self.unsent += len(data)
        if self.producer is not None and self.streaming and self.unsent > self.buffer_size:
            self.producer_paused = True
            self.producer.pauseProducing()

    def peer_reads_all(self) -> bytes:
        """The peer reads every unsent byte; return those bytes."""
        data: bytes = self.value()
        self.clear()
        self.unsent = 0
        if self.producer is not None and (not self.streaming or self.producer_paused):
            self.producer_paused = False
            self.producer.resumeProducing()
        return data


class SendBufferTransport(abstract.FileDescriptor):
    """
    Twisted's own FileDescriptor (the base of tcp.Connection: its send
    buffer, bufferSize, producer pausing and resuming, all unchanged) over an
    in-memory "socket" that accepts bytes only when the test lets the peer
    read.  Reading state is visible through a MemoryReactor.
    """

    def __init__(self) -> None:
        super().__init__(MemoryReactor())
        self.connected = 1
        self.peer_received = bytearray()
        self._window = 0

    def writeSomeData(self, data: Any) -> int:
        n = min(len(data), self._window)
        self._window -= n
        self.peer_received += data[:n]
        return n

    def getPeer(self) -> IAddress:
        return PEER

    def getHost(self) -> IAddress:
        return IPv4Address("TCP", "127.0.0.1", 7000)

    def abortConnection(self) -> None:
        self.connectionLost(Failure(ConnectionLost()))

    @property
    def reading(self) -> bool:
        assert isinstance(self.reactor, MemoryReactor)
        return self in self.reactor.readers

    def peer_reads_all(self) -> None:
        """Call doWrite, as the reactor would, while the transport wants to write."""
        assert isinstance(self.reactor, MemoryReactor)
        for _ in range(10_000):
            if self not in self.reactor.writers:
                return
            self._window = 1 << 30
            self.doWrite()
        raise AssertionError("the transport never drained")


def connect(
    factory: FileCacheFactory, transport: StringTransport | None = None
) -> tuple[FileCacheProtocol, Any]:
    proto = factory.buildProtocol(PEER)
    assert isinstance(proto, FileCacheProtocol)
    if transport is None:
        transport = RecordingTransport()
    if isinstance(transport, StringTransportWithDisconnection):
        transport.protocol = proto
    proto.makeConnection(transport)
    return proto, transport


def drive(transport: StringTransport) -> int:
    """Run a registered pull producer (FileSender) until it is done; return its steps."""
    steps = 0
    while transport.producer is not None and not transport.streaming:
        transport.producer.resumeProducing()
        steps += 1
        assert steps < 10_000, "producer never finished"
    return steps


def ask(proto: FileCacheProtocol, transport: StringTransport, data: bytes) -> bytes:
    """Send C{data}, run any streamed reply to its end, and return (and clear) the output."""
    proto.dataReceived(data)
    drive(transport)
    out: bytes = transport.value()
    transport.clear()
    return out


def peer_disconnects(transport: StringTransport, proto: FileCacheProtocol) -> None:
    """
    What tcp.Connection does when the peer goes away: the transport stops
    its producer, then tells the protocol.
    """
    transport.connected = False
    producer, transport.producer = transport.producer, None
    if producer is not None:
        producer.stopProducing()
    proto.connectionLost(Failure(ConnectionLost("peer went away")))


def parse_rows(reply: bytes) -> list[bytes]:
    """The rows of an C{OK <n>} reply, checking that n matches."""
    assert reply.endswith(b"\r\n")
    status, *rows = reply[:-2].split(b"\r\n")
    if status == b"OK":
        end = rows.pop()
        assert end == b"END %d" % (len(rows),)
        return rows
    assert status == b"OK %d" % (len(rows),)
    return rows


def sorted_list(reply: bytes) -> bytes:
    """A LIST reply with its rows sorted by path, to compare with a literal."""
    status, *rows, end = reply[:-2].split(b"\r\n")
    rows.sort(key=lambda row: wire.unquote_path(row.split(b" ")[3]).encode("utf-8"))
    return b"\r\n".join([status, *rows, end]) + b"\r\n"


def parse_stats(reply: bytes) -> dict[str, int]:
    rows = parse_rows(reply)
    stats = {}
    for row in rows:
        key, value = row.split(b" ")
        if key not in (b"version", b"cache_policy"):
            stats[key.decode()] = int(value)
    assert len(stats) == len(rows) - 2, "duplicate STATS keys"
    return stats


def stats_of(factory: FileCacheFactory) -> dict[str, int]:
    """STATS as a fresh client sees it (which counts as one more connection)."""
    proto, transport = connect(factory, ClosingTransport())
    reply = ask(proto, transport, b"STATS\r\n")
    transport.loseConnection()
    return parse_stats(reply)


@pytest.fixture
def protocol_events() -> Iterator[list[dict[str, Any]]]:
    """Every log event emitted by FileCacheProtocol while the test runs."""
    events: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == PROTOCOL_NAMESPACE:
            events.append(event)

    # A plain function is an observer: zope.interface cannot declare that
    # in a way mypy sees, so Twisted's own typed code casts it too.
    observer = cast(ILogObserver, observe)
    globalLogPublisher.addObserver(observer)
    yield events
    globalLogPublisher.removeObserver(observer)


def access_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if "request" in e and "cache" in e]


ACCESS_FIELDS = ("peer", "request", "status", "size", "cache")


def access(event: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(event[k] for k in ACCESS_FIELDS)


# LIST


def test_list_rows_format_and_byte_order(root: Path) -> None:
    """
    LIST sends `OK`, one `<size> <mtime> - <path>` row per shared regular
    file, recursively, percent-encoded, in the walk's order, then `END <n>`;
    hidden files, directories, FIFOs and symlinks leading outside are left
    out, and a symlink inside is listed with its target's size and mtime.
    (Sorted here by the path's UTF-8 bytes to compare.)
    """
    sizes = {
        "b.txt": 3, "a.txt": 4, "B.txt": 5, "my notes.txt": 6, "é.txt": 7,
        "sub/x.txt": 8, "sub-a.txt": 9, "sub0.txt": 10,
    }
    for i, (rel, size) in enumerate(sizes.items()):
        put(root, rel, b"x" * size, MTIME_NS + i * 1_000_000_000)
    put(root, ".hidden", b"h")
    put(root, "sub/.h", b"h")
    (root / "emptydir").mkdir()
    os.mkfifo(root / "fifo")
    put(root.parent, "outside/secret.txt", b"s")
    os.symlink("../outside/secret.txt", root / "link_out")
    os.symlink("a.txt", root / "link_in")
    _, factory, _ = start(root)
    proto, transport = connect(factory)

    out = sorted_list(ask(proto, transport, b"LIST\r\n"))

    assert out == (
        b"OK\r\n"
        b"5 %d - B.txt\r\n" % (MTIME + 2,)
        + b"4 %d - a.txt\r\n" % (MTIME + 1,)
        + b"3 %d - b.txt\r\n" % (MTIME + 0,)
        + b"4 %d - link_in\r\n" % (MTIME + 1,)
        + b"6 %d - my%%20notes.txt\r\n" % (MTIME + 3,)
        + b"9 %d - sub-a.txt\r\n" % (MTIME + 6,)
        + b"8 %d - sub/x.txt\r\n" % (MTIME + 5,)
        + b"10 %d - sub0.txt\r\n" % (MTIME + 7,)
        + b"7 %d - %%C3%%A9.txt\r\n" % (MTIME + 4,)
        + b"END 9\r\n"
    )


def test_list_marks_cached_files_with_c_until_they_change(root: Path) -> None:
    """
    After a GET caches a file, LIST marks exactly that file `C`; once the
    file changes on disk (not fetched again) its row goes back to `-`.
    """
    put(root, "a.txt", b"aaaa")
    put(root, "b.txt", b"bbb")
    _, factory, _ = start(root)
    proto, transport = connect(factory)

    before = ask(proto, transport, b"LIST\r\n")
    ask(proto, transport, b"GET a.txt\r\n")
    cached = ask(proto, transport, b"LIST\r\n")
    put(root, "a.txt", b"AAAA", MTIME_NS + 5_000_000_000)
    changed = ask(proto, transport, b"LIST\r\n")

    assert sorted_list(before) == b"OK\r\n4 %d - a.txt\r\n3 %d - b.txt\r\nEND 2\r\n" % (MTIME, MTIME)
    assert sorted_list(cached) == b"OK\r\n4 %d C a.txt\r\n3 %d - b.txt\r\nEND 2\r\n" % (MTIME, MTIME)
    assert sorted_list(changed) == (
        b"OK\r\n4 %d - a.txt\r\n3 %d - b.txt\r\nEND 2\r\n" % (MTIME + 5, MTIME)
    )


def test_list_cached_is_oldest_first_and_fifo(root: Path) -> None:
    """
    LIST CACHED lists only cached files, oldest inserted first, every row
    `C`; a hit does not move an entry; when the budget is exceeded the
    oldest entry is evicted first.
    """
    put(root, "c.txt", b"ccc", MTIME_NS)
    put(root, "a.txt", b"aaaa", MTIME_NS + 1_000_000_000)
    put(root, "b.txt", b"bbbbb", MTIME_NS + 2_000_000_000)
    put(root, "d.txt", b"dd", MTIME_NS + 3_000_000_000)
    _, factory, _ = start(root, capacity=12)
    proto, transport = connect(factory)

    assert ask(proto, transport, b"LIST CACHED\r\n") == b"OK\r\nEND 0\r\n"
    ask(proto, transport, b"GET c.txt\r\nGET a.txt\r\nGET b.txt\r\nGET c.txt\r\n")
    three = ask(proto, transport, b"LIST CACHED\r\n")
    ask(proto, transport, b"GET d.txt\r\n")
    evicted = ask(proto, transport, b"list cached\r\n")

    assert three == (
        b"OK\r\n3 %d C c.txt\r\n4 %d C a.txt\r\n5 %d C b.txt\r\nEND 3\r\n"
        % (MTIME, MTIME + 1, MTIME + 2)
    )
    assert evicted == (
        b"OK\r\n4 %d C a.txt\r\n5 %d C b.txt\r\n2 %d C d.txt\r\nEND 3\r\n"
        % (MTIME + 1, MTIME + 2, MTIME + 3)
    )
    stats = stats_of(factory)
    assert (stats["hits"], stats["misses"], stats["evictions"]) == (1, 4, 1)
    assert (stats["cache_files"], stats["cache_bytes"]) == (3, 11)


def test_list_error_when_the_folder_cannot_be_listed(root: Path) -> None:
    """A LIST that fails in the folder layer is `ERR unavailable` and the connection goes on."""

    put(root, "a.txt", b"a")

    class Broken(SharedFolder):
        def walk(self, **bounds: int) -> FolderWalk:
            walk = super().walk(**bounds)

            def fail(*args: object, **kw: object) -> None:
                raise OSError(5, "Input/output error")

            walk.next_rows = fail  # type: ignore[method-assign]
            return walk

    _, factory, _ = start(Broken(str(root)))
    proto, transport = connect(factory)

    out = ask(proto, transport, b"LIST\r\nLIST CACHED\r\n")

    # The status line has gone out before the walk fails: an ERR line takes
    # the place of END, and the connection goes on.
    assert out == (
        b"OK\r\nERR unavailable listing stopped: cannot list the shared folder\r\n"
        b"OK\r\nEND 0\r\n"
    )


# STATS and QUIT


def test_stats_keys_and_counters(root: Path) -> None:
    """
    STATS sends `OK 20` and the documented keys with exact values:
    hits/misses/bytes_sent/requests follow GETs, and connections_active /
    connections_total follow connections opening and closing.
    """
    put(root, "a.txt", b"aaaa")
    _, factory, _ = start(root, capacity=1000)
    one, t1 = connect(factory, ClosingTransport())

    reply = ask(one, t1, b"STATS\r\n")
    assert reply.startswith(b"OK 20\r\n") and b"\r\ncache_policy fifo\r\n" in reply
    first = parse_stats(reply)
    ask(one, t1, b"GET a.txt\r\nGET a.txt\r\n")
    two, t2 = connect(factory, ClosingTransport())
    second = parse_stats(ask(two, t2, b"STATS\r\n"))
    t1.loseConnection()
    third = parse_stats(ask(two, t2, b"Stats\r\n"))

    zero = {
        "cache_bytes": 0, "cache_capacity": 1000, "cache_files": 0, "hits": 0,
        "misses": 0, "evictions": 0, "connections_active": 1, "connections_total": 1,
        "bytes_sent": 0, "requests": 1, "http_requests": 0, "uptime_seconds": 0, "worker": 0,
        "pid": os.getpid(), "freshness_stats": 0, "freshness_watched_files": 0,
        "freshness_watched_folders": 0, "freshness_overflows": 0,
    }
    assert first == zero
    # The hit was checked with one stat (these tests run --freshness stat).
    assert second == dict(zero, cache_bytes=4, cache_files=1, hits=1, misses=1,
                          connections_active=2, connections_total=2, bytes_sent=8,
                          requests=4, freshness_stats=1)
    assert third == dict(second, connections_active=1, requests=5)


def test_quit_closes_without_a_reply(root: Path) -> None:
    """
    QUIT (any case) gets no reply; the server closes gracefully (not an
    abort), answers what came before it and nothing after it.
    """
    _, factory, _ = start(root)
    proto, transport = connect(factory, ClosingTransport())

    proto.dataReceived(b"LIST CACHED\r\nquit\r\nSTATS\r\n")

    assert transport.value() == b"OK\r\nEND 0\r\n"
    assert transport.disconnecting is True
    assert transport.disconnected is False
    assert factory.admission.connections_active == 0
    assert factory.admission.connections_total == 1


# GET


@pytest.mark.parametrize("size", [0, 1000, 65536])
def test_get_small_file_is_one_inline_write(root: Path, size: int) -> None:
    """
    A file of at most 64 KiB is answered `OK <size> <version>`, its exact
    bytes and `END <sha256>` in one single write, with no producer.
    """
    data = noise(size)
    path = put(root, "f.bin", data)
    _, factory, _ = start(root)
    proto, transport = connect(factory)

    proto.dataReceived(b"GET f.bin\r\n")

    expected = get_reply(data, version_of(path))
    assert transport.value() == expected
    assert transport.writes == [len(expected)]
    assert transport.streaming is True  # only the send-buffer gate is registered
    assert not isinstance(transport.producer, FileSender)
    assert VERSION_RE.match(version_of(path))


def test_get_large_file_is_streamed_in_bounded_writes(root: Path) -> None:
    """
    A file over 64 KiB: the status line is written alone, then the body by
    a producer in writes of at most 64 KiB, then END with the SHA-256 of
    exactly the body bytes.
    """
    data = noise(BIG_SIZE)
    path = put(root, "big.bin", data)
    _, factory, _ = start(root)
    proto, transport = connect(factory)

    proto.dataReceived(b"GET big.bin\r\n")
    status_only = transport.value()
    steps = drive(transport)

    assert status_only == get_status(BIG_SIZE, version_of(path))
    assert transport.value() == get_reply(data, version_of(path))
    assert steps == 5  # four 64 KiB reads and the one that finds the end
    assert max(transport.writes) <= 64 * 1024
    assert transport.writes[0] == len(status_only)


def test_get_just_over_inline_limit_is_streamed(root: Path) -> None:
    """A 65537-byte file is no longer inline: the first write is the status line alone."""
    data = noise(65537)
    path = put(root, "f.bin", data)
    _, factory, _ = start(root)
    proto, transport = connect(factory)

    proto.dataReceived(b"GET f.bin\r\n")

    assert transport.value() == get_status(65537, version_of(path))
    assert isinstance(transport.producer, FileSender)
    drive(transport)
    assert transport.value() == get_reply(data, version_of(path))


def test_get_large_file_over_iosim(root: Path) -> None:
    """
    Over iosim (which runs pull producers as a reactor would), a pipelined
    GET of a large file, GET of a small one and QUIT arrive whole and in
    order, and the connection is then closed on both sides.
    """
    big = noise(BIG_SIZE)
    big_path = put(root, "big.bin", big)
    small_path = put(root, "small.txt", SMALL)
    server, factory, _ = start(root)

    class Collector(Protocol):
        def __init__(self) -> None:
            self.received = bytearray()
            self.lost = False

        def dataReceived(self, data: bytes) -> None:
            self.received += data

        def connectionLost(self, reason: Failure | None = None) -> None:
            self.lost = True

    client, _, pump = iosim.connectedServerAndClient(
        lambda: factory.buildProtocol(PEER), Collector
    )
    assert client.transport is not None
    client.transport.write(b"GET big.bin\r\nGET small.txt\r\nQUIT\r\n")
    pump.flush()

    assert bytes(client.received) == (
        get_reply(big, version_of(big_path)) + get_reply(SMALL, version_of(small_path))
    )
    assert client.lost is True
    assert factory.admission.connections_active == 0
    assert server.counters.bytes_sent == BIG_SIZE + len(SMALL)


@pytest.mark.parametrize("offset", [0, 1, 500, 999, 1000])
def test_get_small_file_with_offset(root: Path, offset: int) -> None:
    """
    `GET <path> <offset>` sends the bytes from offset on, `OK <size-offset>`
    and END with the digest of the bytes sent; offset == size gives an
    empty body with the digest of nothing.
    """
    data = noise(1000)
    path = put(root, "f.bin", data)
    _, factory, _ = start(root)
    proto, transport = connect(factory)

    out = ask(proto, transport, b"GET f.bin %d\r\n" % (offset,))

    assert out == get_reply(data[offset:], version_of(path))


@pytest.mark.parametrize("offset", [0, 1, 100_000, 134_465, 199_999, 200_000])
@pytest.mark.parametrize("cached", [False, True], ids=["from-disk", "from-cache"])
def test_get_large_file_with_offset(root: Path, offset: int, cached: bool) -> None:
    """
    Offsets into a large file, read from disk or from the cache (large
    remainders streamed from memory, small ones inline): exact status, exact
    bytes, digest of the bytes sent; offset == size gives an empty body.
    """
    data = noise(BIG_SIZE)
    path = put(root, "big.bin", data)
    _, factory, _ = start(root)
    proto, transport = connect(factory)
    if cached:
        ask(proto, transport, b"GET big.bin\r\n")

    out = ask(proto, transport, b"GET big.bin %d\r\n" % (offset,))

    assert out == get_reply(data[offset:], version_of(path))
    stats = stats_of(factory)
    assert (stats["hits"], stats["misses"]) == ((1, 1) if cached else (0, 1))


@pytest.mark.parametrize("size", [10, BIG_SIZE])
def test_get_offset_past_the_end_is_bad_request(root: Path, size: int) -> None:
    """An offset of size + 1 (or absurdly large) is `ERR bad-request` and the connection goes on."""
    put(root, "f.bin", noise(size))
    _, factory, _ = start(root)
    proto, transport = connect(factory)

    out = ask(
        proto, transport,
        b"GET f.bin %d\r\nGET f.bin 99999999999999999999\r\nLIST CACHED\r\n" % (size + 1,),
    )

    past = b"ERR bad-request offset past the end of the file\r\n"
    assert out == past + past + b"OK\r\nEND 0\r\n"
    assert transport.disconnecting is False


@pytest.mark.parametrize("size", [1000, BIG_SIZE])
def test_second_get_is_a_cache_hit(root: Path, size: int, protocol_events: list[dict[str, Any]]) -> None:
    """
    The second GET of a file that fits the cache is served from memory:
    same bytes and version, STATS hits 1 / misses 1, access log `miss` then
    `hit`, and no file descriptor is opened for the body.
    """
    data = noise(size)
    path = put(root, "f.bin", data)
    _, factory, _ = start(root)
    proto, transport = connect(factory)

    first = ask(proto, transport, b"GET f.bin\r\n")
    proto.dataReceived(b"GET f.bin\r\n")
    second = transport.value()  # no driving: a hit needs no pull producer

    assert first == second == get_reply(data, version_of(path))
    stats = stats_of(factory)
    assert (stats["hits"], stats["misses"], stats["cache_files"]) == (1, 1, 1)
    assert stats["cache_bytes"] == size
    assert stats["bytes_sent"] == 2 * size
    assert [e["cache"] for e in access_events(protocol_events)] == ["miss", "hit", "-"]


@pytest.mark.parametrize("size, capacity", [(1000, 999), (BIG_SIZE, 100_000)])
def test_file_larger_than_cache_is_served_whole_and_never_cached(
    root: Path, size: int, capacity: int
) -> None:
    """
    A file bigger than the whole cache is sent whole every time and never
    cached: every GET is a miss, LIST CACHED stays empty.
    """
    data = noise(size)
    path = put(root, "f.bin", data)
    _, factory, _ = start(root, capacity=capacity)
    proto, transport = connect(factory)

    first = ask(proto, transport, b"GET f.bin\r\n")
    second = ask(proto, transport, b"GET f.bin\r\n")
    cached = ask(proto, transport, b"LIST CACHED\r\n")

    assert first == second == get_reply(data, version_of(path))
    assert cached == b"OK\r\nEND 0\r\n"
    stats = stats_of(factory)
    assert (stats["hits"], stats["misses"], stats["cache_files"], stats["cache_bytes"]) == (
        0, 2, 0, 0,
    )


@pytest.mark.parametrize("size", [1000, BIG_SIZE])
def test_file_changed_between_gets_is_served_fresh(root: Path, size: int) -> None:
    """
    A file rewritten on disk (same size, new content, new mtime) between two
    GETs is served fresh with a new version token; the stale cache entry is
    evicted and replaced by the new content, which the next GET hits.
    """
    old, new = noise(size, seed=1), noise(size, seed=2)
    path = put(root, "f.bin", old)
    v1 = version_of(path)
    _, factory, _ = start(root)
    proto, transport = connect(factory)

    first = ask(proto, transport, b"GET f.bin\r\n")
    put(root, "f.bin", new, MTIME_NS + 7_000_000_000)
    v2 = version_of(path)
    second = ask(proto, transport, b"GET f.bin\r\n")
    cached = ask(proto, transport, b"LIST CACHED\r\n")
    third = ask(proto, transport, b"GET f.bin\r\n")

    assert v1 != v2
    assert first == get_reply(old, v1)
    assert second == third == get_reply(new, v2)
    assert cached == b"OK\r\n%d %d C f.bin\r\nEND 1\r\n" % (size, MTIME + 7)
    stats = stats_of(factory)
    assert (stats["hits"], stats["misses"], stats["evictions"]) == (1, 2, 1)
    assert (stats["cache_files"], stats["cache_bytes"]) == (1, size)


def test_get_of_a_file_changing_while_read_inline_is_unavailable(root: Path) -> None:
    """
    A small file that shrinks between open and read is `ERR unavailable`
    (never a short body), nothing is cached, its descriptor is closed and
    the connection goes on.
    """

    class ShrinkAfterOpen(SharedFolder):
        def open(self, path: str) -> OpenedFile:
            opened = super().open(path)
            os.truncate(opened.real, 1)
            return opened

    put(root, "f.bin", noise(1000))
    _, factory, _ = start(ShrinkAfterOpen(str(root)))
    proto, transport = connect(factory)
    fds = open_fds()

    out = ask(proto, transport, b"GET f.bin\r\nLIST CACHED\r\n")

    assert out == (
        b"ERR unavailable cannot read file: file changed while being read; try again\r\n"
        b"OK\r\nEND 0\r\n"
    )
    assert open_fds() == fds


def test_unreadable_and_internal_errors_are_unavailable(root: Path) -> None:
    """
    An Unreadable from the folder (e.g. out of descriptors) is `ERR
    unavailable <strerror>`; any other exception is `ERR unavailable
    internal error`; the connection answers the next request either way.
    """

    class Failing(SharedFolder):
        def open(self, path: str) -> OpenedFile:
            if path == "emfile":
                raise Unreadable(path, OSError(24, "Too many open files"))
            raise RuntimeError("bug")

    _, factory, _ = start(Failing(str(root)))
    proto, transport = connect(factory)

    out = ask(proto, transport, b"GET emfile\r\nGET other\r\nLIST CACHED\r\n")

    assert out == (
        b"ERR unavailable cannot read file: Too many open files\r\n"
        b"ERR unavailable internal error\r\n"
        b"OK\r\nEND 0\r\n"
    )


# ERR replies


class RecordingFolder(SharedFolder):
    """
    A SharedFolder that records, for every file it opens, the path the
    kernel gives for the open descriptor.
    """

    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.opened: list[str] = []

    def open(self, path: str) -> OpenedFile:
        opened = super().open(path)
        self.opened.append(os.readlink(f"/proc/self/fd/{opened.fd}"))
        return opened


HOSTILE_PATHS = [
    b"nope.txt",
    b"../outside/secret.txt",
    b"%2e%2e/outside/secret.txt",
    b"%2E%2E%2Foutside%2Fsecret.txt",
    b"sub/../../outside/secret.txt",
    b"sub/../small.txt",
    b"./small.txt",
    b"/etc/passwd",
    b"%2Fetc%2Fpasswd",
    b".hidden",
    b"sub/.hidden",
    b".git/config",
    b"link_out",
    b"dir_out/secret.txt",
    b"link_hidden",
    b"sub",
    b"fifo",
    b"small.txt%00",
    b"sub%5Cinner.txt",
    b"sub//inner.txt",
    b"small.txt/",
]


@pytest.mark.parametrize("path", HOSTILE_PATHS)
def test_missing_and_hostile_paths_are_not_found(hostile: Path, path: bytes) -> None:
    """
    Missing files, `..`, absolute paths, hidden components, symlinks leading
    out or into hidden files, directories, FIFOs, NUL, backslash and empty
    components (also percent-encoded) are all `ERR not-found no such file`,
    nothing is opened, and the connection stays open.
    """
    folder = RecordingFolder(str(hostile))
    _, factory, _ = start(folder)
    proto, transport = connect(factory)

    out = ask(proto, transport, b"GET " + path + b"\r\n")

    assert out == NOT_FOUND
    assert folder.opened == []
    assert transport.disconnecting is False


def test_symlink_inside_the_folder_is_served(hostile: Path) -> None:
    """A symlink to a shared file inside the folder serves that file (the control for the above)."""
    folder = RecordingFolder(str(hostile))
    _, factory, _ = start(folder)
    proto, transport = connect(factory)

    out = ask(proto, transport, b"GET link_in\r\nGET %73ub/inner%2etxt\r\n")

    assert out == (
        get_reply(SMALL, version_of(hostile / "small.txt"))
        + get_reply(b"inner\n", version_of(hostile / "sub/inner.txt"))
    )
    real_root = os.path.realpath(hostile)
    assert folder.opened == [
        os.path.join(real_root, "small.txt"), os.path.join(real_root, "sub/inner.txt")
    ]


@pytest.mark.parametrize(
    "line, message",
    [
        (b"FOO", b"unknown command 'FOO'"),
        (b"foo bar", b"unknown command 'FOO'"),
        (b"", b"empty request"),
        (b"GET", b"usage: GET <path> [<offset>]"),
        (b"GET ", b"usage: GET <path> [<offset>]"),
        (b"GET  small.txt", b"usage: GET <path> [<offset>]"),
        (b"GET small.txt 1 2", b"usage: GET <path> [<offset>]"),
        (b"GET small.txt -1", b"offset must be a non-negative integer"),
        (b"GET small.txt 1x", b"offset must be a non-negative integer"),
        (b"GET small.txt " + b"1" * 21, b"offset must be a non-negative integer"),
        (b"GET %4", b"malformed percent escape"),
        (b"GET %zz", b"malformed percent escape"),
        (b"GET %FF", b"path is not UTF-8"),
        (b"LIST foo", b"usage: LIST [CACHED]"),
        (b"STATS now", b"STATS takes no arguments"),
        (b"QUIT now", b"QUIT takes no arguments"),
    ],
)
def test_malformed_requests_are_bad_request(
    hostile: Path, line: bytes, message: bytes
) -> None:
    """
    Unknown verbs, wrong arguments, bad offsets and malformed escapes get
    `ERR bad-request <text>`, and the next request on the connection is
    still answered.
    """
    _, factory, _ = start(hostile)
    proto, transport = connect(factory)

    out = ask(proto, transport, line + b"\r\nLIST CACHED\r\n")

    assert out == b"ERR bad-request " + message + b"\r\nOK\r\nEND 0\r\n"
    assert transport.disconnecting is False


def test_connection_answers_after_errors(hostile: Path) -> None:
    """After not-found, bad-request and unavailable replies, the same connection serves a GET."""
    _, factory, _ = start(hostile)
    proto, transport = connect(factory)

    out = ask(proto, transport, b"GET nope\r\nFOO\r\nGET small.txt 99\r\nget small.txt\r\n")

    assert out == (
        NOT_FOUND
        + b"ERR bad-request unknown command 'FOO'\r\n"
        + b"ERR bad-request offset past the end of the file\r\n"
        + get_reply(SMALL, version_of(hostile / "small.txt"))
    )


@pytest.mark.parametrize(
    "data",
    [
        b"GET " + b"a" * 4093 + b"\nSTATS\r\n",  # 4097 bytes: parsed, then refused
        b"GET " + b"a" * 4093 + b"\r\nSTATS\r\n",  # 4097 + \r\n: over LineReceiver's limit
        b"G" * 5000 + b"\r\nSTATS\r\n",
        b"G" * 4098,  # no terminator yet, but already too long
    ],
    ids=["4097-lf", "4097-crlf", "5000-crlf", "4098-unterminated"],
)
def test_too_long_line_is_refused_and_closes(root: Path, data: bytes, protocol_events: list[dict[str, Any]]) -> None:
    """
    A request line over 4096 bytes (not counting \\r\\n), or 4098 bytes
    with no terminator yet, is answered `ERR too-long` and the connection is
    closed (gracefully); a request pipelined after it is not answered.
    """
    _, factory, _ = start(root)
    proto, transport = connect(factory)

    proto.dataReceived(b"LIST CACHED\r\n" + data)

    assert transport.value() == b"OK\r\nEND 0\r\n" + TOO_LONG
    assert transport.disconnecting is True
    assert transport.disconnected is False
    assert [e["status"] for e in access_events(protocol_events)] == ["OK", "ERR too-long"]


def test_line_of_exactly_4096_bytes_is_served(root: Path) -> None:
    """
    A 4096-byte request line plus \\r\\n is within the limit: a GET whose
    percent-encoded path makes the line exactly 4096 bytes is served.
    """
    rel = "/".join(["d" * 200] * 6 + ["f" * 158])
    assert len(rel) == 1364
    data = b"deep file\n"
    path = put(root, rel, data)
    encoded = "".join(f"%{b:02X}" for b in rel.encode()).encode()
    line = b"GET " + encoded
    assert len(line) == 4096
    _, factory, _ = start(root)
    proto, transport = connect(factory)

    out = ask(proto, transport, line + b"\r\nSTATS\r\n")

    assert out.startswith(get_reply(data, version_of(path)) + b"OK 20\r\n")
    assert transport.disconnecting is False


# Pipelining and backpressure


def test_pipelined_requests_are_answered_in_order(hostile: Path) -> None:
    """Several requests in one dataReceived call get their replies in order, whole."""
    _, factory, _ = start(hostile)
    proto, transport = connect(factory)

    out = ask(
        proto, transport,
        b"GET small.txt\r\nGET nope\r\nLIST CACHED\r\nGET sub/inner.txt 2\nSTATS\r\n",
    )

    head = (
        get_reply(SMALL, version_of(hostile / "small.txt"))
        + NOT_FOUND
        + b"OK\r\n%d %d C small.txt\r\nEND 1\r\n" % (len(SMALL), MTIME)
        + get_reply(b"ner\n", version_of(hostile / "sub/inner.txt"))
    )
    assert out[: len(head)] == head
    stats = parse_stats(out[len(head):])
    assert (stats["requests"], stats["misses"], stats["bytes_sent"]) == (5, 2, len(SMALL) + 4)


def test_no_request_is_read_while_a_reply_streams(root: Path) -> None:
    """
    While a streamed reply is in progress the protocol is paused (and has
    paused the transport's reading); buffered requests are answered only
    once the body and its END are out.
    """
    big = noise(BIG_SIZE)
    big_path = put(root, "big.bin", big)
    put(root, "small.txt", SMALL)
    _, factory, _ = start(root)
    proto, transport = connect(factory)

    proto.dataReceived(b"GET big.bin\r\nGET small.txt\r\nSTATS\r\n")
    after_line = transport.value()
    paused_then = (proto.paused, transport.producerState)
    transport.producer.resumeProducing()
    after_step = transport.value()
    drive(transport)
    out = transport.value()

    status = get_status(BIG_SIZE, version_of(big_path))
    assert after_line == status
    assert paused_then == (True, "paused")
    assert after_step == status + big[: 64 * 1024]
    head = get_reply(big, version_of(big_path)) + get_reply(SMALL, version_of(root / "small.txt"))
    assert out[: len(head)] == head
    assert parse_stats(out[len(head):])["requests"] == 3
    assert (proto.paused, transport.producerState) == (False, "producing")


def test_client_that_never_reads_is_not_read_from(root: Path) -> None:
    """
    A client pipelining 2,000 GETs in one go without reading: the protocol
    stops processing lines (and pauses reading) once the transport pauses
    its registered producer because >64 KiB wait unsent, so the replies
    written are bounded; each time the peer reads everything another
    bounded batch goes out, until all 2,000 are answered.

    StringTransport never pauses producers, so PushbackTransport emulates
    FileDescriptor's send buffer (pause the streaming producer on a write
    leaving > 64 KiB unsent, resume it once everything was read).
    """
    data = noise(1000)
    path = put(root, "small.txt", data)
    reply = get_reply(data, version_of(path))
    per_batch = 2**16 // len(reply) + 1  # the write that goes over 64 KiB is the last
    _, factory, _ = start(root)
    transport = PushbackTransport()
    proto, _ = connect(factory, transport)

    proto.dataReceived(b"GET small.txt\r\n" * 2000)
    state = (proto.paused, transport.producerState)
    batches = []
    while batch := transport.peer_reads_all():
        batches.append(batch)
        assert len(batches) <= 2000

    assert state == (True, "paused")
    assert 2000 // per_batch >= 10  # the bound matters: many batches, not one
    full, last = divmod(2000, per_batch)
    assert batches == [reply * per_batch] * full + [reply * last]
    assert factory.responder.counters.requests == 2000


def test_streamed_reply_that_fills_the_send_buffer_does_not_stall_the_connection(
    root: Path,
) -> None:
    """
    With Twisted's real FileDescriptor send buffer: pipelined `GET near.bin`
    (an inline reply of exactly 64 KiB, which fills the buffer without
    pausing anything), `GET big.bin` (streamed; its status line pushes the
    buffer over 64 KiB, so the transport pauses the send-buffer gate) and
    `STATS`.  Once the client has read everything, STATS must be answered
    and the connection must be reading again.
    """
    big = noise(BIG_SIZE)
    big_path = put(root, "big.bin", big)
    near_path = put(root, "near.bin", b"n" * 60_000)
    status_len = len(get_status(60_000, version_of(near_path)))
    size = 2**16 - END_LEN - status_len
    put(root, "near.bin", b"n" * size)  # same inode and mtime: same status length
    near_reply = get_reply(b"n" * size, version_of(near_path))
    assert len(near_reply) == 2**16  # a precondition, not the test
    _, factory, _ = start(root, capacity=0)
    proto = factory.buildProtocol(PEER)
    assert isinstance(proto, FileCacheProtocol)
    transport = SendBufferTransport()
    proto.makeConnection(transport)
    transport.startReading()

    proto.dataReceived(b"GET near.bin\r\nGET big.bin\r\nSTATS\r\n")
    transport.peer_reads_all()

    received = bytes(transport.peer_received)
    head = near_reply + get_reply(big, version_of(big_path))
    assert received[: len(head)] == head
    rest = received[len(head):]
    assert rest != b"", (
        "STATS never answered: the protocol is still paused "
        f"(paused={proto.paused}, reading={transport.reading})"
    )
    stats = parse_stats(rest)
    assert (stats["requests"], stats["misses"], stats["bytes_sent"]) == (3, 2, size + BIG_SIZE)
    assert proto.paused is False
    assert transport.reading is True


# Files that change while streamed, clients that leave


@pytest.mark.parametrize("change", ["shrink", "rewrite"])
def test_file_changed_while_streamed_is_cut_off(
    root: Path, change: str, protocol_events: list[dict[str, Any]]
) -> None:
    """
    A file that shrinks (truncated between producer steps) or is rewritten
    at the same size while being streamed: no END line is written, the
    connection is aborted, the torn content is not cached, the descriptor
    is closed and the access log says `cut`.
    """
    data = noise(BIG_SIZE)
    path = put(root, "big.bin", data)
    status = get_status(BIG_SIZE, version_of(path))
    server, factory, _ = start(root)
    gc.collect()  # folders of earlier tests, each holding a descriptor, go now and not below
    fds = open_fds()
    proto, transport = connect(factory)

    proto.dataReceived(b"GET big.bin\r\n")
    transport.producer.resumeProducing()
    if change == "shrink":
        os.truncate(path, 100_000)
        sent = data[:100_000]
    else:
        put(root, "big.bin", noise(BIG_SIZE, seed=9), MTIME_NS + 1_000_000_000)
        sent = data[: 64 * 1024] + noise(BIG_SIZE, seed=9)[64 * 1024:]
    drive(transport)

    assert transport.value() == status + sent
    assert transport.disconnected is True  # abortConnection, not loseConnection
    assert server.cache.peek("big.bin") is None
    assert len(server.cache) == 0
    assert open_fds() == fds
    # The log and bytes_sent count the body bytes that went out (item 13).
    assert [access(e) for e in access_events(protocol_events)] == [
        ("127.0.0.1:12345", "GET big.bin", "cut", len(sent), "miss")
    ]
    assert server.counters.bytes_sent == len(sent)
    assert stats_of(factory)["cache_files"] == 0


def test_client_leaving_mid_stream_from_disk(root: Path, protocol_events: list[dict[str, Any]]) -> None:
    """
    The peer goes away during a streamed reply from disk: nothing raises,
    the server releases the body (the file descriptor is closed), the
    access log says `cut`, connections_active drops back, nothing is cached
    and no unhandled error is left in a Deferred.
    """
    put(root, "big.bin", noise(BIG_SIZE))
    server, factory, _ = start(root)
    gc.collect()  # folders of earlier tests, each holding a descriptor, go now and not below
    fds = open_fds()
    proto, transport = connect(factory)

    proto.dataReceived(b"GET big.bin\r\n")
    transport.producer.resumeProducing()
    during = open_fds()
    peer_disconnects(transport, proto)
    gc.collect()

    assert during == fds + 1
    assert open_fds() == fds
    assert factory.admission.connections_active == 0
    # The one chunk handed to the transport before the peer left counts.
    assert server.counters.bytes_sent == transfer.FILE_CHUNK
    assert len(server.cache) == 0
    assert [e["status"] for e in access_events(protocol_events)] == ["cut"]
    assert [e["size"] for e in access_events(protocol_events)] == [transfer.FILE_CHUNK]
    assert [e for e in protocol_events if "log_failure" in e] == []

    again, t2 = connect(factory)  # the fill reservation was released too
    ask(again, t2, b"GET big.bin\r\n")
    assert [p for p, _ in server.cache] == ["big.bin"]


def test_client_leaving_mid_stream_from_memory(root: Path, protocol_events: list[dict[str, Any]]) -> None:
    """
    The peer goes away while a large cached body is streamed from memory
    (paused by a full send buffer): nothing raises, the access log says
    `cut`, connections_active drops back, the cache entry stays.
    """
    big = noise(BIG_SIZE)
    put(root, "big.bin", big)
    server, factory, _ = start(root)
    filler, t1 = connect(factory)
    ask(filler, t1, b"GET big.bin\r\n")
    transport = PushbackTransport()
    proto, _ = connect(factory, transport)

    proto.dataReceived(b"GET big.bin\r\n")
    sent = transport.value()
    paused_producer = transport.producer_paused
    peer_disconnects(transport, proto)
    gc.collect()

    assert paused_producer is True
    assert len(sent) < BIG_SIZE
    assert factory.admission.connections_active == 1  # the filler's
    assert [e["status"] for e in access_events(protocol_events)] == ["OK", "cut"]
    assert [e for e in protocol_events if "log_failure" in e] == []
    assert [p for p, _ in server.cache] == ["big.bin"]


# Access log


def test_access_log_one_event_per_reply(hostile: Path, protocol_events: list[dict[str, Any]]) -> None:
    """
    With access_log=True every reply (not QUIT) logs one event with peer,
    request (without \\r), status, body size and cache (`miss`, `hit`,
    `-`); seconds come from the factory's clock.
    """
    _, factory, _ = start(hostile)
    proto, transport = connect(factory)

    out = ask(
        proto, transport,
        b"GET small.txt\r\nGET small.txt 3\r\nGET nope\nLIST\r\nSTATS\r\nFOO\r\nQUIT\r\n",
    )
    start_of_rows = out.index(b"OK\r\n") + 4
    listing = out[start_of_rows : out.index(b"END ", start_of_rows)]

    events = access_events(protocol_events)
    assert [access(e) for e in events] == [
        ("127.0.0.1:12345", "GET small.txt", "OK", len(SMALL), "miss"),
        ("127.0.0.1:12345", "GET small.txt 3", "OK", len(SMALL) - 3, "hit"),
        ("127.0.0.1:12345", "GET nope", "ERR not-found", 0, "-"),
        # A LIST logs the bytes of its rows and END line.
        ("127.0.0.1:12345", "LIST", "OK", len(listing) + len(b"END 3\r\n"), "-"),
        ("127.0.0.1:12345", "STATS", "OK", 0, "-"),
        ("127.0.0.1:12345", "FOO", "ERR bad-request", 0, "-"),
    ]
    assert [e["seconds"] for e in events] == [0.0] * 6
    assert len(protocol_events) == 6


def test_access_log_times_a_streamed_reply_with_the_factory_clock(
    root: Path, protocol_events: list[dict[str, Any]]
) -> None:
    """The seconds of a streamed reply run from its request line to its END, on the injected clock."""
    put(root, "big.bin", noise(BIG_SIZE))
    _, factory, clock = start(root)
    proto, transport = connect(factory)

    proto.dataReceived(b"GET big.bin\r\n")
    while transport.producer is not None and not transport.streaming:
        clock.advance(0.5)
        transport.producer.resumeProducing()

    events = access_events(protocol_events)
    assert [access(e) for e in events] == [
        ("127.0.0.1:12345", "GET big.bin", "OK", BIG_SIZE, "miss")
    ]
    assert events[0]["seconds"] == 2.5  # 0.5 before each of the 5 producer steps


def test_access_log_off_emits_nothing(hostile: Path, protocol_events: list[dict[str, Any]]) -> None:
    """With access_log=False the protocol logs nothing for ordinary replies or errors."""
    _, factory, _ = start(hostile, access_log=False)
    proto, transport = connect(factory)

    out = ask(proto, transport, b"GET small.txt\r\nGET nope\r\nLIST\r\nSTATS\r\nFOO\r\n")
    proto.dataReceived(b"G" * 5000 + b"\r\n")

    assert out.startswith(get_reply(SMALL, version_of(hostile / "small.txt")))
    assert transport.value() == TOO_LONG
    assert protocol_events == []


@pytest.mark.parametrize(
    "address, peer",
    [
        (IPv6Address("TCP", "::1", 4000), "[::1]:4000"),
        (UNIXAddress("/run/filecache.sock"), "/run/filecache.sock"),
        (UNIXAddress(None), "UNIXAddress"),
    ],
)
def test_access_log_peer_for_other_addresses(
    root: Path, protocol_events: list[dict[str, Any]], address: IAddress, peer: str
) -> None:
    """The peer field is `[host]:port` for IPv6 and the socket name (or type) for UNIX peers."""
    _, factory, _ = start(root)
    proto = factory.buildProtocol(address)
    assert proto is not None
    proto.makeConnection(StringTransport(peerAddress=address))

    proto.dataReceived(b"STATS\r\n")

    assert [e["peer"] for e in access_events(protocol_events)] == [peer]


# Property: arbitrary input


REQUEST_LINES = [
    b"GET small.txt", b"GET small.txt 3", b"get small.txt", b"GET big.bin",
    b"GET big.bin 70000", b"GET big.bin 150000", b"GET big.bin 100001",
    b"GET link_in", b"GET sub/inner.txt", b"GET nope", b"GET ../outside/secret.txt",
    b"GET %2e%2e/outside/secret.txt", b"GET link_out", b"GET dir_out/secret.txt",
    b"GET link_hidden", b"GET .hidden", b"GET fifo", b"GET sub", b"GET /etc/passwd",
    b"GET sub/../../outside/secret.txt", b"LIST", b"LIST CACHED", b"STATS", b"QUIT",
    b"quit", b"FOO", b"",
]

request_lines = st.one_of(
    st.sampled_from(REQUEST_LINES),
    st.sampled_from(REQUEST_LINES),
    st.sampled_from(REQUEST_LINES),
    st.binary(max_size=24),
    st.integers(min_value=4094, max_value=4099).map(lambda n: b"GET " + b"a" * (n - 4)),
)
terminators = st.sampled_from([b"\r\n", b"\r\n", b"\n", b"\n", b"\r", b" ", b""])
pipelined = st.lists(st.tuples(request_lines, terminators), min_size=1, max_size=8).map(
    lambda items: b"".join(line + end for line, end in items)
)
streams = st.one_of(st.binary(max_size=300), pipelined, pipelined)


def expected_outcome(stream: bytes) -> tuple[list[bytes], str]:
    """
    The request lines the server must answer, in order, and how the
    connection ends: "open", "quit" or "too-long".
    """
    *complete, rest = stream.split(b"\n")
    answered: list[bytes] = []
    for line in complete:
        bare = line[:-1] if line.endswith(b"\r") else line
        if len(bare) > wire.MAX_LINE:
            return answered, "too-long"
        if bare.upper() == b"QUIT":
            return answered, "quit"
        answered.append(bare)
    if not complete and starts_like_http(rest[:64]) and len(rest) <= MAX_HEADER_LINE + 1:
        # A first line that starts like an HTTP request line may be as long
        # as an HTTP one (docs/protocol.md): it is still being read.
        return answered, "open"
    if len(rest) > wire.MAX_LINE + 1:
        return answered, "too-long"
    return answered, "open"


def take_line(out: bytes, pos: int) -> tuple[bytes, int]:
    end = out.find(b"\r\n", pos)
    assert end >= 0, f"unterminated line at {pos}: {out[pos:pos + 80]!r}"
    return out[pos:end], end + 2


def check_reply(out: bytes, pos: int, line: bytes, root: Path) -> int:
    """Check the one reply to C{line} starting at C{pos}; return where it ends."""
    status, pos = take_line(out, pos)
    if status.startswith(b"ERR "):
        code = status.split(b" ")[1].decode()
        assert code in (wire.NOT_FOUND, wire.BAD_REQUEST), (line, status)
        return pos
    request = wire.parse_request(line)
    if status == b"OK":
        assert isinstance(request, wire.ListRequest), (line, status)
        rows = 0
        while True:
            row, pos = take_line(out, pos)
            if row.startswith(b"END "):
                assert int(row[4:]) == rows
                return pos
            reply_lines.parse_list_row(row)
            rows += 1
    assert status.startswith(b"OK "), (line, status)
    if isinstance(request, wire.GetRequest):
        size_text, version = status[3:].split(b" ")
        size = int(size_text)
        body = out[pos: pos + size]
        pos += size
        end, pos = take_line(out, pos)
        assert end == b"END " + sha(body).encode()
        path = root / request.path
        assert body == path.read_bytes()[request.offset:]
        assert version.decode() == version_of(path)
        return pos
    count = int(status[3:])
    for _ in range(count):
        _, pos = take_line(out, pos)
    return pos


def test_arbitrary_input_never_breaks_the_protocol(hostile: Path) -> None:
    """
    Arbitrary bytes, cut into arbitrary chunks: no exception escapes, every
    complete line gets exactly one well-formed reply (GET bodies match the
    file and their END digest) until QUIT or a too-long line closes the
    connection, no descriptor leaks, and every file the folder layer opens
    is, by the kernel's account, a non-hidden file inside the shared folder.
    """
    put(hostile, "big.bin", noise(100_000))
    real_root = os.path.realpath(hostile)
    prefix = real_root + os.sep
    all_opened: list[str] = []
    # One folder for every example: each holds its folder's descriptor
    # until collected, which would move the count of open descriptors.
    folder = RecordingFolder(str(hostile))

    @settings(max_examples=200, deadline=None)
    @given(stream=streams, cuts=st.lists(st.integers(0, 20_000), max_size=6))
    @example(
        stream=b"GET small.txt\r\nGET big.bin\nGET link_out\r\nGET %2e%2e/outside/secret.txt\n"
        b"GET dir_out/secret.txt\r\nLIST\r\nGET big.bin 1000\r\nSTATS\r\nQUIT\r\nSTATS\r\n",
        cuts=[5, 17, 40, 90],
    )
    @example(stream=b"GET big.bin\r\nGET small.txt\n" + b"G" * 5000, cuts=[3, 2000])
    @example(stream=b"G" * 4097 + b"\r\nSTATS\n", cuts=[4097])
    @example(stream=b"GET /etc/passwd\r" + b"x" * 5000 + b"\r", cuts=[])
    def check(stream: bytes, cuts: list[int]) -> None:
        folder.opened.clear()
        _, factory, _ = start(folder, capacity=150_000, access_log=False)
        fds = open_fds()
        proto, transport = connect(factory)
        points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})

        for a, b in itertools.pairwise(points):
            if transport.disconnecting:
                break  # a real transport stops reading once closing
            proto.dataReceived(stream[a:b])
            drive(transport)

        answered, ending = expected_outcome(stream)
        out = transport.value()
        pos = 0
        for line in answered:
            pos = check_reply(out, pos, line, hostile)
        if ending == "too-long":
            assert out[pos:] == TOO_LONG
        else:
            assert pos == len(out), out[pos: pos + 80]
        assert transport.disconnecting is (ending != "open")
        assert transport.disconnected is False
        assert proto.paused is False
        for real in folder.opened:
            assert real.startswith(prefix), real
            assert not any(part.startswith(".") for part in real[len(prefix):].split(os.sep))
        all_opened.extend(folder.opened)
        peer_disconnects(transport, proto)
        assert open_fds() == fds

    check()
    assert os.path.join(real_root, "big.bin") in all_opened
    assert os.path.join(real_root, "small.txt") in all_opened


# The direct path (socket writes that bypass the transport's buffer)


class FakeDirectTransport:
    """
    What _DirectSender needs of a tcp.Connection: registerProducer (which
    calls a pull producer at once, as Twisted does), unregisterProducer and
    startWriting (after which the reactor would call doWrite, i.e. the
    producer's resumeProducing, once Twisted's own buffer is empty).
    """

    def __init__(self, queued: bytes = b"OK 3145728 v\r\n") -> None:
        self.producer: Any = None
        self.start_writing = 0
        self.unregistered = 0
        # Twisted's own buffer (sockets.buffer_empty reads it): by default a
        # status line still waits in it when the body starts.
        self._tempDataLen = 0
        self.dataBuffer = queued
        self.offset = 0

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        assert self.producer is None
        self.producer = producer
        if not streaming:
            producer.resumeProducing()

    def unregisterProducer(self) -> None:
        self.producer = None
        self.unregistered += 1

    def startWriting(self) -> None:
        self.start_writing += 1


def read_available(sock: socket.socket) -> bytes:
    got = bytearray()
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return bytes(got)
        if not chunk:
            return bytes(got)
        got += chunk


def run_direct(
    transport: FakeDirectTransport, peer: socket.socket, between: Callable[[], None] = lambda: None
) -> bytes:
    """Call the producer as doWrite would until it unregisters; return what the peer read."""
    received = bytearray()
    for _ in range(10_000):
        if transport.producer is None:
            break
        transport.producer.resumeProducing()
        received += read_available(peer)
        between()
    received += read_available(peer)
    return bytes(received)


@pytest.fixture
def socket_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


def test_direct_sender_starts_at_once_when_nothing_is_queued(
    socket_pair: tuple[socket.socket, socket.socket],
) -> None:
    """With Twisted's buffer empty (the head went straight to the socket), the first call sends."""
    sock, peer = socket_pair
    data = noise(1000)
    done: Deferred[int] = Deferred()
    results: list[Any] = []
    done.addBoth(results.append)
    transport = FakeDirectTransport(queued=b"")
    transport.registerProducer(
        transfer._DirectSender(transport, len(data), lambda sent, n: sock.send(data[sent: sent + n]), done, lambda: None),
        False,
    )
    assert (transport.start_writing, read_available(peer), results) == (0, data, [len(data)])


def test_direct_sender_waits_for_the_transport_then_sends_everything(
    socket_pair: tuple[socket.socket, socket.socket],
) -> None:
    """
    _DirectSender (memory body on a plain socket) sends nothing from the
    synchronous call registerProducer makes (the transport may still hold a
    status line) but asks for startWriting; later calls send the bytes in
    order, waiting via startWriting when the socket is full, then
    unregister once and fire with the byte count.
    """
    sock, peer = socket_pair
    data = noise(3 * 1024 * 1024)
    view = memoryview(data)
    done: Deferred[int] = Deferred()
    results: list[Any] = []
    done.addBoth(results.append)
    progress: list[None] = []
    transport = FakeDirectTransport()

    transport.registerProducer(
        transfer._DirectSender(
            transport,
            len(data),
            lambda sent, n: sock.send(view[sent: sent + n]),
            done,
            lambda: progress.append(None),
        ),
        False,
    )
    first = (transport.start_writing, read_available(peer))
    transport.dataBuffer = b""  # the doWrite that calls it again has sent the status line
    received = run_direct(transport, peer)

    assert first == (1, b"")
    assert received == data
    assert results == [len(data)]
    assert transport.unregistered == 1
    assert transport.start_writing > 2  # the socket filled up along the way
    # every call but the first (which sends nothing) reported progress
    assert len(progress) == transport.start_writing


def test_sendfile_direct_path_sends_a_range(
    tmp_path: Path, socket_pair: tuple[socket.socket, socket.socket]
) -> None:
    """The sendfile path sends exactly `length` bytes of the file from `start` and fires with them."""
    sock, peer = socket_pair
    data = noise(1024 * 1024)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        transport = FakeDirectTransport()
        d = transfer._sendfile(transport, sock, fd, 1000, 900_000, lambda: None)
        results: list[Any] = []
        d.addBoth(results.append)
        received = run_direct(transport, peer)
    finally:
        os.close(fd)

    assert received == data[1000:901_000]
    assert results == [transfer.TransferResult(900_000)]
    assert transport.unregistered == 1


def test_sendfile_direct_path_fails_when_the_file_shrinks(
    tmp_path: Path, socket_pair: tuple[socket.socket, socket.socket]
) -> None:
    """A file truncated while sendfile runs fails the transfer with TransferFailed('file ended early')."""
    sock, peer = socket_pair
    path = tmp_path / "f.bin"
    path.write_bytes(noise(2 * 1024 * 1024))
    fd = os.open(path, os.O_RDONLY)
    try:
        transport = FakeDirectTransport()
        d = transfer._sendfile(transport, sock, fd, 0, 2 * 1024 * 1024, lambda: None)
        results: list[Any] = []
        d.addBoth(results.append)
        received = run_direct(transport, peer, lambda: os.truncate(path, 10_000))
    finally:
        os.close(fd)

    assert len(received) < 2 * 1024 * 1024
    assert len(results) == 1 and isinstance(results[0], Failure)
    assert results[0].check(transfer.TransferFailed)
    assert str(results[0].value) == "file ended early"
    assert transport.unregistered == 1


def test_direct_sender_fails_when_the_peer_is_gone(
    socket_pair: tuple[socket.socket, socket.socket],
) -> None:
    """A send to a closed peer fails the transfer with TransferFailed('send failed: ...'), not an exception."""
    sock, peer = socket_pair
    data = noise(100_000)
    done: Deferred[int] = Deferred()
    results: list[Any] = []
    done.addBoth(results.append)
    transport = FakeDirectTransport()
    transport.registerProducer(
        transfer._DirectSender(
            transport,
            len(data),
            lambda sent, n: sock.send(data[sent: sent + n]),
            done,
            lambda: None,
        ),
        False,
    )
    peer.close()

    transport.producer.resumeProducing()

    assert len(results) == 1 and isinstance(results[0], Failure)
    assert results[0].check(transfer.TransferFailed)
    assert str(results[0].value).startswith("send failed: ")
    assert transport.unregistered == 1


# Digests are computed once


def test_digest_of_a_cached_file_is_not_computed_again(root: Path) -> None:
    """
    A cache hit ends with the digest stored in the entry: replace it with a
    marker and the next END carries the marker, so nothing re-hashed the bytes.
    """
    from dataclasses import replace

    data = os.urandom(200_000)
    (root / "c.bin").write_bytes(data)
    server, factory, _ = start(root)
    proto, transport = connect(factory)
    first = ask(proto, transport, b"GET c.bin\r\n")
    assert first.endswith(b"END " + hashlib.sha256(data).hexdigest().encode() + b"\r\n")
    entry = server.cache.peek("c.bin")
    assert entry is not None
    marker = "0" * 64
    server.cache.insert("c.bin", replace(entry, digest=marker))
    second = ask(proto, transport, b"GET c.bin\r\n")
    assert second.endswith(b"END " + marker.encode() + b"\r\n")


def test_digest_of_an_uncacheable_file_is_kept_by_version(root: Path) -> None:
    """A file too big for the cache is hashed on its first full read, then the stored digest is used."""
    data = os.urandom(300_000)
    (root / "big.bin").write_bytes(data)
    server, factory, _ = start(root, capacity=100_000)
    proto, transport = connect(factory)
    first = ask(proto, transport, b"GET big.bin\r\n")
    version = first.split(b"\r\n", 1)[0].split()[2].decode()
    assert server.digests.get(version) == hashlib.sha256(data).hexdigest()
    marker = "1" * 64
    server.digests.put(version, marker)
    second = ask(proto, transport, b"GET big.bin\r\n")
    assert second.endswith(b"END " + marker.encode() + b"\r\n")
    assert len(server.cache) == 0


def test_a_known_get_line_is_answered_without_parsing_and_the_same(root: Path) -> None:
    """
    A read that is exactly a native `GET <path> 0` line seen before, of a
    small cached file, gets the very bytes the long path sends, counted the
    same in STATS, with no parsing; a changed file is still seen; offsets,
    pipelined lines and the access log take the long way.
    """
    path = put(root, "a.txt", b"hello")
    responder, factory, _ = start(root, access_log=False)
    proto, t = connect(factory)
    line = b"GET a.txt 0\r\n"
    first = ask(proto, t, line)
    assert first == get_reply(b"hello", version_of(path))
    assert factory.native_gets.get(line) == "a.txt"
    parsed = 0
    real = wire.parse_request

    def counting(text: bytes) -> wire.Request:
        nonlocal parsed
        parsed += 1
        return real(text)

    wire.parse_request = counting  # type: ignore[assignment]
    try:
        again = [ask(proto, t, line) for _ in range(3)]
    finally:
        wire.parse_request = real
    assert again == [first] * 3 and parsed == 1  # the second read built the kept reply
    figures = dict(responder.stats())
    assert (figures["requests"], figures["hits"], figures["misses"], figures["bytes_sent"]) == (4, 3, 1, 20)

    path.write_bytes(b"changed")
    assert ask(proto, t, line) == get_reply(b"changed", version_of(path))
    assert factory.native_gets.get(b"GET a.txt 2\r\n") is None
    assert ask(proto, t, b"GET a.txt 2\r\n").startswith(b"OK 5 ")
    assert factory.native_gets.get(b"GET a.txt 2\r\n") is None
    assert ask(proto, t, line + line) == get_reply(b"changed", version_of(path)) * 2


def test_a_known_get_line_with_the_access_log_on_is_logged(root: Path) -> None:
    """With the access log on, every GET is read the long way and logged."""
    put(root, "a.txt", b"hello")
    _, factory, _ = start(root, access_log=True)
    proto, t = connect(factory)
    lines: list[str] = []

    @implementer(ILogObserver)
    def observer(event: dict[str, Any]) -> None:
        lines.append(event.get("log_format", ""))

    globalLogPublisher.addObserver(observer)
    try:
        for _ in range(3):
            ask(proto, t, b"GET a.txt 0\r\n")
    finally:
        globalLogPublisher.removeObserver(observer)
    assert sum("{peer} {request}" in line for line in lines) == 3


@pytest.fixture
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected TCP pair on loopback, both ends non-blocking."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
    for end in (accepted, client):
        end.setblocking(False)
    yield accepted, client
    accepted.close()
    client.close()


def corked(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK)


@pytest.mark.system
@pytest.mark.skipif(not hasattr(socket, "TCP_CORK"), reason="TCP_CORK is Linux's")
def test_sendfile_corks_the_socket_while_it_sends_and_uncorks_at_the_end(
    tmp_path: Path, tcp_pair: tuple[socket.socket, socket.socket]
) -> None:
    """
    While the kernel copies a file to a TCP socket it is corked (only full
    segments leave), and it is uncorked when the transfer ends, so the last
    partial segment is pushed at once instead of after the cork's 200 ms;
    a transfer that fails (the file ended early) uncorks it too.
    """
    sock, peer = tcp_pair
    data = noise(12 * 1024 * 1024 + 5)  # more than one call sends (8 MiB a call at most)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        transport = FakeDirectTransport(queued=b"")
        results: list[Any] = []
        during: list[int] = []
        transfer._sendfile(transport, sock, fd, 0, len(data), lambda: None).addBoth(results.append)
        received = run_direct(transport, peer, lambda: during.append(corked(sock)))
        assert received == data and [r.sent for r in results] == [len(data)]
        assert during and during[0] == 1  # still sending after the first call: corked
        assert corked(sock) == 0
        failed: list[Any] = []
        transport = FakeDirectTransport(queued=b"")
        transfer._sendfile(transport, sock, fd, len(data) - 10, 100, lambda: None).addErrback(failed.append)
        run_direct(transport, peer)
        assert failed and failed[0].check(transfer.TransferFailed)
        assert corked(sock) == 0
    finally:
        os.close(fd)
