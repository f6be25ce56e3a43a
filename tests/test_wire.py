"""
Tests for L{filecache.wire}: the pure functions that parse and format the
version 1 wire protocol described in docs/protocol.md.
"""

from __future__ import annotations

import hashlib
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from filecache import wire
from filecache.client.reply_lines import parse_status
from filecache.wire import (
    BAD_REQUEST,
    MAX_LINE,
    TOO_LONG,
    GetRequest,
    ListRequest,
    ListRow,
    PathError,
    QuitRequest,
    StatsRequest,
    Status,
    WireError,
    format_end,
    format_error,
    format_get_status,
    format_list,
    format_request,
    format_stats,
    parse_request,
    printable,
    printable_bytes,
    quote_path,
    split_path,
    unquote_path,
)

FAST = settings(max_examples=200, deadline=None)

# Any text that can be encoded to UTF-8: every code point but lone surrogates.
utf8_text = st.text(st.characters(codec="utf-8"))
SAFE_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~/%")
DIGEST = hashlib.sha256(b"hello").hexdigest()




# parse_request


@pytest.mark.parametrize(
    "line, expected",
    [
        (b"LIST", ListRequest()),
        (b"list", ListRequest()),
        (b"List", ListRequest()),
        (b"LIST CACHED", ListRequest(cached=True)),
        (b"list cached", ListRequest(cached=True)),
        (b"STATS", StatsRequest()),
        (b"stats", StatsRequest()),
        (b"sTaTs", StatsRequest()),
        (b"QUIT", QuitRequest()),
        (b"quit", QuitRequest()),
        (b"GET a", GetRequest("a", 0)),
        (b"get docs/readme.txt", GetRequest("docs/readme.txt", 0)),
        (b"Get docs/readme.txt", GetRequest("docs/readme.txt", 0)),
        (b"GET a 0", GetRequest("a", 0)),
        (b"GET a 17", GetRequest("a", 17)),
        (b"GET a 007", GetRequest("a", 7)),
        (b"GET a 18446744073709551615", GetRequest("a", 18446744073709551615)),
        (b"GET my%20notes.txt", GetRequest("my notes.txt", 0)),
        (b"GET caf%C3%A9 3", GetRequest("caf\u00e9", 3)),
        (b"GET %2e%2e/etc/passwd", GetRequest("../etc/passwd", 0)),
    ],
)
def test_parse_request_valid(line: bytes, expected: object) -> None:
    """Each verb parses, case-insensitively, into its request object with decoded path and offset."""
    assert parse_request(line) == expected


@pytest.mark.parametrize(
    "line, expected",
    [
        (b"LIST\r", ListRequest()),
        (b"LIST CACHED\r", ListRequest(cached=True)),
        (b"STATS\r", StatsRequest()),
        (b"QUIT\r", QuitRequest()),
        (b"GET a\r", GetRequest("a", 0)),
        (b"GET a 5\r", GetRequest("a", 5)),
    ],
)
def test_parse_request_ignores_trailing_cr(line: bytes, expected: object) -> None:
    """A line ended by CRLF (so seen with a trailing CR) parses the same as one ended by LF."""
    assert parse_request(line) == expected
    assert parse_request(line[:-1]) == expected


@pytest.mark.parametrize(
    "line",
    [
        b"GET a -1",
        b"GET a +1",
        b"GET a x",
        b"GET a 1.5",
        b"GET a 0x10",
        b"GET a 1e3",
        b"GET a ",
        b"GET a \xef\xbc\x91",  # FULLWIDTH DIGIT ONE
        b"GET a 123456789012345678901",  # 21 digits
    ],
)
def test_parse_request_bad_offset(line: bytes) -> None:
    """An offset that is not a plain decimal non-negative integer is bad-request."""
    with pytest.raises(WireError) as info:
        parse_request(line)
    assert info.value.code == BAD_REQUEST


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"\r",
        b" ",
        b"HELLO",
        b"GETT a",
        b"LISTCACHED",
        b"DELETE a",
        b"\xff\xfe",
        b" LIST",
        b"GET",
        b"GET ",
        b"GET  a",
        b"GET a 1 2",
        b"GET a b c",
        b"LIST ALL",
        b"LIST CACHED NOW",
        b"LIST ",
        b"STATS now",
        b"STATS ",
        b"QUIT now",
        b"QUIT ",
        b"GET %zz",
        b"GET %4",
        b"GET a%",
        b"GET %ff",
    ],
)
def test_parse_request_bad_request(line: bytes) -> None:
    """Empty lines, unknown verbs, wrong arguments and bad paths are all bad-request."""
    with pytest.raises(WireError) as info:
        parse_request(line)
    assert info.value.code == BAD_REQUEST


def test_parse_request_line_of_exactly_max_length_is_accepted() -> None:
    """A line of exactly 4096 bytes (plus an ignored CR) is not too long."""
    path = "a" * (MAX_LINE - len(b"GET "))
    line = b"GET " + path.encode("ascii")
    assert len(line) == MAX_LINE == 4096
    assert parse_request(line) == GetRequest(path)
    assert parse_request(line + b"\r") == GetRequest(path)


@pytest.mark.parametrize(
    "line",
    [
        b"GET " + b"a" * (MAX_LINE - 3),
        b"GET " + b"a" * (MAX_LINE - 3) + b"\r",
        b"x" * (MAX_LINE + 1),
        b"LIST " + b" " * MAX_LINE,
        b"\xff" * 100_000,
    ],
)
def test_parse_request_too_long(line: bytes) -> None:
    """A line over 4096 bytes (its CR not counted) is too-long, whatever it holds."""
    with pytest.raises(WireError) as info:
        parse_request(line)
    assert info.value.code == TOO_LONG


@FAST
@given(st.binary(max_size=64))
def test_parse_request_only_raises_wire_error(line: bytes) -> None:
    """Arbitrary bytes either parse or raise WireError with a known code; nothing else escapes."""
    try:
        parse_request(line)
    except WireError as e:
        assert e.code in (wire.NOT_FOUND, wire.BAD_REQUEST, wire.TOO_LONG, wire.BUSY, wire.UNAVAILABLE)
        assert e.code == BAD_REQUEST


@FAST
@given(
    st.one_of(
        st.builds(GetRequest, utf8_text.filter(bool).map(lambda s: s[:200]), st.integers(0, 2**64)),
        st.builds(ListRequest, st.booleans()),
        st.just(StatsRequest()),
        st.just(QuitRequest()),
    )
)
def test_format_request_round_trips(request: wire.Request) -> None:
    """What format_request writes, parse_request reads back as the same request."""
    line = format_request(request)
    assert line.endswith(b"\r\n")
    assert b"\n" not in line[:-1]
    assert parse_request(line[:-1]) == request


def test_format_request_exact_bytes() -> None:
    """format_request writes the documented request lines, paths percent-encoded."""
    assert format_request(ListRequest()) == b"LIST\r\n"
    assert format_request(ListRequest(cached=True)) == b"LIST CACHED\r\n"
    assert format_request(StatsRequest()) == b"STATS\r\n"
    assert format_request(QuitRequest()) == b"QUIT\r\n"
    assert format_request(GetRequest("my notes.txt")) == b"GET my%20notes.txt\r\n"
    assert format_request(GetRequest("a", 10)) == b"GET a 10\r\n"


# quote_path / unquote_path


@pytest.mark.parametrize(
    "path, quoted",
    [
        ("hello.txt", b"hello.txt"),
        ("docs/readme.txt", b"docs/readme.txt"),
        ("A-Z_a~z.0/9", b"A-Z_a~z.0/9"),
        ("my notes.txt", b"my%20notes.txt"),
        ("\u00e9", b"%C3%A9"),
        ("a\nb", b"a%0Ab"),
        ("100%", b"100%25"),
        ("a+b&c=d?e#f", b"a%2Bb%26c%3Dd%3Fe%23f"),
        ("\\", b"%5C"),
        ("\x00", b"%00"),
        ("\U0001f600", b"%F0%9F%98%80"),
        ("", b""),
    ],
)
def test_quote_path_examples(path: str, quoted: bytes) -> None:
    """quote_path escapes every UTF-8 byte outside the safe set as upper-case %XX and nothing else."""
    assert quote_path(path) == quoted
    assert unquote_path(quoted) == path


@FAST
@given(utf8_text)
def test_quote_unquote_round_trip(path: str) -> None:
    """unquote_path(quote_path(p)) == p for any text that UTF-8 can encode."""
    assert unquote_path(quote_path(path)) == path


@FAST
@given(utf8_text)
def test_quote_path_output_alphabet(path: str) -> None:
    """quote_path writes only bytes from A-Za-z0-9-._~/% and every % starts an upper-case %XX."""
    quoted = quote_path(path)
    assert set(quoted) <= SAFE_BYTES
    assert re.fullmatch(rb"(?:[A-Za-z0-9\-._~/]|%[0-9A-F]{2})*", quoted)
    # Its length is one byte per safe byte and three per escaped byte.
    raw = path.encode("utf-8")
    escaped = sum(1 for b in raw if b not in SAFE_BYTES or b == ord("%"))
    assert len(quoted) == len(raw) + 2 * escaped


@FAST
@given(utf8_text)
def test_unquote_accepts_lower_case_hex(path: str) -> None:
    """unquote_path accepts lower-case %xx escapes as well as upper-case ones."""
    lowered = re.sub(rb"%[0-9A-F]{2}", lambda m: m.group(0).lower(), quote_path(path))
    assert unquote_path(lowered) == path


def test_unquote_lower_case_examples() -> None:
    """%c3%a9 and %C3%a9 both decode to e-acute; %2f decodes to a slash."""
    assert unquote_path(b"caf%c3%a9") == "caf\u00e9"
    assert unquote_path(b"caf%C3%a9") == "caf\u00e9"
    assert unquote_path(b"a%2fb") == "a/b"
    assert unquote_path(b"%2e%2e") == ".."


@pytest.mark.parametrize(
    "quoted",
    [
        b"%",
        b"a%",
        b"a%4",
        b"%4",
        b"%zz",
        b"%g0",
        b"%0g",
        b"%%41",
        b"% 4",
        b"%+1",
        b"%-1",
        b"abc%4",
        b"%C3%A",
    ],
)
def test_unquote_malformed_escape(quoted: bytes) -> None:
    """A truncated or non-hex percent escape is bad-request."""
    with pytest.raises(WireError) as info:
        unquote_path(quoted)
    assert info.value.code == BAD_REQUEST


@pytest.mark.parametrize(
    "quoted",
    [
        b"%FF",
        b"%ff",
        b"%C3",  # truncated two-byte sequence
        b"%C3%28",
        b"%C0%AF",  # overlong "/"
        b"%ED%A0%80",  # an encoded surrogate
        b"%F4%90%80%80",  # beyond U+10FFFF
        b"a%80b",
        b"\xff",  # raw, not escaped
        b"a\xc3",
    ],
)
def test_unquote_invalid_utf8(quoted: bytes) -> None:
    """A path whose decoded bytes are not valid UTF-8 is bad-request."""
    with pytest.raises(WireError) as info:
        unquote_path(quoted)
    assert info.value.code == BAD_REQUEST


@FAST
@given(st.binary(max_size=64))
def test_unquote_only_raises_wire_error(quoted: bytes) -> None:
    """On arbitrary bytes unquote_path returns text or raises bad-request, nothing else."""
    try:
        result = unquote_path(quoted)
    except WireError as e:
        assert e.code == BAD_REQUEST
    else:
        assert isinstance(result, str)


# split_path


@pytest.mark.parametrize(
    "path, parts",
    [
        ("a", ("a",)),
        ("a/b/c", ("a", "b", "c")),
        ("a.b", ("a.b",)),
        ("a..b/c.", ("a..b", "c.")),
        ("my notes.txt", ("my notes.txt",)),
        ("\u00e9t\u00e9/\u00fc", ("\u00e9t\u00e9", "\u00fc")),
        ("~x/-y/_z", ("~x", "-y", "_z")),
    ],
)
def test_split_path_accepts(path: str, parts: tuple[str, ...]) -> None:
    """A relative path of plain, non-dot components is split on slashes."""
    assert split_path(path) == parts


@pytest.mark.parametrize(
    "path",
    [
        "",
        "/",
        "/abs",
        "/etc/passwd",
        "a//b",
        "a/",
        "/a/",
        ".",
        "..",
        "./a",
        "a/.",
        "a/./b",
        "a/../b",
        "../a",
        "a/..",
        ".git/config",
        ".hidden",
        "a/.hidden",
        "a/.d/b",
        "a\\b",
        "\\",
        "..\\a",
        "a\x00b",
        "\x00",
        "a/b\x00",
    ],
)
def test_split_path_refuses(path: str) -> None:
    """Empty, absolute, empty-component, dot-component, backslash and NUL paths raise PathError."""
    with pytest.raises(PathError):
        split_path(path)


def test_path_error_is_value_error() -> None:
    """PathError is a ValueError, so callers may catch either."""
    assert issubclass(PathError, ValueError)


# Replies: format_*


def test_format_error() -> None:
    """format_error writes ERR <code> <text> CRLF."""
    assert format_error("not-found", "no such file") == b"ERR not-found no such file\r\n"


def test_format_error_replaces_non_printable() -> None:
    """format_error replaces non-ASCII and control characters in the text with '?'."""
    assert format_error("bad-request", "caf\u00e9\r\nx\ty\x7f") == b"ERR bad-request caf???x?y?\r\n"


@FAST
@given(utf8_text)
def test_format_error_text_is_printable_ascii(message: str) -> None:
    """Whatever the message, the text of an ERR line is printable ASCII and the line has one CRLF."""
    line = format_error("unavailable", message)
    assert line.startswith(b"ERR unavailable ")
    assert line.endswith(b"\r\n")
    text = line[len(b"ERR unavailable ") : -2]
    assert all(0x20 <= b < 0x7F for b in text)
    status = parse_status(line[:-2])
    assert status == Status(ok=False, code="unavailable", message=text.decode("ascii"))


def test_format_get_status_and_end() -> None:
    """format_get_status and format_end write the GET status and trailer lines."""
    assert (
        format_get_status(22, "7c8ce-16-18ea3fdc92c71808") == b"OK 22 7c8ce-16-18ea3fdc92c71808\r\n"
    )
    assert format_get_status(0, "0") == b"OK 0 0\r\n"
    assert format_end(DIGEST) == b"END " + DIGEST.encode() + b"\r\n"


def test_format_list_exact_bytes() -> None:
    """
    format_list writes OK, then <size> <mtime> <C|-> <quoted path> rows, then
    END <n>, all CRLF-ended.
    """
    rows = [
        ListRow(22, 1795317618, False, "hello.txt"),
        ListRow(23, 1795317618, True, "my notes.txt"),
    ]
    assert format_list(rows) == (
        b"OK\r\n22 1795317618 - hello.txt\r\n23 1795317618 C my%20notes.txt\r\nEND 2\r\n"
    )
    assert format_list([]) == b"OK\r\nEND 0\r\n"


def test_format_stats_exact_bytes() -> None:
    """format_stats writes OK <n> then <key> <value> rows, all CRLF-ended."""
    assert format_stats([("hits", 3), ("misses", 0)]) == b"OK 2\r\nhits 3\r\nmisses 0\r\n"
    assert format_stats([]) == b"OK 0\r\n"


def test_printable_escapes_what_could_move_a_cursor() -> None:
    """printable() turns control characters, DEL and stray bytes into visible escapes."""
    assert printable("plain é ✓") == "plain é ✓"
    assert printable("a\x1b[1A\x1b[2K\rb\n\x7f") == "a\\x1b[1A\\x1b[2K\\x0db\\x0a\\x7f"
    assert printable("back\\slash") == "back\\\\slash"
    assert printable_bytes(b"ok \xff\x9b1A") == "ok \\xff\\x9b1A"
    for text in ("\x1b]0;title\x07", "\u2028", "\u202e"):
        assert printable(text).isprintable()
