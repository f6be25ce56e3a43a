"""
Many transfers over few connections, in memory: requests pipelined on one
connection, a connection shared by everyone waiting for it, and the lanes
that decide which file goes where, and when.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from typing import Any

from conftest import connected_client
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.testing import StringTransport

from filecache.client.bodyhash import THREAD_FROM
from filecache.client.download import Session
from filecache.client.errors import BrokenReply, ConnectionLostEarly
from filecache.client.lanes import PIPELINE_BYTES, PIPELINE_DEPTH, Job, Lane, Lanes, schedule_order
from filecache.client.protocol import FileCacheClientProtocol

VERSION = b"2a-64-18ea3fdc92c71808"
DIGEST = b"ab" * 32


def pipelined(depth: int) -> tuple[FileCacheClientProtocol, Any]:
    """A client protocol sending up to C{depth} requests ahead, on a StringTransport."""
    proto = FileCacheClientProtocol(pipeline=depth)
    transport: Any = StringTransport()  # type: ignore[no-untyped-call]
    proto.makeConnection(transport)  # type: ignore[no-untyped-call]
    return proto, transport


def seen(d: Deferred[Any]) -> list[Any]:
    out: list[Any] = []
    d.addBoth(out.append)
    return out


def test_requests_are_pipelined_up_to_the_depth_in_one_write() -> None:
    """
    With pipeline=3, five HASHes put three requests on the wire at once;
    each reply lets one more go, and replies reach their own requests in order.
    """
    proto, transport = pipelined(3)
    results = [seen(proto.hash(f"f{i}")) for i in range(5)]
    assert transport.value() == b"HASH f0\r\nHASH f1\r\nHASH f2\r\n"
    transport.clear()
    proto.dataReceived(b"OK 1 " + VERSION + b" " + DIGEST + b"\r\n")
    assert transport.value() == b"HASH f3\r\n"
    proto.dataReceived(b"ERR not-found no\r\nOK 2 " + VERSION + b" " + DIGEST + b"\r\n")
    assert transport.value() == b"HASH f3\r\nHASH f4\r\n"
    assert results[0][0].size == 1
    assert results[1][0].value.code == "not-found"
    assert results[2][0].size == 2
    assert results[3] == [] and results[4] == []
    assert proto.outstanding == 2


def test_a_lost_connection_fails_every_pipelined_request() -> None:
    """Sent and queued requests alike fail with ConnectionLostEarly when the connection goes."""
    proto, _ = pipelined(2)
    results = [seen(proto.hash(f"f{i}")) for i in range(3)]
    proto.connectionLost()
    assert all(r and r[0].check(ConnectionLostEarly) for r in results)


def test_cancelling_a_request_sent_ahead_spends_the_connection() -> None:
    """A pipelined request already sent cannot be taken back: cancelling it drops the connection."""
    proto, transport = pipelined(2)
    first = seen(proto.hash("a"))
    second = proto.hash("b")
    second_seen = seen(second)
    second.cancel()
    assert second_seen[0].check(CancelledError)
    assert transport.disconnecting and not proto.usable
    proto.connectionLost()
    assert first[0].check(ConnectionLostEarly)


def dialling(made: list[Deferred[FileCacheClientProtocol]]) -> Callable[[], Deferred[FileCacheClientProtocol]]:
    """A connect function whose attempts are Deferreds appended to C{made}, fired by the test."""

    def dial() -> Deferred[FileCacheClientProtocol]:
        d: Deferred[FileCacheClientProtocol] = Deferred()
        made.append(d)
        return d

    return dial


def test_everyone_waiting_for_a_connection_shares_one() -> None:
    """Three transfers asking a Session at once: one connection is made, and all three get it."""
    made: list[Deferred[FileCacheClientProtocol]] = []
    session = Session(dialling(made))
    got = [seen(Deferred.fromCoroutine(session.client())) for _ in range(3)]
    assert len(made) == 1 and got == [[], [], []]
    proto, _ = connected_client()
    made[0].callback(proto)
    assert [g[0] for g in got] == [proto, proto, proto]


def test_a_failed_connection_fails_everyone_waiting_and_the_next_ask_dials_again() -> None:
    """When the one attempt fails, every waiter sees its error; the next caller tries anew."""
    made: list[Deferred[FileCacheClientProtocol]] = []
    session = Session(dialling(made))
    got = [seen(Deferred.fromCoroutine(session.client())) for _ in range(2)]
    made[0].errback(ConnectionLostEarly("refused"))
    assert all(g[0].check(ConnectionLostEarly) for g in got)
    seen(Deferred.fromCoroutine(session.client()))
    assert len(made) == 2


def test_large_files_first_the_largest_first_then_the_rest_in_order() -> None:
    """The scheduling order: known large files by size, then the others as given."""
    big, bigger = Job("b", PIPELINE_BYTES + 1), Job("c", 3 * PIPELINE_BYTES)
    small = [Job(f"s{i}", 10) for i in range(3)]
    bare = Job("bare")
    assert schedule_order([small[0], big, small[1], bare, bigger, small[2]]) == [
        bigger, big, small[0], small[1], bare, small[2]
    ]


class Recorder:
    """A Work that records which job started on which lane and ends when told."""

    def __init__(self) -> None:
        self.started: list[tuple[str, int]] = []
        self.waiting: dict[str, Deferred[None]] = {}

    async def __call__(self, job: Job, lane: Lane) -> None:
        self.started.append((job.path, lane.number))
        d: Deferred[None] = Deferred()
        self.waiting[job.path] = d
        await d

    def finish(self, path: str) -> None:
        self.waiting.pop(path).callback(None)


def lanes(count: int, work: Recorder) -> Lanes:
    return Lanes([Lane(n, Session(lambda: Deferred())) for n in range(count)], work)


def test_a_large_file_has_a_lane_to_itself_and_small_ones_share_the_others() -> None:
    """
    Two lanes, one large file and many small ones: the large one starts
    alone on a lane; small files fill the other lane up to the pipeline
    depth, and take the first lane only once the large file is done.
    """
    work = Recorder()
    run = lanes(2, work)
    jobs = [Job("big", PIPELINE_BYTES * 4)] + [Job(f"s{i:02d}", 100) for i in range(PIPELINE_DEPTH + 5)]
    done = seen(run.run(jobs))
    assert work.started[0] == ("big", 0)
    assert {lane for path, lane in work.started[1:]} == {1}
    assert len(work.started) == 1 + PIPELINE_DEPTH
    work.finish("big")
    assert {lane for _, lane in work.started[1 + PIPELINE_DEPTH :]} == {0}
    assert len(work.started) == len(jobs)
    for path in list(work.waiting):
        work.finish(path)
    assert done == [None]


def test_small_files_on_a_lane_are_bounded_by_bytes_too() -> None:
    """A lane takes small files only while what it has under way adds up to PIPELINE_BYTES."""
    work = Recorder()
    run = lanes(1, work)
    size = PIPELINE_BYTES // 4
    seen(run.run([Job(f"m{i}", size) for i in range(6)]))
    assert len(work.started) == 4
    work.finish("m0")
    assert len(work.started) == 5


def test_halt_starts_nothing_more_and_cancel_stops_everything() -> None:
    """
    halt(): what is under way finishes, the rest stays not started and the
    run ends; cancelling the run cancels every transfer and says which it stopped.
    """
    work = Recorder()
    run = lanes(1, work)
    done = seen(run.run([Job(f"s{i}", 10) for i in range(PIPELINE_DEPTH + 3)]))
    run.halt()
    work.finish("s0")
    assert len(work.started) == PIPELINE_DEPTH and len(run.not_started) == 3
    assert done == []

    other = Recorder()
    cancelled = lanes(2, other)
    d = cancelled.run([Job("a", PIPELINE_BYTES * 2), Job("b", PIPELINE_BYTES * 2), Job("c", 1)])
    result = seen(d)
    d.cancel()
    assert result[0].check(CancelledError)
    assert sorted(job.path for job in cancelled.under_way) == ["a", "b"]
    assert [job.path for job in cancelled.not_started] == ["c"]


class Collect:
    """A BodySink keeping the body in memory."""

    def __init__(self) -> None:
        self.body = bytearray()

    def begin(self, size: int, version: str) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.body += data


def large_body() -> bytes:
    return bytes(range(256)) * (THREAD_FROM // 256 + 4096)


def test_a_large_body_is_checked_by_a_hash_in_a_thread_of_its_own() -> None:
    """
    A body over THREAD_FROM bytes, in many pieces: hashed beside the
    reactor, it is still checked against END (good, then bad), and the
    thread is gone once the reply is done.
    """
    body = large_body()
    digest = hashlib.sha256(body).hexdigest().encode()
    for end, good in ((digest, True), (b"0" * 64, False)):
        proto, _ = connected_client()
        sink = Collect()
        got = seen(proto.get("big.bin", sink))
        proto.dataReceived(b"OK %d %s\r\n" % (len(body), VERSION))
        hashing = [t for t in threading.enumerate() if t.name == "filecache-client sha256"]
        assert hashing, "no hashing thread for a large body"
        for at in range(0, len(body), 65536):
            proto.dataReceived(body[at : at + 65536])
        proto.dataReceived(b"END " + end + b"\r\n")
        if good:
            assert got[0].digest == digest.decode() and bytes(sink.body) == body
        else:
            proto.connectionLost()
            assert got[0].check(BrokenReply)
        assert not any(t.is_alive() for t in hashing)


def test_a_large_body_cut_short_lets_its_hashing_thread_go() -> None:
    """The connection lost mid-body: the request fails and its hashing thread ends."""
    body = large_body()
    proto, _ = connected_client()
    got = seen(proto.get("big.bin", Collect()))
    proto.dataReceived(b"OK %d %s\r\n" % (len(body), VERSION) + body[:100_000])
    hashing = [t for t in threading.enumerate() if t.name == "filecache-client sha256"]
    proto.connectionLost()
    assert got[0].check(ConnectionLostEarly)
    for t in hashing:
        t.join(5)
        assert not t.is_alive()
