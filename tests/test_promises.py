"""
In-memory tests of the promises issue 8 restored: disk work in bounded
steps off the reactor thread, shared hashes, settled reads, streamed LIST
under backpressure, a fast path that falls back, STATS that says who
answered, and an allow-list that meets mapped peers in one form.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from conftest import QueuedSteps, ram_folder
from twisted.internet import tcp
from twisted.internet.task import Clock
from twisted.internet.testing import AccumulatingProtocol, MemoryReactor, StringTransport

from filecache import __version__, wire
from filecache.client import reply_lines
from filecache.daemon import sockets, transfer
from filecache.daemon.admission import parse_allow
from filecache.daemon.cache import FifoCache
from filecache.daemon.diskwork import DiskWork
from filecache.daemon.folder import SharedFolder
from filecache.daemon.hashing import HASH_STEP
from filecache.daemon.listing import KERNEL_QUEUE, ListBody
from filecache.daemon.native import FileCacheFactory, FileCacheProtocol
from filecache.daemon.responder import Responder

T = TypeVar("T")
PEER_HOST = "127.0.0.1"


def make(
    root: Path, run_blocking: Any = None, *, settle: float = 0, capacity: int = 256 << 20
) -> tuple[Responder, FileCacheFactory, Clock]:
    clock = Clock()
    kw: dict[str, Any] = {"reactor": clock, "settle": settle}
    if run_blocking is not None:
        kw["run_blocking"] = run_blocking
    server = Responder(SharedFolder(str(root)), FifoCache(capacity), **kw)
    return server, FileCacheFactory(server, clock=clock, access_log=False), clock


def connect(factory: FileCacheFactory) -> tuple[FileCacheProtocol, StringTransport]:
    from twisted.internet.address import IPv4Address

    proto = factory.buildProtocol(IPv4Address("TCP", PEER_HOST, 4000))
    assert isinstance(proto, FileCacheProtocol)
    transport = StringTransport(peerAddress=IPv4Address("TCP", PEER_HOST, 4000))
    proto.makeConnection(transport)
    return proto, transport


def drain(transport: StringTransport) -> None:
    while transport.producer is not None and not transport.streaming:
        transport.producer.resumeProducing()


# Item 8: an offset GET of a cached file.


def test_offset_get_of_a_cached_file_hashes_in_disk_steps(tmp_path: Path) -> None:
    """
    `GET big 1` of a cached 20 MiB file does not hash on the reactor thread:
    the reply waits for steps of at most HASH_STEP bytes run by the disk
    runner, then carries the tail's digest (item 8).
    """
    data = os.urandom(20 << 20)
    (tmp_path / "big.bin").write_bytes(data)
    steps = QueuedSteps()
    server, factory, _ = make(tmp_path, steps)
    proto, transport = connect(factory)
    proto.dataReceived(b"GET big.bin\r\n")  # fills the cache (hashed while sent)
    drain(transport)
    assert server.cache.peek("big.bin") is not None
    transport.clear()

    proto.dataReceived(b"GET big.bin 1\r\n")
    assert transport.value() == b""  # nothing yet: the tail is being hashed
    steps.run_all()
    drain(transport)
    out = transport.value()
    assert steps.ran == -(-(len(data) - 1) // HASH_STEP)
    status, rest = out.split(b"\r\n", 1)
    assert status.startswith(b"OK %d " % (len(data) - 1))
    assert rest == data[1:] + b"END " + hashlib.sha256(data[1:]).hexdigest().encode() + b"\r\n"


# Item 9: concurrent hashes of one version.


def test_concurrent_hashes_of_one_version_share_one_read(tmp_path: Path) -> None:
    """
    Ten connections ask HASH of the same uncached file at once: the steps
    run are those of one read, and all ten get the same right answer; a
    client that leaves does not stop the others' hash (item 9).
    """
    data = os.urandom(3 * HASH_STEP + 5)
    (tmp_path / "f.bin").write_bytes(data)
    steps = QueuedSteps()
    server, factory, _ = make(tmp_path, steps)
    clients = [connect(factory) for _ in range(10)]
    for proto, _ in clients:
        proto.dataReceived(b"HASH f.bin\r\n")
    clients[0][1].loseConnection()
    clients[0][0].connectionLost(None)  # type: ignore[arg-type]
    steps.run_all()
    assert steps.ran == 4
    digest = hashlib.sha256(data).hexdigest().encode()
    for _, transport in clients[1:]:
        assert transport.value().startswith(b"OK %d " % len(data))
        assert transport.value().endswith(b" " + digest + b"\r\n")
    assert server.digests.get(server.folder.open("f.bin").stat.version) is not None


def test_a_hash_nobody_waits_for_stops(tmp_path: Path) -> None:
    """When every client asking a hash has gone, its remaining steps are not run (item 7)."""
    (tmp_path / "f.bin").write_bytes(os.urandom(4 * HASH_STEP))
    steps = QueuedSteps()
    _, factory, _ = make(tmp_path, steps)
    proto, _transport = connect(factory)
    proto.dataReceived(b"HASH f.bin\r\n")
    work, d = steps.queue.pop(0)
    proto.connectionLost(None)  # type: ignore[arg-type]
    d.callback(work())
    steps.run_all()
    assert steps.ran == 0


# Item 7: disk steps of clients who left.


class _ThreadHop:
    """callFromThread into a list the test thread runs."""

    def __init__(self) -> None:
        self.calls: list[tuple[Callable[..., object], tuple[object, ...]]] = []
        self.lock = threading.Lock()

    def callFromThread(self, f: Callable[..., object], *args: object) -> None:
        with self.lock:
            self.calls.append((f, args))

    def run(self) -> None:
        with self.lock:
            calls, self.calls = self.calls, []
        for f, args in calls:
            f(*args)


def test_a_cancelled_step_is_dropped_before_it_runs() -> None:
    """
    DiskWork: a step whose Deferred is cancelled while it waits in the
    queue never runs; the one after it does.
    """
    hop = _ThreadHop()
    disk = DiskWork(hop, threads=1)
    disk.start()
    gate = threading.Event()
    ran: list[str] = []
    try:
        first = disk(lambda: gate.wait(5))
        second = disk(lambda: ran.append("second"))
        third = disk(lambda: ran.append("third"))
        second.cancel()
        second.addErrback(lambda f: None)
        gate.set()
        results: list[object] = []
        third.addCallback(results.append)
        first.addCallback(results.append)
        for _ in range(500):
            hop.run()
            if len(results) == 2:
                break
            threading.Event().wait(0.01)
    finally:
        disk.stop()
    assert ran == ["third"]


# Item 2: a file that changed just now is read twice.


def test_fresh_small_file_is_read_again_once_settled(tmp_path: Path) -> None:
    """
    A small file changed less than `settle` seconds ago is answered only
    after a second read at the end of that time, and only if both agree;
    one rewritten meanwhile is `ERR unavailable` and is not cached.
    """
    path = tmp_path / "f.txt"
    path.write_bytes(b"first")
    server, factory, clock = make(tmp_path, settle=0.05)
    proto, transport = connect(factory)
    proto.dataReceived(b"GET f.txt\r\n")
    assert transport.value() == b""
    clock.advance(0.05)
    assert transport.value().startswith(b"OK 5 ")
    transport.clear()

    path.write_bytes(b"again")
    proto.dataReceived(b"GET f.txt\r\n")
    os.pwrite(os.open(path, os.O_WRONLY), b"AGAIN", 0)
    clock.advance(0.05)
    assert transport.value().startswith(b"ERR unavailable")
    assert server.cache.peek("f.txt") is None or server.cache.peek("f.txt").data == b"first"  # type: ignore[union-attr]


# Item 6: LIST under backpressure.


@pytest.fixture
def ram_path(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """An empty folder in memory, for the thousands of files a walk needs (no disk journal to wait on)."""
    with ram_folder(tmp_path_factory) as folder:
        yield folder


def test_list_asks_no_step_while_paused_or_while_the_kernel_queue_is_full(ram_path: Path) -> None:
    """
    A LIST body asks for its next walk step only when the transport is not
    paused and no more than KERNEL_QUEUE bytes wait in the kernel; it looks
    again later, and finishes with END <n> (item 6).
    """
    for n in range(3000):
        (ram_path / f"f{n}").write_bytes(b"")
    steps = QueuedSteps()
    folder = SharedFolder(str(ram_path))
    body = ListBody(folder.walk(), lambda path, st: False, steps)
    transport = StringTransport()
    unsent = [0]
    clock = Clock()
    done = body.send(transport, unsent=lambda: unsent[0], call_later=clock.callLater)
    assert len(steps.queue) == 1
    body.pauseProducing()
    steps.run_all()
    assert steps.queue == []  # paused: no next step
    unsent[0] = KERNEL_QUEUE + 1
    body.resumeProducing()
    assert steps.queue == []  # the kernel still holds too much
    unsent[0] = 0
    clock.advance(1)
    while steps.queue:
        steps.run_all()
    result: list[Any] = []
    done.addCallback(result.append)
    assert result and result[0].rows == 3000
    assert transport.value().endswith(b"END 3000\r\n")


def test_list_stopped_midway_closes_the_walk(ram_path: Path) -> None:
    """A LIST whose connection is lost closes its walk's descriptors and asks no more steps."""
    for d in range(3):
        (ram_path / f"d{d}").mkdir()
        for n in range(2000):
            (ram_path / f"d{d}" / f"f{n}").write_bytes(b"")
    folder = SharedFolder(str(ram_path))
    fds = len(os.listdir("/proc/self/fd"))
    steps = QueuedSteps()
    body = ListBody(folder.walk(), lambda path, st: False, steps)
    done = body.send(StringTransport())
    work, waiting = steps.queue.pop(0)
    waiting.callback(work())
    assert len(os.listdir("/proc/self/fd")) > fds
    failures: list[Any] = []
    done.addErrback(failures.append)
    body.stopProducing()
    steps.run_all()
    assert steps.ran == 0
    assert failures and failures[0].check(transfer.TransferFailed)
    assert len(os.listdir("/proc/self/fd")) == fds


# Item 15: STATS says what answered, and for how long.


def test_stats_has_uptime_version_worker_and_pid(tmp_path: Path) -> None:
    """STATS carries uptime_seconds (from the injected clock), version, worker and pid (item 15)."""
    clock = Clock()
    clock.advance(1000)
    server = Responder(SharedFolder(str(tmp_path)), FifoCache(0), reactor=clock, worker=3)
    clock.advance(42.7)
    figures = dict(server.stats())
    assert figures["uptime_seconds"] == 42
    assert figures["version"] == __version__
    assert (figures["worker"], figures["pid"]) == (3, os.getpid())
    lines = wire.format_stats(server.stats()).split(b"\r\n")
    assert lines[0] == b"OK %d" % len(figures)
    assert dict(reply_lines.parse_stats_row(line) for line in lines[1:-1]) == figures


# Item 16: the fast path's private Twisted attributes.


def test_fast_path_falls_back_when_twisted_renames_its_buffer() -> None:
    """
    A TCP transport without the private buffer attributes the fast path
    reads (as after a Twisted rename) gets no direct socket, and write_now
    goes through transport.write instead of failing (item 16).
    """
    a, b = socket.socketpair()
    try:
        conn = tcp.Connection(a, AccumulatingProtocol(), reactor=MemoryReactor())
        assert sockets.direct_socket(conn) is a
        del conn._tempDataLen
        assert sockets.direct_socket(conn) is None
        written: list[bytes] = []
        conn.write = written.append  # type: ignore[method-assign]
        sockets.write_now(conn, b"reply", sockets.direct_socket(conn))
        assert written == [b"reply"]
    finally:
        a.close()
        b.close()


# Item 11: mapped addresses in --allow.


@pytest.mark.parametrize(
    ("entry", "peer", "allowed"),
    [
        ("::ffff:127.0.0.1", "127.0.0.1", True),
        ("::ffff:127.0.0.1", "::ffff:127.0.0.1", True),
        ("::ffff:0:0/96", "10.1.2.3", True),
        ("::ffff:10.0.0.0/104", "10.9.9.9", True),
        ("::ffff:10.0.0.0/104", "11.0.0.1", False),
        ("::/0", "192.0.2.1", True),
        ("127.0.0.1", "::ffff:127.0.0.1", True),
        ("::1", "127.0.0.1", False),
    ],
)
def test_allow_meets_mapped_peers_in_one_form(tmp_path: Path, entry: str, peer: str, allowed: bool) -> None:
    """IPv4-mapped allow entries and peers are compared as IPv4 (item 11)."""
    server = Responder(SharedFolder(str(tmp_path)), FifoCache(0), reactor=Clock())
    factory = FileCacheFactory(server, clock=Clock(), allow=parse_allow(entry))
    assert factory.admission.allowed(peer) is allowed
    for network in parse_allow(entry):
        assert not (isinstance(network, ipaddress.IPv6Network) and network.subnet_of(ipaddress.IPv6Network("::ffff:0:0/96")))
