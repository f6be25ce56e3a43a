"""
FileCacheClientProtocol in memory against replies a daemon should not send:
the LIST framing (OK, rows, END <n>, or ERR part-way), the caps on LIST and
STATS replies, the pace --timeout demands of a reply once it has begun, and
the client's reading of reply lines (reply_lines), malformed ones included.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import pytest
from conftest import connected_client
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.error import ConnectionAborted
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from filecache import wire
from filecache.client import readers, reply_lines
from filecache.client.errors import BrokenReply, ConnectionLostEarly, MalformedReply, ServerError
from filecache.client.exits import EXIT_INTEGRITY, describe, exit_status
from filecache.client.pace import MIN_PROGRESS
from filecache.client.protocol import FileCacheClientProtocol
from filecache.client.readers import Download

VERSION = "2a-64-18ea3fdc92c71808"
ROW_A = b"5 1700000000 C a%20b.txt\r\n"
ROW_B = b"7 1700000001 - sub/c.txt\r\n"


class Sink:
    """A BodySink that keeps what it is given."""

    def __init__(self) -> None:
        self.data = b""

    def begin(self, size: int, version: str) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.data += data




def outcome(d: Any) -> list[Any]:
    """Collect what C{d} fires with (a result or a Failure)."""
    seen: list[Any] = []
    d.addBoth(seen.append)
    return seen


def lost(proto: FileCacheClientProtocol) -> None:
    proto.connectionLost(Failure(ConnectionAborted()))


# LIST framing


def test_list_reply_is_ok_rows_and_end_n() -> None:
    """OK, two rows, END 2: the rows, in the order sent; the connection stays usable."""
    proto, transport = connected_client()
    seen = outcome(proto.list())
    proto.dataReceived(b"OK\r\n" + ROW_A + ROW_B + b"END 2\r\n")
    assert seen == [
        [wire.ListRow(5, 1700000000, True, "a b.txt"), wire.ListRow(7, 1700000001, False, "sub/c.txt")]
    ]
    assert proto.usable and not transport.disconnecting


def test_empty_list_reply() -> None:
    """OK then END 0 is an empty listing."""
    proto, _ = connected_client()
    seen = outcome(proto.list())
    proto.dataReceived(b"OK\r\nEND 0\r\n")
    assert seen == [[]]


def test_err_in_place_of_end_drops_the_rows_and_keeps_the_connection() -> None:
    """
    Rows, then ERR unavailable instead of END: the LIST fails with that
    ServerError (no partial listing), and the next request goes out on the
    same connection.
    """
    proto, transport = connected_client()
    seen = outcome(proto.list())
    after = outcome(proto.stats())
    transport.clear()
    proto.dataReceived(b"OK\r\n" + ROW_A + ROW_B + b"ERR unavailable the scan took too long\r\n")
    assert len(seen) == 1 and isinstance(seen[0], Failure)
    error = seen[0].value
    assert isinstance(error, ServerError)
    assert (error.code, error.message) == ("unavailable", "the scan took too long")
    assert transport.value() == b"STATS\r\n"
    proto.dataReceived(b"OK 1\r\nhits 2\r\n")
    assert after == [[("hits", 2)]]
    assert not transport.disconnecting


def test_end_that_does_not_count_the_rows_is_a_broken_reply() -> None:
    """END 3 after two rows: BrokenReply, and the connection is dropped."""
    proto, transport = connected_client()
    seen = outcome(proto.list())
    proto.dataReceived(b"OK\r\n" + ROW_A + ROW_B + b"END 3\r\n")
    assert transport.disconnecting
    lost(proto)
    assert isinstance(seen[0].value, BrokenReply)
    assert str(seen[0].value) == "the LIST reply ends with END 3 after 2 rows"


def test_old_ok_n_framing_is_refused() -> None:
    """The old `OK <n>` LIST status is refused at once, not waited on for an END."""
    proto, transport = connected_client()
    seen = outcome(proto.list())
    proto.dataReceived(b"OK 1\r\n" + ROW_A)
    assert transport.disconnecting
    lost(proto)
    assert isinstance(seen[0].value, BrokenReply)
    assert "expected OK alone" in str(seen[0].value)


def test_list_rows_are_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    One row more than wire.MAX_LIST_ROWS (3 here): BrokenReply saying so,
    the connection dropped at that row, and nothing after it is parsed.
    """
    monkeypatch.setattr(wire, "MAX_LIST_ROWS", 3)
    proto, transport = connected_client()
    seen = outcome(proto.list())
    proto.dataReceived(b"OK\r\n" + ROW_A * 3)
    assert not transport.disconnecting
    proto.dataReceived(ROW_A + b"garbage that would be a malformed row\r\n")
    assert transport.disconnecting
    lost(proto)
    assert isinstance(seen[0].value, BrokenReply)
    assert str(seen[0].value) == "the LIST reply holds more than 3 rows"


def test_list_bytes_are_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows adding up to more than MAX_LIST_BYTES: BrokenReply, whatever their count."""
    monkeypatch.setattr(readers, "MAX_LIST_BYTES", 3 * len(ROW_A) - 1)
    proto, transport = connected_client()
    seen = outcome(proto.list())
    proto.dataReceived(b"OK\r\n" + ROW_A * 3)
    assert transport.disconnecting
    lost(proto)
    assert isinstance(seen[0].value, BrokenReply)
    assert "MiB of rows" in str(seen[0].value)


def test_stats_count_is_capped() -> None:
    """A STATS status announcing more than MAX_STATS_ROWS rows is refused before any row."""
    proto, transport = connected_client()
    seen = outcome(proto.stats())
    proto.dataReceived(b"OK %d\r\n" % (readers.MAX_STATS_ROWS + 1,))
    assert transport.disconnecting
    lost(proto)
    assert isinstance(seen[0].value, BrokenReply)


def test_stats_text_values_and_unknown_keys() -> None:
    """STATS rows with a text value (version) and keys the client does not know are kept as sent."""
    proto, _ = connected_client()
    seen = outcome(proto.stats())
    proto.dataReceived(b"OK 3\r\nversion 1.2.3\r\nuptime_seconds 7\r\nworker 2\r\n")
    assert seen == [[("version", "1.2.3"), ("uptime_seconds", 7), ("worker", 2)]]


# The pace --timeout demands


def test_a_dripped_status_line_times_out() -> None:
    """
    A server sending its status line one byte every 0.5 s (each byte would
    reset a silence timer): with timeout=5, the client gives up 5 s after
    the request, with the silence message.
    """
    clock = Clock()
    proto, transport = connected_client(timeout=5, clock=clock)
    seen = outcome(proto.get("f.bin", Sink()))
    for byte in (b"OK 100 " + VERSION.encode())[:9]:
        clock.advance(0.5)
        proto.dataReceived(bytes([byte]))
    assert not transport.disconnecting
    clock.advance(0.5)
    assert transport.disconnecting
    lost(proto)
    assert isinstance(seen[0].value, ConnectionLostEarly)
    assert str(seen[0].value) == "timed out waiting for the server"
    assert clock.getDelayedCalls() == []


def test_a_dripped_body_times_out_as_too_slow() -> None:
    """
    A prompt status line, then 100 bytes of body a second: the first 5 s
    window after the status line brings under MIN_PROGRESS bytes, so the
    client gives up then ("too slow"), not never.
    """
    clock = Clock()
    proto, transport = connected_client(timeout=5, clock=clock)
    seen = outcome(proto.get("f.bin", Sink()))
    proto.dataReceived(b"OK 1000000 " + VERSION.encode() + b"\r\n")
    for _ in range(4):
        clock.advance(1)
        proto.dataReceived(b"x" * 100)
    clock.advance(0.9)
    assert not transport.disconnecting
    clock.advance(0.1)
    assert transport.disconnecting
    lost(proto)
    assert isinstance(seen[0].value, ConnectionLostEarly)
    assert str(seen[0].value) == "the server is too slow: under 16 KiB in 5 s"


def test_dripped_list_rows_time_out_as_too_slow() -> None:
    """LIST rows trickling in (one short row a second) are cut at the end of the first window."""
    clock = Clock()
    proto, transport = connected_client(timeout=5, clock=clock)
    seen = outcome(proto.list())
    proto.dataReceived(b"OK\r\n")
    for _ in range(5):
        clock.advance(1)
        if not transport.disconnecting:
            proto.dataReceived(ROW_A)
    assert transport.disconnecting
    lost(proto)
    assert str(seen[0].value) == "the server is too slow: under 16 KiB in 5 s"


def test_a_steady_body_is_never_cut_and_no_timer_is_left() -> None:
    """
    MIN_PROGRESS bytes in every window, for many windows: the GET
    completes, and once it has, no timer is left running.
    """
    clock = Clock()
    proto, transport = connected_client(timeout=5, clock=clock)
    body = b"y" * (MIN_PROGRESS * 10)
    seen = outcome(proto.get("f.bin", Sink()))
    proto.dataReceived(b"OK %d %s\r\n" % (len(body), VERSION.encode()))
    for i in range(10):
        clock.advance(4.5)
        proto.dataReceived(body[i * MIN_PROGRESS : (i + 1) * MIN_PROGRESS])
        assert not transport.disconnecting
    clock.advance(4.5)
    proto.dataReceived(b"END " + hashlib.sha256(body).hexdigest().encode() + b"\r\n")
    assert seen == [Download(len(body), VERSION, hashlib.sha256(body).hexdigest())]
    assert clock.getDelayedCalls() == []
    clock.advance(60)
    assert not transport.disconnecting


def test_no_pace_rule_without_a_timeout() -> None:
    """timeout=None (--timeout 0) waits for ever: no timer at all."""
    clock = Clock()
    proto, transport = connected_client(timeout=None, clock=clock)
    outcome(proto.list())
    proto.dataReceived(b"OK\r\n")
    assert clock.getDelayedCalls() == []
    clock.advance(3600)
    assert not transport.disconnecting


# Reading reply lines

DIGEST = "ab" * 32
VERSIONS = [b"2a-64-18ea", b"2A", b"7", b"a--b"]
DIGESTS = [DIGEST.encode(), DIGEST.upper().encode(), DIGEST[:-1].encode()]
NUMBERS = [b"12", b"0", b"-5", b"1e3"]
ENDINGS = [b"", b"\r", b"\r\r", b" ", b" \r", b"\t"]


def line_of(*positions: list[bytes]) -> st.SearchStrategy[bytes]:
    """
    A line of words, each drawn from its position's choices (the first
    ones well-formed), cut short or given an extra word now and then, with
    one of several endings.
    """
    return st.tuples(
        st.tuples(*(st.one_of(st.just(c[0]), st.sampled_from(c)) for c in positions)),
        st.one_of(st.just(len(positions)), st.integers(0, len(positions) + 1)),
        st.one_of(st.just(b"\r"), st.sampled_from(ENDINGS)),
    ).map(lambda t: b" ".join((*t[0], b"x")[: t[1]]) + t[2])


reply_line = st.one_of(
    st.binary(max_size=60),
    line_of([b"OK", b"ok", b"OK1"], NUMBERS, VERSIONS, DIGESTS),
    line_of([b"ERR"], [b"not-found", b"", b"\xff"], [b"no such file", b"x\ry", b""]),
    line_of([b"END"], DIGESTS + NUMBERS),
    line_of(NUMBERS, NUMBERS, [b"C", b"-", b"c"], [b"a%20b", b"s/c", b"%zz", b"%ff", b"\xff"]),
    line_of([b"hits", b"version", b""], [b"7", b"-3", b"1.2.3", b"\x7f", b""]),
)

READERS: list[Callable[[bytes], object]] = [
    reply_lines.parse_status,
    lambda line: reply_lines.parse_count(reply_lines.parse_status(line)),
    lambda line: reply_lines.parse_get_status(reply_lines.parse_status(line)),
    lambda line: reply_lines.parse_hash_status(reply_lines.parse_status(line)),
    reply_lines.parse_end,
    reply_lines.parse_list_row,
    reply_lines.parse_list_end,
    reply_lines.parse_stats_row,
]


@settings(max_examples=300, deadline=None)
@given(reply_line)
def test_the_client_reads_reply_lines_failing_only_as_malformed_reply(line: bytes) -> None:
    """
    On any line, each of the client's readers gives a value or fails with a
    MalformedReply: never with a WireError carrying a server error code,
    nor with anything else.
    """
    for reader in READERS:
        try:
            reader(line)
        except MalformedReply:
            pass


def test_a_malformed_status_line_fails_the_request_with_malformed_reply() -> None:
    """
    A status line that is neither OK nor ERR: the request fails with
    MalformedReply (a BrokenReply: exit 4, said as an integrity failure),
    and the connection is dropped.
    """
    proto, transport = connected_client()
    seen = outcome(proto.get("f.bin", Sink()))
    proto.dataReceived(b"HELLO there\r\n")
    assert transport.disconnecting
    lost(proto)
    error = seen[0].value
    assert isinstance(error, MalformedReply) and isinstance(error, BrokenReply)
    assert str(error) == "malformed reply from server: malformed status line from server"
    assert exit_status(error) == EXIT_INTEGRITY == 4
    assert describe(error) == (
        "integrity check failed: malformed reply from server: malformed status line from server"
    )


def test_a_bad_escape_in_a_list_row_is_a_malformed_reply() -> None:
    """A LIST row whose path has a broken %-escape fails the LIST with MalformedReply, not a WireError."""
    proto, transport = connected_client()
    seen = outcome(proto.list())
    proto.dataReceived(b"OK\r\n5 1700000000 C a%zz\r\n")
    assert transport.disconnecting
    lost(proto)
    assert isinstance(seen[0].value, MalformedReply)
    assert str(seen[0].value) == "malformed reply from server: malformed percent escape"


def test_the_cr_is_taken_off_once_by_the_protocol() -> None:
    """
    Reply lines may end in CRLF or a bare LF, alike; the protocol takes one
    CR off a line, so END <digest> followed by two CRs is still malformed.
    """
    proto, _ = connected_client()
    seen = outcome(proto.stats())
    proto.dataReceived(b"OK 2\nhits 2\r\nversion 1.2.3\n")
    assert seen == [[("hits", 2), ("version", "1.2.3")]]
    body = b"abc"
    digest = hashlib.sha256(body).hexdigest().encode()
    got = outcome(proto.get("f.bin", Sink()))
    proto.dataReceived(b"OK 3 " + VERSION.encode() + b"\r\n" + body + b"END " + digest + b"\n")
    assert got == [Download(3, VERSION, digest.decode())]
    proto, transport = connected_client()
    got = outcome(proto.get("f.bin", Sink()))
    proto.dataReceived(b"OK 3 " + VERSION.encode() + b"\r\n" + body + b"END " + digest + b"\r\r\n")
    assert transport.disconnecting
    lost(proto)
    assert str(got[0].value) == "malformed reply from server: malformed END line"


@pytest.mark.parametrize("ending, refused", [(b"\r\n", True), (b"\n", False)])
def test_list_bytes_count_each_row_as_it_came(
    monkeypatch: pytest.MonkeyPatch, ending: bytes, refused: bool
) -> None:
    """
    MAX_LIST_BYTES counts a row's bytes as sent, its CR and LF included:
    taking the CR off before the readers see the line does not loosen it.
    Three CRLF rows are one byte over the limit; the same rows with bare
    LFs are within it.
    """
    monkeypatch.setattr(readers, "MAX_LIST_BYTES", 3 * len(ROW_A) - 1)
    row = ROW_A[:-2] + ending
    proto, transport = connected_client()
    seen = outcome(proto.list())
    proto.dataReceived(b"OK\r\n" + row * 3 + b"END 3\r\n")
    if refused:
        assert transport.disconnecting
        lost(proto)
        assert "MiB of rows" in str(seen[0].value)
    else:
        assert not transport.disconnecting
        assert len(seen[0]) == 3


def test_pipelined_replies_move_their_timers_instead_of_making_new_ones() -> None:
    """
    Eight pipelined HASHes: each reply's timers (the silence timeout and
    the pace rule) are moved on to the next reply, not cancelled and made
    again, so two timers are made for all of them; none is left once the
    last reply is in, and a reply that never comes still times out.
    """
    clock = Clock()
    made: list[float] = []
    call_later = clock.callLater

    def counting(delay: float, f: Any, *args: Any) -> Any:
        made.append(delay)
        return call_later(delay, f, *args)

    clock.callLater = counting  # type: ignore[method-assign,assignment]
    proto = FileCacheClientProtocol(timeout=5, clock=clock, pipeline=8)
    transport = StringTransport()
    proto.makeConnection(transport)
    digest = "0" * 64
    seen = [outcome(proto.hash(f"f{n}.bin")) for n in range(8)]
    proto.dataReceived(b"".join(b"OK 1 %s %s\r\n" % (VERSION.encode(), digest.encode()) for _ in range(7)))
    assert [len(s) for s in seen] == [1] * 7 + [0]
    assert len(made) == 2
    proto.dataReceived(b"OK 1 %s %s\r\n" % (VERSION.encode(), digest.encode()))
    assert clock.getDelayedCalls() == []
    proto.hash("g.bin")
    clock.advance(4.9)
    assert not transport.disconnecting
    clock.advance(0.2)
    assert transport.disconnecting
