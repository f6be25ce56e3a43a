"""
Tests for L{filecache.client.reply_lines}: the client reads back what
L{filecache.wire} writes, and a malformed line from the server is a
L{MalformedReply} (the client's error, not a protocol error code).
"""

from __future__ import annotations

import hashlib

import pytest
from conftest import crlf_lines
from hypothesis import given, settings
from hypothesis import strategies as st

from filecache.client.errors import MalformedReply
from filecache.client.reply_lines import (
    parse_count,
    parse_end,
    parse_get_status,
    parse_list_end,
    parse_list_row,
    parse_stats_row,
    parse_status,
)
from filecache.wire import (
    ListRow,
    Status,
    format_end,
    format_get_status,
    format_list,
    format_stats,
)

FAST = settings(max_examples=200, deadline=None)
utf8_text = st.text(st.characters(codec="utf-8"))
DIGEST = hashlib.sha256(b"hello").hexdigest()




# The client reads the server's reply lines (its line handling has
# already taken off the CRLF).


@pytest.mark.parametrize(
    "line, expected",
    [
        (b"OK", Status(ok=True, fields=())),
        (b"OK 5", Status(ok=True, fields=(b"5",))),
        (b"OK 22 abc-16", Status(ok=True, fields=(b"22", b"abc-16"))),
        (b"ERR not-found no such file", Status(ok=False, code="not-found", message="no such file")),
        (b"ERR busy", Status(ok=False, code="busy", message="")),
        (b"ERR too-long x y  z", Status(ok=False, code="too-long", message="x y  z")),
    ],
)
def test_parse_status(line: bytes, expected: Status) -> None:
    """parse_status splits OK fields and ERR code and text."""
    assert parse_status(line) == expected


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"\r",
        b"OKAY",
        b"OK5",
        b"ERR",
        b"ERRnot-found",
        b"HELLO",
        b"END " + DIGEST.encode(),
        b" OK",
    ],
)
def test_parse_status_malformed(line: bytes) -> None:
    """A line that is neither OK ... nor ERR <code> ... raises MalformedReply."""
    with pytest.raises(MalformedReply):
        parse_status(line)


def test_parse_count() -> None:
    """parse_count returns the n of OK <n>."""
    assert parse_count(parse_status(b"OK 0")) == 0
    assert parse_count(parse_status(b"OK 12")) == 12


@pytest.mark.parametrize("line", [b"OK", b"OK x", b"OK -1", b"OK 1 2", b"OK 1.0", b"OK +1"])
def test_parse_count_malformed(line: bytes) -> None:
    """An OK status without exactly one decimal count raises MalformedReply."""
    with pytest.raises(MalformedReply):
        parse_count(parse_status(line))


@FAST
@given(
    st.integers(0, 2**64),
    st.lists(st.integers(0, 2**64), min_size=1, max_size=4).map(
        lambda ns: "-".join(f"{n:x}" for n in ns)
    ),
)
def test_get_status_round_trip(size: int, version: str) -> None:
    """parse_get_status reads back what format_get_status writes."""
    line = format_get_status(size, version)
    assert parse_get_status(parse_status(line[:-2])) == (size, version)


@pytest.mark.parametrize(
    "line",
    [
        b"OK",
        b"OK 5",
        b"OK 5 abc extra",
        b"OK x abc",
        b"OK -5 abc",
        b"OK 5 ABC",
        b"OK 5 abc-",
        b"OK 5 -abc",
        b"OK 5 a--b",
        b"OK 5 xyz",
        b"OK 5 a_b",
    ],
)
def test_parse_get_status_malformed(line: bytes) -> None:
    """A GET status without a decimal size and a lower-case hex-words version raises MalformedReply."""
    with pytest.raises(MalformedReply):
        parse_get_status(parse_status(line))


def test_parse_end_round_trip() -> None:
    """parse_end returns the digest format_end wrote; the CR is the line handling's to take off."""
    line = format_end(DIGEST)
    assert parse_end(line[:-2]) == DIGEST
    with pytest.raises(MalformedReply):
        parse_end(line[:-1])


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"END",
        b"END ",
        b"END " + DIGEST.upper().encode(),
        b"END " + DIGEST[:-1].encode(),
        b"END " + DIGEST.encode() + b"0",
        b"END " + DIGEST.encode() + b" ",
        b"END  " + DIGEST.encode(),
        b"end " + DIGEST.encode(),
        b"OK " + DIGEST.encode(),
        b"END " + b"g" * 64,
    ],
)
def test_parse_end_malformed(line: bytes) -> None:
    """Anything but END and 64 lower-case hex digits raises MalformedReply."""
    with pytest.raises(MalformedReply):
        parse_end(line)


list_rows = st.builds(
    ListRow,
    size=st.integers(0, 2**64),
    mtime=st.integers(-(2**40), 2**40),
    cached=st.booleans(),
    path=utf8_text.filter(bool),
)


@FAST
@given(st.lists(list_rows, max_size=10))
def test_list_round_trip(rows: list[ListRow]) -> None:
    """Parsing the lines of format_list gives back every row, in order, and END's count."""
    lines = crlf_lines(format_list(rows))
    assert parse_status(lines[0]) == Status(ok=True, fields=())
    assert parse_list_end(lines[-1]) == len(rows)
    assert [parse_list_end(line) for line in lines[1:-1]] == [None] * len(rows)
    assert [parse_list_row(line) for line in lines[1:-1]] == rows


@pytest.mark.parametrize("line", [b"END", b"END ", b"END x", b"END -1", b"END 1 2", b"ENDS 1"])
def test_parse_list_end_malformed(line: bytes) -> None:
    """A line that starts like END but is not END <n> raises MalformedReply."""
    with pytest.raises(MalformedReply):
        parse_list_end(line)


def test_stats_text_values() -> None:
    """STATS rows may carry a text value (version); it round-trips, integers stay integers."""
    reply = format_stats([("version", "0.2.0"), ("hits", -3)])
    lines = crlf_lines(reply)
    assert [parse_stats_row(line) for line in lines[1:]] == [("version", "0.2.0"), ("hits", -3)]


def test_parse_list_row_example() -> None:
    """parse_list_row decodes size, mtime, cached flag and percent-encoded path."""
    assert parse_list_row(b"23 1795317618 C my%20notes.txt") == ListRow(
        23, 1795317618, True, "my notes.txt"
    )
    assert parse_list_row(b"0 -5 - a") == ListRow(0, -5, False, "a")


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"1 2 C",
        b"1 2 C a b",
        b"1  2 C a",
        b"x 2 C a",
        b"-1 2 C a",
        b"1 x C a",
        b"1 - C a",
        b"1 2 c a",
        b"1 2 X a",
        b"1 2 CC a",
        b"1 2 C %zz",
        b"1 2 C %ff",
        b"1 2.5 C a",
        b"1 --5 C a",
        b"1 5- C a",
    ],
)
def test_parse_list_row_malformed(line: bytes) -> None:
    """A malformed LIST row raises MalformedReply (and nothing else)."""
    with pytest.raises(MalformedReply):
        parse_list_row(line)


@FAST
@given(
    st.lists(
        st.tuples(
            st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyz_"), min_size=1, max_size=20),
            st.integers(-(2**63), 2**64),
        ),
        max_size=12,
    )
)
def test_stats_round_trip(stats: list[tuple[str, int]]) -> None:
    """Parsing the lines of format_stats gives back the count and every key and value, in order."""
    lines = crlf_lines(format_stats(stats))
    assert parse_count(parse_status(lines[0])) == len(stats)
    assert [parse_stats_row(line) for line in lines[1:]] == stats


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"\r",
        b"hits",
        b"hits ",
        b" 5",
        b"hits 1 2",
        b"hits \x1b",
        b"hits \xff",
    ],
)
def test_parse_stats_row_malformed(line: bytes) -> None:
    """A malformed STATS row raises MalformedReply (and nothing else)."""
    with pytest.raises(MalformedReply):
        parse_stats_row(line)


@FAST
@given(st.binary(max_size=40))
def test_client_parsers_only_raise_malformed_reply(line: bytes) -> None:
    """On arbitrary bytes each client-side parser returns a value or raises MalformedReply, nothing else."""
    for parse in (parse_status, parse_end, parse_list_row, parse_stats_row):
        try:
            parse(line)
        except MalformedReply:
            pass
