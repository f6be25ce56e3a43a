"""
In-memory tests of the HTTP/1.1 adapter (docs/http.md): every response is
parsed by h11, a strict HTTP/1.1 implementation of its own.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any, cast

import h11
import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, globalLogPublisher

from filecache.daemon.cache import FifoCache
from filecache.daemon.folder import SharedFolder
from filecache.daemon.native import FileCacheFactory, FileCacheProtocol
from filecache.daemon.responder import Responder

PEER = IPv4Address("TCP", "10.0.0.9", 40000)
SMALL = b"hello, world\n"
BIG = os.urandom(300_000)


class Transport(StringTransport):
    """A transport that runs any producer to its end and records closes."""

    def __init__(self) -> None:
        super().__init__(peerAddress=PEER)
        self.aborted = False

    def abortConnection(self) -> None:
        self.aborted = True
        self.loseConnection()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "hello.txt").write_bytes(SMALL)
    (shared / "big.bin").write_bytes(BIG)
    (shared / "sub").mkdir()
    (shared / "sub" / "a b.txt").write_bytes(b"a b")
    (shared / ".hidden").write_bytes(b"secret")
    (tmp_path / "outside.txt").write_bytes(b"secret")
    return shared


def make(root: Path, clock: Clock | None = None, **kwargs: Any) -> FileCacheFactory:
    clock = clock or Clock()
    responder = Responder(SharedFolder(str(root)), FifoCache(1 << 20), reactor=clock, settle=0)
    return FileCacheFactory(responder, clock=clock, access_log=False, **kwargs)


def connect(factory: FileCacheFactory) -> tuple[FileCacheProtocol, Transport]:
    proto = factory.buildProtocol(PEER)
    assert isinstance(proto, FileCacheProtocol)
    transport = Transport()
    proto.makeConnection(transport)
    return proto, transport


def drive(transport: Transport) -> None:
    for _ in range(100_000):
        producer = transport.producer
        if producer is None or getattr(producer, "_done", 1) is None:
            return
        if transport.streaming and type(producer).__name__ == "_SendBufferGate":
            return
        producer.resumeProducing()
    raise AssertionError("producer never finished")


def send(proto: FileCacheProtocol, transport: Transport, data: bytes) -> bytes:
    proto.dataReceived(data)
    drive(transport)
    out: bytes = transport.value()
    transport.clear()
    return out


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes, raw: list[tuple[bytes, bytes]]) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.raw = raw


def parse(data: bytes, methods: list[bytes] | None = None, count: int | None = None) -> list[Response]:
    """Every response in C{data}, each parsed by h11 (which fails on any framing error)."""
    methods = methods or [b"GET"] * (count or 1)
    out: list[Response] = []
    conn = h11.Connection(our_role=h11.CLIENT)
    conn.receive_data(data)
    for method in methods:
        conn.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
        conn.send(h11.EndOfMessage())
        event = conn.next_event()
        assert isinstance(event, h11.Response), event
        headers = {k.decode().lower(): v.decode() for k, v in event.headers}
        body = b""
        while True:
            e = conn.next_event()
            if isinstance(e, h11.Data):
                body += e.data
            elif isinstance(e, h11.EndOfMessage):
                break
            else:
                pytest.fail(f"incomplete response: {e!r}")
        out.append(Response(event.status_code, headers, body, list(event.headers)))
        if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
            break
        conn.start_next_cycle()
    return out


def get(proto: FileCacheProtocol, t: Transport, target: str, *headers: str, method: str = "GET") -> Response:
    head = f"{method} {target} HTTP/1.1\r\nHost: test\r\n" + "".join(h + "\r\n" for h in headers) + "\r\n"
    (response,) = parse(send(proto, t, head.encode()), [method.encode()])
    return response


def digest_header(data: bytes) -> str:
    return "sha-256=:" + base64.b64encode(hashlib.sha256(data).digest()).decode() + ":"


def test_a_file_with_every_header(root: Path) -> None:
    proto, t = connect(make(root))
    r = get(proto, t, "/hello.txt")
    assert r.status == 200 and r.body == SMALL
    h = r.headers
    assert h["content-length"] == str(len(SMALL))
    assert h["content-type"].startswith("text/plain")
    assert h["accept-ranges"] == "bytes"
    assert h["etag"].startswith('"') and h["etag"].endswith('"') and not h["etag"].startswith("W/")
    assert h["repr-digest"] == digest_header(SMALL)
    assert h["last-modified"].endswith(" GMT") and h["date"].endswith(" GMT")
    assert not t.disconnecting


def test_head_sends_the_head_alone(root: Path) -> None:
    proto, t = connect(make(root))
    full = get(proto, t, "/big.bin")
    head = get(proto, t, "/big.bin", method="HEAD")
    assert head.status == 200 and head.body == b""
    assert head.headers["content-length"] == str(len(BIG))
    assert head.headers["etag"] == full.headers["etag"]


def test_a_big_file_streams_then_is_a_hit_with_its_digest(root: Path) -> None:
    proto, t = connect(make(root))
    first = get(proto, t, "/big.bin")
    assert first.body == BIG and "repr-digest" not in first.headers
    second = get(proto, t, "/big.bin")
    assert second.body == BIG and second.headers["repr-digest"] == digest_header(BIG)


@pytest.mark.parametrize(
    ("spec", "start", "end"),
    [("bytes=0-9", 0, 10), ("bytes=100-", 100, len(BIG)), ("bytes=-500", len(BIG) - 500, len(BIG)),
     ("bytes=299990-999999", 299_990, len(BIG)), ("BYTES = 5-5", 5, 6)],
)
@pytest.mark.parametrize("warm", [False, True])
def test_one_range_is_partial_content(root: Path, spec: str, start: int, end: int, warm: bool) -> None:
    proto, t = connect(make(root))
    if warm:
        get(proto, t, "/big.bin")
    r = get(proto, t, "/big.bin", f"Range: {spec}")
    if spec.startswith("BYTES ="):
        assert r.status == 200  # not the grammar: ignored
        return
    assert r.status == 206
    assert r.body == BIG[start:end]
    assert r.headers["content-range"] == f"bytes {start}-{end - 1}/{len(BIG)}"


def test_ranges_unsatisfiable_malformed_and_several(root: Path) -> None:
    proto, t = connect(make(root))
    r = get(proto, t, "/hello.txt", f"Range: bytes={len(SMALL)}-")
    assert r.status == 416 and r.headers["content-range"] == f"bytes */{len(SMALL)}"
    assert get(proto, t, "/hello.txt", "Range: lines=1-2").status == 200
    assert get(proto, t, "/hello.txt", "Range: bytes=5-1").body == SMALL
    several = get(proto, t, "/hello.txt", "Range: bytes=0-1,4-5")
    assert several.status == 200 and several.body == SMALL


def test_conditions_in_the_order_of_rfc_9110(root: Path) -> None:
    proto, t = connect(make(root))
    first = get(proto, t, "/hello.txt")
    etag, modified = first.headers["etag"], first.headers["last-modified"]
    not_modified = get(proto, t, "/hello.txt", f"If-None-Match: {etag}")
    assert not_modified.status == 304 and not_modified.body == b""
    assert not_modified.headers["etag"] == etag
    assert get(proto, t, "/hello.txt", "If-None-Match: *").status == 304
    assert get(proto, t, "/hello.txt", f"If-Modified-Since: {modified}").status == 304
    assert get(proto, t, "/hello.txt", 'If-Match: "nope"').status == 412
    assert get(proto, t, "/hello.txt", f"If-Match: {etag}").status == 200
    assert get(proto, t, "/hello.txt", "If-Unmodified-Since: Sun, 06 Nov 1994 08:49:37 GMT").status == 412
    # If-None-Match wins over If-Modified-Since.
    assert get(proto, t, "/hello.txt", 'If-None-Match: "other"', f"If-Modified-Since: {modified}").status == 200
    assert get(proto, t, "/hello.txt", "Range: bytes=0-1", f"If-Range: {etag}").status == 206
    assert get(proto, t, "/hello.txt", "Range: bytes=0-1", 'If-Range: "old"').status == 200


def test_a_file_rewritten_with_its_mtime_put_back_gets_a_new_etag(root: Path) -> None:
    proto, t = connect(make(root))
    path = root / "hello.txt"
    old = get(proto, t, "/hello.txt").headers["etag"]
    st = path.stat()
    path.write_bytes(b"HELLO, WORLD\n")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    r = get(proto, t, "/hello.txt", f"If-None-Match: {old}")
    assert r.status == 200 and r.body == b"HELLO, WORLD\n" and r.headers["etag"] != old


@pytest.mark.parametrize(
    "target",
    ["/missing", "/.hidden", "/../outside.txt", "/%2e%2e/outside.txt", "/sub/../hello.txt", "//hello.txt",
     "/sub%2f..%2f..%2foutside.txt", "/hello.txt%00", "/sub%5Ca%20b.txt"],
)
def test_refused_paths_are_not_found(root: Path, target: str) -> None:
    proto, t = connect(make(root))
    r = get(proto, t, target)
    assert r.status == 404 and b"secret" not in r.body
    assert not t.disconnecting


def test_a_folder_without_its_slash_is_moved(root: Path) -> None:
    proto, t = connect(make(root))
    r = get(proto, t, "/sub")
    assert r.status == 301 and r.headers["location"] == "/sub/"


def test_listings_html_and_json(root: Path) -> None:
    proto, t = connect(make(root))
    page = get(proto, t, "/sub/")
    assert page.status == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    assert b'href="a%20b.txt"' in page.body and b"a b.txt" in page.body
    data = get(proto, t, "/?format=json")
    assert data.headers["content-type"] == "application/json"
    paths = [entry["path"] for entry in json.loads(data.body)]
    assert paths == ["sub/", "big.bin", "hello.txt"]
    accepted = get(proto, t, "/sub/", "Accept: application/json")
    assert [e["path"] for e in json.loads(accepted.body)] == ["sub/a b.txt"]
    assert get(proto, t, "/nope/").status == 404
    assert get(proto, t, "/.git/").status == 404


def test_pipelined_requests_are_answered_in_order(root: Path) -> None:
    proto, t = connect(make(root))
    heads = b"".join(b"GET /%s HTTP/1.1\r\nHost: x\r\n\r\n" % name for name in (b"hello.txt", b"big.bin", b"missing"))
    responses = parse(send(proto, t, heads), count=3)
    assert [r.status for r in responses] == [200, 200, 404]
    assert responses[0].body == SMALL and responses[1].body == BIG


def test_connection_close_and_http_1_0(root: Path) -> None:
    proto, t = connect(make(root))
    r = get(proto, t, "/hello.txt", "Connection: close")
    assert r.headers["connection"] == "close" and t.disconnecting
    proto, t = connect(make(root))
    out = send(proto, t, b"GET /hello.txt HTTP/1.0\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200 ") and out.endswith(SMALL) and t.disconnecting
    proto, t = connect(make(root))
    out = send(proto, t, b"GET /hello.txt HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    assert b"\r\nConnection: keep-alive\r\n" in out and not t.disconnecting


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET /hello.txt HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
        (b"GET /hello.txt HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nGET /", 400),
        (b"GET /hello.txt HTTP/1.1\r\n\r\n", 400),
        (b"GET /hello.txt HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", 400),
        (b"GET /hello.txt HTTP/1.1\r\nHost : x\r\n\r\n", 400),
        (b"GET /hello.txt HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n", 400),
        (b"GET /hello.txt HTTP/1.1\r\nHost: x\rY: z\r\n\r\n", 400),
        (b"GET /hello.txt HTTP/2.0\r\nHost: x\r\n\r\n", 505),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 9000 + b"\r\n\r\n", 431),
    ],
)
def test_malformed_heads_are_refused_and_closed(root: Path, head: bytes, status: int) -> None:
    proto, t = connect(make(root))
    out = send(proto, t, head)
    assert out.startswith(b"HTTP/1.1 %d " % status), out[:100]
    assert out.count(b"HTTP/1.1") == 1
    assert t.disconnecting


def test_other_methods_are_not_allowed(root: Path) -> None:
    proto, t = connect(make(root))
    r = get(proto, t, "/hello.txt", method="DELETE")
    assert r.status == 405 and r.headers["allow"] == "GET, HEAD"
    assert not t.disconnecting


def test_the_first_line_decides_the_protocol(root: Path) -> None:
    factory = make(root)
    native, tn = connect(factory)
    out = send(native, tn, b"GET hello.txt 0\r\n")
    assert out.startswith(b"OK %d " % len(SMALL)) and SMALL in out
    http, th = connect(factory)
    assert get(http, th, "/hello.txt").body == SMALL
    # Once native, always native: a later HTTP-looking line is a native error.
    assert send(native, tn, b"GET /hello.txt HTTP/1.1\r\n").startswith(b"ERR ")
    stats = send(native, tn, b"STATS\r\n").decode()
    assert "http_requests 1" in stats


def test_no_http_means_native_only(root: Path) -> None:
    proto, t = connect(make(root, http=False))
    assert send(proto, t, b"GET /hello.txt HTTP/1.1\r\n").startswith(b"ERR bad-request")


def test_a_head_must_arrive_whole_within_the_idle_timeout(root: Path) -> None:
    clock = Clock()
    proto, t = connect(make(root, clock, idle_timeout=10))
    proto.dataReceived(b"GET /hello.txt HTTP/1.1\r\n")
    for i in range(4):
        clock.advance(3)
        proto.dataReceived(b"X-%d: y\r\n" % i)
    assert t.disconnecting  # 12 s of header lines: closed at 10 s
    proto, t = connect(make(root, clock, idle_timeout=10))
    for _ in range(5):
        clock.advance(6)
        send(proto, t, b"GET /hello.txt HTTP/1.1\r\nHost: x\r\n\r\n")
    assert not t.disconnecting  # whole requests keep it open


def test_past_the_limit_http_gets_503_and_native_err_busy(root: Path) -> None:
    clock = Clock()
    factory = make(root, clock, max_connections=1)
    connect(factory)
    over = factory.buildProtocol(PEER)
    assert over is not None
    t = Transport()
    over.makeConnection(t)
    assert t.value() == b""
    over.dataReceived(b"GET /hello.txt HTTP/1.1\r\nHost: x\r\n\r\n")
    (r,) = parse(t.value())
    assert r.status == 503 and r.headers["retry-after"] == "1" and t.disconnecting
    native = factory.buildProtocol(PEER)
    assert native is not None
    t2 = Transport()
    native.makeConnection(t2)
    native.dataReceived(b"GET hello.txt 0\r\n")
    assert t2.value() == b"ERR busy too many connections; try again later\r\n"
    silent = factory.buildProtocol(PEER)
    assert silent is not None
    t3 = Transport()
    silent.makeConnection(t3)
    clock.advance(1)
    assert t3.value().startswith(b"ERR busy ") and t3.disconnecting
    # The refusals' timers are gone; only the connections' idle timers remain.
    assert len(clock.getDelayedCalls()) == 1


def test_draining_answers_carry_connection_close(root: Path) -> None:
    factory = make(root)
    _, t = connect(factory)
    busy, tb = connect(factory)
    busy.dataReceived(b"GET /big.bin HTTP/1.1\r\nHost: x\r\n\r\n")  # body under way
    factory.drain(30)
    drive(tb)
    (r,) = parse(tb.value())
    assert r.body == BIG and tb.disconnecting
    assert t.disconnecting  # idle: closed at once


def test_header_fields_seen_before_are_not_read_again_and_errors_are_never_kept(root: Path) -> None:
    factory = make(root)
    proto, t = connect(factory)
    fields = b"Host: x\r\nAccept: */*\r\n\r\n"
    first = b"GET /hello.txt HTTP/1.1\r\n" + fields
    second = b"HEAD /big.bin HTTP/1.1\r\n" + fields
    # Empty lines between requests are ignored (RFC 9112 2.2).
    responses = parse(send(proto, t, first + b"\r\n\r\n" + second), [b"GET", b"HEAD"])
    assert [r.status for r in responses] == [200, 200]
    assert responses[0].body == SMALL and responses[1].headers["content-length"] == str(len(BIG))
    kept = factory.http_heads.get((1, 1), fields)
    assert kept is not None and kept.get(b"accept") == b"*/*"
    # The same fields under HTTP/1.0 are another entry; a bad request line
    # before known fields is still refused.
    assert factory.http_heads.get((1, 0), fields) is None
    other, t2 = connect(factory)
    assert send(other, t2, b"GET /hello.txt HTTP/2.0\r\n" + fields).startswith(b"HTTP/1.1 505 ")
    other, t2 = connect(factory)
    out = send(other, t2, first + b"GET  /hello.txt HTTP/1.1\r\n" + fields)
    assert out.count(b"HTTP/1.1 200 ") == 1 and b"HTTP/1.1 400 " in out and t2.disconnecting
    bad = b"Host: x\r\nHost: y\r\n\r\n"
    for _ in range(2):
        other, t2 = connect(factory)
        assert send(other, t2, b"GET /hello.txt HTTP/1.1\r\n" + bad).startswith(b"HTTP/1.1 400 ")
    assert factory.http_heads.get((1, 1), bad) is None


def test_refusals_of_head_requests_have_no_body(root: Path) -> None:
    for head in (b"HEAD /hello.txt HTTP/1.1\r\n\r\n", b"HEAD /hello.txt HTTP/2.0\r\nHost: x\r\n\r\n",
                 b"HEAD /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n"):
        proto, t = connect(make(root))
        out = send(proto, t, head)
        assert out.endswith(b"\r\n\r\n") and out.count(b"HTTP/1.1 ") == 1, out[:200]


def test_the_access_log_says_what_went_out(root: Path) -> None:
    """
    One line per answer, in the native protocol's log: the protocol and the
    request, the status, the body bytes sent (an error's text too, a HEAD's
    none), and a cut body marked as such with the bytes that did go out.
    """
    events: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "filecache.daemon.native.FileCacheProtocol" and "cache" in event:
            events.append(event)

    observer = cast(ILogObserver, observe)
    globalLogPublisher.addObserver(observer)
    try:
        factory = make(root)
        factory.access_log = True
        proto, t = connect(factory)
        get(proto, t, "/hello.txt")
        get(proto, t, "/hello.txt", method="HEAD")
        get(proto, t, "/missing")
        proto.dataReceived(b"GET /big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
        producer = t.producer
        assert producer is not None
        producer.resumeProducing()  # a few slices out, then the client leaves
        sent = len(t.value()) - t.value().index(b"\r\n\r\n") - 4
        producer.stopProducing()
    finally:
        globalLogPublisher.removeObserver(observer)
    rows = [(e["request"], e["status"], e["size"]) for e in events]
    assert rows[:3] == [
        ("HTTP/1.1 GET /hello.txt", "200", len(SMALL)),
        ("HTTP/1.1 HEAD /hello.txt", "200", 0),
        ("HTTP/1.1 GET /missing", "404", len(b"no such file\n")),
    ]
    assert rows[3][:2] == ("HTTP/1.1 GET /big.bin", "200-cut")
    assert 0 < rows[3][2] == sent < len(BIG)


class CountingHeads:
    """The factory's memo of parsed header fields, counting how often it is asked."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.asked = 0

    def get(self, version: tuple[int, int], fields: bytes) -> Any:
        self.asked += 1
        return self.real.get(version, fields)

    def keep(self, fields: bytes, head: Any) -> None:
        self.real.keep(fields, head)


def test_a_plain_get_seen_before_is_answered_without_reading_its_head(root: Path) -> None:
    """
    A read that is exactly a plain GET head answered before gets the same
    response (but for Date) with no parsing at all, on any connection; a
    changed file is still seen, and a head that asks more is never kept.
    """
    factory = make(root)
    heads = CountingHeads(factory.http_heads)
    factory.http_heads = heads  # type: ignore[assignment]
    block = b"GET /hello.txt HTTP/1.1\r\nHost: x\r\nUser-Agent: t\r\n\r\n"
    proto, t = connect(factory)
    first = send(proto, t, block)
    asked = heads.asked
    again = [send(proto, t, block) for _ in range(3)]
    other, t2 = connect(factory)
    again.append(send(other, t2, block))
    assert heads.asked == asked, "a known plain GET was parsed again"
    (expected,) = parse(first)
    for out in again:
        (r,) = parse(out)
        assert (r.status, r.headers, r.body) == (expected.status, expected.headers, expected.body)
    assert expected.body == SMALL and expected.headers["repr-digest"] == digest_header(SMALL)

    (root / "hello.txt").write_bytes(b"changed!")
    (r,) = parse(send(proto, t, block))
    assert r.body == b"changed!" and r.headers["etag"] != expected.headers["etag"]

    for other_head in (
        b"GET /hello.txt HTTP/1.1\r\nHost: x\r\nRange: bytes=0-1\r\n\r\n",
        b"GET /hello.txt HTTP/1.1\r\nHost: x\r\nIf-None-Match: \"x\"\r\n\r\n",
        b"GET /hello.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"GET /hello.txt HTTP/1.0\r\nHost: x\r\n\r\n",
        b"HEAD /hello.txt HTTP/1.1\r\nHost: x\r\n\r\n",
    ):
        proto, t = connect(factory)
        send(proto, t, other_head)
        assert factory.http_plain.get(other_head) is None, other_head


def test_a_known_plain_get_while_draining_says_connection_close(root: Path) -> None:
    """The shortcut steps aside on SIGTERM: the answer closes the connection."""
    factory = make(root)
    block = b"GET /hello.txt HTTP/1.1\r\nHost: x\r\n\r\n"
    proto, t = connect(factory)
    send(proto, t, block)
    send(proto, t, block)
    factory.drain(30)
    proto, t = connect(factory)
    (r,) = parse(send(proto, t, block))
    assert r.body == SMALL and r.headers["connection"] == "close" and t.disconnecting


def test_a_known_head_split_over_two_reads_or_pipelined_is_still_answered(root: Path) -> None:
    """Only a read that is exactly one head takes the shortcut; the others are read as ever."""
    factory = make(root)
    block = b"GET /hello.txt HTTP/1.1\r\nHost: x\r\n\r\n"
    proto, t = connect(factory)
    send(proto, t, block)
    proto.dataReceived(block[:10])
    (r,) = parse(send(proto, t, block[10:]))
    assert r.body == SMALL
    responses = parse(send(proto, t, block * 3), count=3)
    assert [r.body for r in responses] == [SMALL] * 3


def test_the_health_path_says_ok_then_503_while_draining(root: Path) -> None:
    """/.filecache/health: 200 ok while serving (HEAD too), 503 with Retry-After once draining."""
    factory = make(root)
    proto, t = connect(factory)
    r = get(proto, t, "/.filecache/health")
    assert (r.status, r.body, r.headers["cache-control"]) == (200, b"ok\n", "no-store")
    r = get(proto, t, "/.filecache/health", method="HEAD")
    assert (r.status, r.body) == (200, b"")
    (root / ".filecache").mkdir()
    (root / ".filecache" / "other").write_bytes(b"x")
    assert get(proto, t, "/.filecache/other").status == 404
    factory.drain(30)
    proto, t = connect(factory)
    r = get(proto, t, "/.filecache/health")
    assert (r.status, r.headers["retry-after"], r.headers["connection"]) == (503, "1", "close")


def test_known_requests_are_bounded_in_count_and_size() -> None:
    """The memo of plain requests keeps at most its entries (the oldest go first) and no long request."""
    from filecache.daemon.httpkept import HEAD_MEMO_SIZE, KnownRequests

    known: KnownRequests[str] = KnownRequests(entries=2)
    known.keep(b"a", "1")
    known.keep(b"b", "2")
    known.keep(b"a", "again")  # already known: kept as it was, not moved
    known.keep(b"c", "3")
    assert (known.get(b"a"), known.get(b"b"), known.get(b"c")) == (None, "2", "3")
    long = b"x" * (HEAD_MEMO_SIZE + 1)
    known.keep(long, "long")
    assert known.get(long) is None and known.get(b"c") == "3"
