"""
Tests for L{filecache.daemon.httphead}: the HTTP/1.1 grammar of the daemon
(request heads, targets, ranges, conditions, dates and response heads), as
docs/http.md and RFC 9110/9112 state it.  In memory only.
"""

from __future__ import annotations

import base64
import hashlib
import pathlib
import string
import time
import types
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from filecache.daemon import httphead, httpreply
from filecache.daemon.httphead import (
    MAX_FIELDS,
    MAX_HEAD,
    MAX_HEADER_LINE,
    MAX_REQUEST_LINE,
    HeadReader,
    HttpError,
    RequestHead,
    Target,
    is_request_line,
    parse_target,
    starts_like_http,
    wants_json,
)
from filecache.daemon.httpreply import (
    REASONS,
    UNSATISFIABLE,
    DateCache,
    check_conditions,
    content_type,
    error_response,
    etag_for,
    format_head,
    http_date,
    if_range_allows,
    parse_http_date,
    parse_range,
    repr_digest,
)
from filecache.wire import GetRequest, HashRequest, format_request, quote_path

FAST = settings(max_examples=100, deadline=None)
RFC_EXAMPLE = 784111777  # Sun, 06 Nov 1994 08:49:37 GMT (RFC 9110 5.6.7)


def feed_all(reader: HeadReader, data: bytes) -> list[RequestHead]:
    """
    Feed C{data} to C{reader} the way C{LineReceiver(delimiter=b"\\n")} would:
    every complete line, without its C{\\n}; the heads it returned.
    """
    heads = []
    for line in data.split(b"\n")[:-1]:
        head = reader.feed(line)
        if head is not None:
            heads.append(head)
    return heads


def read(data: bytes) -> RequestHead:
    """The one head in C{data}."""
    [head] = feed_all(HeadReader(), data)
    return head


def refusal(data: bytes) -> HttpError:
    """The error C{data} raises."""
    with pytest.raises(HttpError) as caught:
        feed_all(HeadReader(), data)
    return caught.value


def head_with(*fields: tuple[bytes, bytes], version: tuple[int, int] = (1, 1)) -> RequestHead:
    """A GET head with C{fields} (and a Host), made directly."""
    return RequestHead(b"GET", b"/", version, ((b"host", b"h"), *fields))


# is_request_line and starts_like_http


@pytest.mark.parametrize(
    "line",
    [
        b"GET / HTTP/1.1",
        b"GET / HTTP/1.1\r",
        b"HEAD /a/b.txt?x=1 HTTP/1.0",
        b"get /a HTTP/1.1",
        b"M-SEARCH * HTTP/1.1",
        b"GET http://h/a HTTP/1.1",
        b"GET /a HTTP/2.0",
        b"GET /a HTTP/0.9",
        b"FOO! /\x00 HTTP/1.1",
    ],
)
def test_request_lines(line: bytes) -> None:
    """Lines of the form C{TOKEN SP target SP HTTP/d.d} are HTTP, whatever the method."""
    assert is_request_line(line)


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"GET a",
        b"GET a 0",
        b"GET docs/readme.txt 17",
        b"LIST",
        b"LIST CACHED",
        b"STATS",
        b"GET /",
        b"GET  / HTTP/1.1",
        b"GET /  HTTP/1.1",
        b" GET / HTTP/1.1",
        b"GET / HTTP/1.1 ",
        b"GET\t/ HTTP/1.1",
        b"GET / a HTTP/1.1",
        b"GET / http/1.1",
        b"GET / HTTP/1.10",
        b"GET / HTTP/11",
        b"GET / HTTP/1.1\r\r",
        b"G(T / HTTP/1.1",
        b" / HTTP/1.1",
        b"GET  HTTP/1.1",
    ],
)
def test_not_request_lines(line: bytes) -> None:
    """Anything else, every native request among them, is not HTTP."""
    assert not is_request_line(line)


@FAST
@given(st.text(st.characters(codec="utf-8"), min_size=1), st.integers(min_value=0))
def test_native_requests_are_never_http(path: str, offset: int) -> None:
    """A native C{GET} or C{HASH} line, whatever its path and offset, is never taken for HTTP."""
    for request in (GetRequest(path, offset), HashRequest(path)):
        assert not is_request_line(format_request(request).rstrip(b"\n"))


@pytest.mark.parametrize(
    "buffer, expected",
    [
        (b"GET /" + b"a" * 10000, True),
        (b"GET http://" + b"a" * 10000, True),
        (b"POST HTTPS://h/", True),
        (b"GET ", False),
        (b"GET a" + b"/" * 10000, False),
        (b" GET /", False),
        (b"GET  /", False),
        (b"GET ftp://h/", False),
        (b"G@T /", False),
        (b"", False),
    ],
)
def test_starts_like_http(buffer: bytes, expected: bool) -> None:
    """A line too long to read is HTTP iff it starts with C{TOKEN SP /} or an http(s) URL."""
    assert starts_like_http(buffer) is expected


# HeadReader: heads that are read


def test_typical_head() -> None:
    """A head gives its method, target, version and fields: names lower-cased, values stripped."""
    head = read(
        b"GET /hello.txt?x=1 HTTP/1.1\r\nHost: localhost:5000\r\nUser-Agent:curl/8.5.0\r\n"
        b"Accept: \t*/* \t\r\n\r\n"
    )
    assert (head.method, head.target, head.version) == (b"GET", b"/hello.txt?x=1", (1, 1))
    assert head.fields == (
        (b"host", b"localhost:5000"), (b"user-agent", b"curl/8.5.0"), (b"accept", b"*/*")
    )
    assert head.get(b"accept") == b"*/*"
    assert head.get(b"missing") is None


def test_repeated_fields_are_joined_in_order() -> None:
    """C{get} joins a repeated field's values with C{, }; C{fields} keeps each line."""
    head = read(b"GET / HTTP/1.1\r\nHost: h\r\nAccept: a\r\nX: 1\r\nACCEPT: b\r\naccept:\r\n\r\n")
    assert head.get(b"accept") == b"a, b, "
    assert [name for name, _ in head.fields] == [b"host", b"accept", b"x", b"accept", b"accept"]


def test_values_keep_inner_whitespace_tabs_and_obs_text() -> None:
    """Tabs and obs-text (0x80-0xFF) are allowed in values; inner whitespace is kept."""
    head = read(b"GET / HTTP/1.1\r\nHost: h\r\nX-Name: caf\xc3\xa9 \t and\ttab \r\nEmpty:\r\n\r\n")
    assert head.get(b"x-name") == b"caf\xc3\xa9 \t and\ttab"
    assert head.get(b"empty") == b""


def test_method_is_as_sent_and_not_checked() -> None:
    """The method is kept as sent (case-sensitive); any token is read (the adapter answers 405)."""
    assert read(b"get / HTTP/1.1\r\nHost: h\r\n\r\n").method == b"get"
    assert read(b"BREW /pot HTTP/1.1\r\nHost: h\r\n\r\n").method == b"BREW"


@pytest.mark.parametrize(
    "version, expected", [(b"1.0", (1, 0)), (b"1.1", (1, 1)), (b"1.2", (1, 1)), (b"1.9", (1, 1))]
)
def test_versions(version: bytes, expected: tuple[int, int]) -> None:
    """HTTP/1.0 is 1.0; 1.1 and every later 1.x are 1.1."""
    assert read(b"GET / HTTP/" + version + b"\r\nHost: h\r\n\r\n").version == expected


def test_bare_lf_lines_are_read() -> None:
    """Lines that end with a bare LF are read as well (RFC 9112 2.2)."""
    head = read(b"GET / HTTP/1.1\nHost: h\r\nX: y\n\n")
    assert head.fields == ((b"host", b"h"), (b"x", b"y"))


def test_empty_lines_before_the_request_line_are_ignored() -> None:
    """Empty lines before a request line are skipped and do not start a head."""
    reader = HeadReader()
    assert reader.feed(b"") is None
    assert reader.feed(b"\r") is None
    assert not reader.started
    assert feed_all(reader, b"GET / HTTP/1.0\r\n\r\n")[0].target == b"/"


def test_http10_needs_no_host() -> None:
    """An HTTP/1.0 head without Host is read."""
    assert read(b"GET / HTTP/1.0\r\n\r\n").fields == ()


def test_reader_is_reusable_and_started() -> None:
    """Pipelined heads come out one at a time; C{started} is true between request line and end."""
    reader = HeadReader()
    assert not reader.started
    assert reader.feed(b"GET /a HTTP/1.1\r") is None
    assert reader.started
    assert reader.feed(b"Host: h\r") is None
    first = reader.feed(b"\r")
    assert first is not None and first.target == b"/a"
    assert not reader.started
    second, third = feed_all(reader, b"\r\nHEAD /b HTTP/1.1\r\nHost: i\r\n\r\nGET /c HTTP/1.0\r\n\r\n")
    assert (second.method, second.target, second.get(b"host")) == (b"HEAD", b"/b", b"i")
    assert (third.target, third.fields, third.version) == (b"/c", (), (1, 0))


def test_content_length_zero_is_allowed() -> None:
    """C{Content-Length: 0} announces no body, so it is accepted."""
    assert read(b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n").get(b"content-length") == b"0"


@pytest.mark.parametrize(
    "host", [b"", b"example.com", b"example.com:8080", b"127.0.0.1:5000", b"[::1]", b"[::1]:80", b"h:"]
)
def test_valid_hosts(host: bytes) -> None:
    """Host values of RFC 9110's grammar (uri-host and an optional port) are read."""
    assert read(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n").get(b"host") == host


# HeadReader: heads that are refused


@pytest.mark.parametrize(
    "data, status",
    [
        (b"GET /\r\n", 400),
        (b"GET  / HTTP/1.1\r\n", 400),
        (b"GET / HTTP/1.1 \r\n", 400),
        (b"GET / http/1.1\r\n", 400),
        (b"G(T / HTTP/1.1\r\n", 400),
        (b"GET /a\x00b HTTP/1.1\r\n", 400),
        (b"GET /a\x7f HTTP/1.1\r\n", 400),
        (b"GET /a\tb HTTP/1.1\r\n", 400),
        (b"GET /\r HTTP/1.1\r\n", 400),
        (b"GET / HTTP/1.1\r\r\n", 400),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n", 400),
        (b"GET / HTTP/2.0\r\n", 505),
        (b"GET / HTTP/0.9\r\n", 505),
        (b"GET / HTTP/3.1\r\n", 505),
        (b"GET / HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: h\r\nHost: h\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n", 400),
        (b"GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a b\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a/b\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: u@h\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: h:x\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: identity\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: h\r\ntransfer-encoding:\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 00\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 0, 0\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: -0\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length:\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\nContent-Length: 0\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: h\r\nX: a\r\n folded\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: h\r\nX: a\r\n\tfolded\r\n", 400),
        (b"GET / HTTP/1.1\r\n Host: h\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost : h\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost\t: h\r\n", 400),
        (b"GET / HTTP/1.1\r\nHo st: h\r\n", 400),
        (b"GET / HTTP/1.1\r\n: h\r\n", 400),
        (b"GET / HTTP/1.1\r\nX(y): h\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost h\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: h\rX: y\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: h\r\r\n", 400),
        (b"GET / HTTP/1.1\r\nX\r: h\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: h\r\nX: a\x00b\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: h\r\nX: a\x7fb\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: h\r\nX: a\x1bb\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: h\r\nX: \x0c\r\n", 400),
    ],
)
def test_refused_heads(data: bytes, status: int) -> None:
    """Each head that breaks a rule of docs/http.md is refused with its status."""
    assert refusal(data).status == status


def test_bare_cr_has_its_own_message() -> None:
    """A bare CR is named as such, in the request line and in a field."""
    assert "bare CR" in refusal(b"GET /\r HTTP/1.1\n").message
    assert "bare CR" in refusal(b"GET / HTTP/1.1\r\nHost: h\rX: y\r\n").message
    assert "bare CR" in refusal(b"GET / HTTP/1.1\r\nX\r: y\r\n").message
    assert "folding" in refusal(b"GET / HTTP/1.1\r\n\tX: y\r\n").message


def test_request_line_limit() -> None:
    """A request line of MAX_REQUEST_LINE bytes (CR not counted) is read; one more is a 414."""
    start = b"GET /"
    end = b" HTTP/1.1"
    longest = start + b"a" * (MAX_REQUEST_LINE - len(start) - len(end)) + end
    assert len(read(longest + b"\r\nHost: h\r\n\r\n").target) == MAX_REQUEST_LINE - len(start + end) + 1
    assert refusal(longest[:5] + b"a" + longest[5:] + b"\r\n").status == 414
    assert refusal(b"x" * (MAX_REQUEST_LINE + 1) + b"\n").status == 414


def test_header_line_limit() -> None:
    """A header line of MAX_HEADER_LINE bytes (CR not counted) is read; one more is a 431."""
    line = b"X: " + b"v" * (MAX_HEADER_LINE - 3)
    assert read(b"GET / HTTP/1.1\r\nHost: h\r\n" + line + b"\r\n\r\n").get(b"x") == line[3:]
    assert refusal(b"GET / HTTP/1.1\r\nHost: h\r\n" + line + b"v\r\n").status == 431


def head_of(size: int) -> bytes:
    """A valid head of C{size} bytes: a request line, a Host and five long fields."""
    request = b"GET / HTTP/1.1\r\nHost: h\r\n"
    room = size - len(request) - 2
    sizes = [8000] * 4 + [room - 32000]
    # Each field line is "Xn: " and its value and CRLF: 6 bytes and the value.
    fields = [b"X%d: " % n + b"v" * (length - 6) + b"\r\n" for n, length in enumerate(sizes)]
    return request + b"".join(fields) + b"\r\n"


def test_head_limit() -> None:
    """A head of MAX_HEAD bytes, every terminator counted, is read; one byte more is a 431."""
    assert len(head_of(MAX_HEAD)) == MAX_HEAD
    assert len(read(head_of(MAX_HEAD)).fields) == 6
    assert refusal(head_of(MAX_HEAD + 1)).status == 431


def test_empty_lines_before_a_request_count_in_the_head() -> None:
    """Endless empty lines cannot hold a reader: they count in the head's size."""
    reader = HeadReader()
    with pytest.raises(HttpError) as caught:
        for _ in range(MAX_HEAD):
            reader.feed(b"\r")
    assert caught.value.status == 431


def test_field_limit() -> None:
    """MAX_FIELDS fields are read; one more is a 431."""
    fields = b"".join(b"X%d: y\r\n" % n for n in range(MAX_FIELDS - 1))
    assert len(read(b"GET / HTTP/1.1\r\nHost: h\r\n" + fields + b"\r\n").fields) == MAX_FIELDS
    assert refusal(b"GET / HTTP/1.1\r\nHost: h\r\n" + fields + b"Y: z\r\n").status == 431


def test_error_messages_are_safe() -> None:
    """An HttpError carries its status and a short printable line, also as its args."""
    error = refusal(b"GET / HTTP/1.1\r\nHost: h\r\nHost: h\r\n")
    assert (error.status, error.message) == (400, "repeated host")
    assert error.args == (400, "repeated host")


# RequestHead


def test_request_head_is_immutable() -> None:
    """A head's attributes cannot be set."""
    head = head_with()
    with pytest.raises(AttributeError):
        head.method = b"POST"
    with pytest.raises(AttributeError):
        head.extra = 1
    assert repr(head) == "RequestHead(b'GET', b'/', (1, 1), ((b'host', b'h'),))"


def test_request_head_made_directly_has_get() -> None:
    """A head made by its constructor joins repeated fields in C{get} as a read one does."""
    head = head_with((b"a", b"1"), (b"a", b"2"))
    assert head.get(b"a") == b"1, 2"
    assert head.get(b"host") == b"h"


@pytest.mark.parametrize(
    "version, connection, expected",
    [
        ((1, 1), None, True),
        ((1, 1), b"close", False),
        ((1, 1), b"Close", False),
        ((1, 1), b"keep-alive, close", False),
        ((1, 1), b"Upgrade,  CLOSE ", False),
        ((1, 1), b"keep-alive", True),
        ((1, 1), b"closed", True),
        ((1, 0), None, False),
        ((1, 0), b"keep-alive", True),
        ((1, 0), b"Keep-Alive", True),
        ((1, 0), b"foo, keep-alive", True),
        ((1, 0), b"keep-alive, close", False),
        ((1, 0), b"close", False),
        ((1, 0), b"keep-alives", False),
    ],
)
def test_keep_alive(version: tuple[int, int], connection: bytes | None, expected: bool) -> None:
    """HTTP/1.1 keeps the connection unless C{close}; HTTP/1.0 only with C{keep-alive}."""
    fields = () if connection is None else ((b"connection", connection),)
    assert RequestHead(b"GET", b"/", version, fields).keep_alive is expected


def test_keep_alive_from_repeated_connection_fields() -> None:
    """Tokens of repeated C{Connection} fields all count."""
    head = read(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: te\r\nConnection: close\r\n\r\n")
    assert not head.keep_alive


# The property: HeadReader against an independent reading of docs/http.md

TCHAR = (string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~").encode()
VISIBLE = bytes(range(33, 127)) + bytes(range(128, 256))
FIELD_CHARS = b"\t" + bytes(range(32, 127)) + bytes(range(128, 256))
REG_NAME = frozenset((string.ascii_letters + string.digits + "-._~%!$&'()*+,;=").encode())
IP_LITERAL = frozenset((string.ascii_letters + string.digits + ":.").encode())
Outcome = tuple[bytes, bytes, tuple[int, int], tuple[tuple[bytes, bytes], ...]] | int | None


def valid_host(value: bytes) -> bool:
    """RFC 9110's C{Host}: uri-host (reg-name or IP literal), then C{:} and digits."""
    if value[:1] == b"[":
        end = value.find(b"]")
        host, rest = value[1:end], value[end + 1 :]
        if end < 0 or not host or not set(host) <= IP_LITERAL:
            return False
    else:
        host, colon, port = value.partition(b":")
        rest = colon + port
        if not set(host) <= REG_NAME:
            return False
    return not rest or (rest[:1] == b":" and all(48 <= c <= 57 for c in rest[1:]))


def expected_outcomes(lines: Sequence[bytes]) -> list[Outcome]:
    """
    What docs/http.md says of each line of C{lines}, written without regular
    expressions: L{None}, a finished head as a tuple, or an error status
    (the last outcome then).
    """
    limits = httphead.MAX_REQUEST_LINE, httphead.MAX_HEADER_LINE, httphead.MAX_HEAD, httphead.MAX_FIELDS
    max_request_line, max_header_line, max_head, max_fields = limits
    outcomes: list[Outcome] = []
    size = 0
    request: tuple[bytes, bytes, tuple[int, int]] | None = None
    fields: list[tuple[bytes, bytes]] = []

    def fail(status: int) -> list[Outcome]:
        """The outcomes so far, and then C{status}."""
        return [*outcomes, status]

    for raw in lines:
        size += len(raw) + 1
        line = raw[:-1] if raw.endswith(b"\r") else raw
        if request is None:
            if not line:
                if size > max_head:
                    return fail(431)
                outcomes.append(None)
                continue
            if len(line) > max_request_line:
                return fail(414)
            if size > max_head:
                return fail(431)
            words = line.split(b" ")
            if len(words) != 3:
                return fail(400)
            method, target, version = words
            if not method or method.translate(None, TCHAR):
                return fail(400)
            if not target or target.translate(None, VISIBLE):
                return fail(400)
            if (len(version) != 8 or not version.startswith(b"HTTP/") or version[6:7] != b"."
                    or not version[5:6].isdigit() or not version[7:].isdigit()):
                return fail(400)
            if version[5:6] != b"1":
                return fail(505)
            request = (method, target, (1, 0) if version[7:] == b"0" else (1, 1))
            outcomes.append(None)
            continue
        if len(line) > max_header_line or size > max_head:
            return fail(431)
        if not line:
            names = [name for name, _ in fields]
            if request[2] == (1, 1) and b"host" not in names:
                return fail(400)
            outcomes.append((*request, tuple(fields)))
            request, fields, size = None, [], 0
            continue
        if len(fields) == max_fields:
            return fail(431)
        name, colon, value = line.partition(b":")
        if not colon or not name or name.translate(None, TCHAR):
            return fail(400)
        if value.translate(None, FIELD_CHARS):
            return fail(400)
        name = name.lower()
        value = value.strip(b" \t")
        seen = [n for n, _ in fields]
        if name == b"transfer-encoding":
            return fail(400)
        if name in (b"host", b"content-length") and name in seen:
            return fail(400)
        if name == b"content-length" and value != b"0":
            return fail(400)
        if name == b"host" and not valid_host(value):
            return fail(400)
        fields.append((name, value))
        outcomes.append(None)
    return outcomes


def actual_outcomes(lines: Sequence[bytes]) -> list[Outcome]:
    """What L{HeadReader} does with each line of C{lines}; only L{HttpError} is caught."""
    reader = HeadReader()
    outcomes: list[Outcome] = []
    for line in lines:
        try:
            head = reader.feed(line)
        except HttpError as error:
            assert error.status in (400, 414, 431, 505)
            assert error.message.isascii() and error.message.isprintable()
            assert 0 < len(error.message) < 80
            return [*outcomes, error.status]
        if head is None:
            outcomes.append(None)
            continue
        for name, _ in head.fields:
            assert head.get(name) == b", ".join(v for n, v in head.fields if n == name)
        assert head.keep_alive in (True, False)
        outcomes.append((head.method, head.target, head.version, head.fields))
    return outcomes


INTERESTING = [b"\r", b"\n", b"\x00", b" ", b"\t", b":", b"\x7f", b"\x80", b"\xff", b"a", b"\x0b",
               b"/", b"[", b"]", b"@", b",", b"0", b"1", b"2", b"H", b"T", b"P", b"."]


def mostly(valid: list[bytes], invalid: list[bytes], odds: int = 7) -> st.SearchStrategy[bytes]:
    """One of C{valid}, C{odds} times as often as one of C{invalid}."""
    # Not one_of(valid, valid, ..., invalid): hypothesis does not weight repeated branches.
    return st.sampled_from(valid * (odds * len(invalid)) + invalid * len(valid))


methods = mostly([b"GET", b"HEAD", b"POST", b"get", b"M-SEARCH"], [b"", b"G(T", b"GET "], odds=20)
targets = mostly([b"/", b"/a/b.txt?x=1", b"*", b"http://h/a", b"/caf\xc3\xa9", b"/%zz"],
                 [b"", b"/a b", b"/a\x00"], odds=20)
versions = mostly([b"HTTP/1.1"] * 4 + [b"HTTP/1.0"] * 3 + [b"HTTP/1.7", b"HTTP/2.0", b"HTTP/0.9"],
                  [b"HTTP/1.10", b"http/1.1", b"HTTP/1", b"HTTP/1.1 "], odds=20)
names = mostly([b"Accept", b"Connection", b"X-A", b"Range", b"User-Agent", b"If-None-Match"],
               [b"Ho st", b"Host ", b"", b"X(", b" X", b"\tX", b"X\x00"], odds=15)
values = st.one_of(
    mostly([b"h", b"example.com:80", b"[::1]:5000", b"0", b"close", b"keep-alive", b"",
            b" \t", b"a\tb", b"caf\xc3\xa9", b"a b", b"bytes=0-1"], [b"a\x00b", b"\x7f"], odds=15),
    st.text(string.printable.strip(), max_size=12).map(str.encode),
)
separators = mostly([b": ", b":", b":\t", b": \t "], [b" : ", b"", b" "], odds=15)
special_fields = st.tuples(
    st.sampled_from([b"Content-Length", b"content-length", b"Transfer-Encoding", b"Host", b"HOST"]),
    separators,
    st.sampled_from([b"0", b"0 ", b"5", b"00", b"0, 0", b"chunked", b"h", b"[::1]", b"a b", b"h:x"]),
).map(b"".join)
plain_fields = st.tuples(names, separators, values).map(b"".join)
fields = st.sampled_from([True, False, False]).flatmap(
    lambda special: special_fields if special else plain_fields
)
hosts = mostly([b"Host: h\r\n", b"host:[::1]:80\r\n"], [b""])
terminators = mostly([b"\r\n", b"\n"], [b"\r\r\n", b"\r"], odds=20)


def filler(room: int, end: bytes) -> list[bytes]:
    """Field lines, none over the limit, of C{room} bytes in all with their terminators."""
    lines = []
    while room >= 2 + len(end):
        size = min(room, httphead.MAX_HEADER_LINE + len(end))
        if 0 < room - size < 2 + len(end):
            size = room - 2 - len(end)  # and a last line of "X:" alone
        lines.append(b"X:" + b"v" * (size - 2 - len(end)))
        room -= size
    return lines


@st.composite
def heads(draw: st.DrawFn) -> bytes:
    """
    Heads close to valid ones: a request line, a Host and fields from parts
    that mostly fit; some made a few bytes shorter or longer than a limit.
    """
    end = draw(terminators)
    line = draw(methods) + b" " + draw(targets) + b" " + draw(versions)
    near = draw(st.sampled_from([None, None, None, "request line", "head", "fields", "blanks"]))
    delta = draw(st.integers(0, 1))  # at the limit, or one past it
    if near == "request line":
        stretch = httphead.MAX_REQUEST_LINE + delta - len(line)
        line = line.replace(b" ", b" /" + b"v" * max(0, stretch - 1), 1)
    lines = [line, *draw(st.lists(fields, max_size=5))]
    if near == "fields":
        lines += [b"X:"] * (httphead.MAX_FIELDS + delta - len(lines))
    head = (end.join(lines) + end).replace(end, end + draw(hosts), 1) + end
    if near == "head":
        room = httphead.MAX_HEAD + delta - len(head)
        head = head[: -len(end)] + b"".join(field + end for field in filler(room, end)) + end
    if near == "blanks":
        head = b"\r\n" * (httphead.MAX_HEAD // 2 + delta) + head
    return head


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """
    A few heads, then bytes inserted, replaced or deleted, empty lines
    inserted, a line repeated, or a line padded to about a limit.
    """
    data = bytearray(b"".join(draw(st.lists(heads(), min_size=1, max_size=3))))
    for _ in range(draw(st.integers(-2, 3))):
        at = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["insert", "replace", "delete", "blank", "repeat", "pad"]))
        start = data.rfind(b"\n", 0, at) + 1
        stop = data.find(b"\n", at) + 1 or len(data)
        if kind == "insert":
            data[at:at] = draw(st.sampled_from(INTERESTING))
        elif kind == "replace":
            data[at : at + 1] = draw(st.sampled_from(INTERESTING))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 4))]
        elif kind == "blank":
            data[start:start] = b"\r\n" * draw(st.sampled_from([1, 2, httphead.MAX_HEAD // 2 + 1]))
        elif kind == "repeat":
            data[start:start] = data[start:stop] * (httphead.MAX_FIELDS + draw(st.integers(-2, 1)))
        else:
            limit = draw(st.sampled_from([httphead.MAX_REQUEST_LINE, httphead.MAX_HEADER_LINE,
                                          httphead.MAX_HEAD // 4]))
            data[at:at] = b"v" * max(0, limit - (stop - start) + draw(st.integers(-2, 2)))
    return bytes(data)


def check_reader(data: bytes) -> None:
    """L{HeadReader} answers the lines of C{data} as L{expected_outcomes} says."""
    lines = data.split(b"\n")[:-1]
    assert actual_outcomes(lines) == expected_outcomes(lines)


@settings(max_examples=150, deadline=None)
@given(mutated())
@example(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
@example(b"GET / HTTP/1.1\r\nHost: h\r\nX: " + b"v" * 8190 + b"\r\n\r\n")
@example(b"\r\n" * 20000)
@example(b"GET / HTTP/1.1\r\nHost: h\r\n" + b"X: y\r\n" * 100 + b"\r\n")
def test_reader_agrees_with_the_rules(data: bytes) -> None:
    """
    Whatever the bytes of heads close to valid ones, L{HeadReader} raises
    nothing but L{HttpError}, and answers each line as an independent reading
    of the rules does: the same heads at the same lines, and an error with the
    same status at the first line that breaks a rule, so no malformed head is
    ever read.
    """
    check_reader(data)


@pytest.fixture
def small_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    Limits small enough for random heads to meet them often.  Both the reader
    and L{expected_outcomes} read them from the module at each call.
    """
    monkeypatch.setattr(httphead, "MAX_REQUEST_LINE", 40)
    monkeypatch.setattr(httphead, "MAX_HEADER_LINE", 30)
    monkeypatch.setattr(httphead, "MAX_HEAD", 120)
    monkeypatch.setattr(httphead, "MAX_FIELDS", 6)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=mutated())
def test_reader_agrees_at_small_limits(small_limits: None, data: bytes) -> None:
    """The same holds at every limit: lines and heads of about the limits' sizes, fields past the limit."""
    check_reader(data)


@FAST
@given(st.one_of(st.binary(max_size=80), st.lists(st.binary(max_size=20)).map(b"\n".join)))
def test_reader_agrees_on_random_bytes(data: bytes) -> None:
    """The same holds for random bytes and random lines."""
    check_reader(data)


# parse_target


@pytest.mark.parametrize(
    "target, path, query, folder",
    [
        (b"/", "", "", True),
        (b"/?format=json", "", "format=json", True),
        (b"/hello.txt", "hello.txt", "", False),
        (b"/a/b.txt?x=1&y", "a/b.txt", "x=1&y", False),
        (b"/docs/", "docs/", "", True),
        (b"/docs", "docs", "", False),
        (b"/my%20notes.txt", "my notes.txt", "", False),
        (b"/caf%C3%A9", "caf\u00e9", "", False),
        (b"/caf%c3%a9", "caf\u00e9", "", False),
        (b"/caf\xc3\xa9", "caf\u00e9", "", False),
        (b"/%2e%2e/etc/passwd", "../etc/passwd", "", False),
        (b"/../x", "../x", "", False),
        (b"/a%00b", "a\x00b", "", False),
        (b"/a%5cb", "a\\b", "", False),
        (b"/a\\b", "a\\b", "", False),
        (b"//x", "/x", "", False),
        (b"/a%2Fb", "a/b", "", False),
        (b"/a%3Fb?c?d", "a?b", "c?d", False),
        (b"/?a=%20&%zz", "", "a=%20&%zz", True),
        (b"/a+b", "a+b", "", False),
        (b"http://h/a", "a", "", False),
        (b"http://example.com:8080/a/?x", "a/", "x", True),
        (b"HTTPS://h/a", "a", "", False),
        (b"https://[::1]:5000/x", "x", "", False),
        (b"http://h", "", "", True),
        (b"http://h:80", "", "", True),
        (b"http://h?x=1", "", "x=1", True),
    ],
)
def test_targets(target: bytes, path: str, query: str, folder: bool) -> None:
    """Origin and absolute forms decode to the path without its C{/}, the raw query, folder or not."""
    parsed = parse_target(target)
    assert (parsed.path, parsed.query, parsed.folder) == (path, query, folder)


@pytest.mark.parametrize(
    "target",
    [
        b"*",
        b"",
        b"a/b",
        b"example.com:80",
        b"ftp://h/a",
        b"http:/h/a",
        b"http:///a",
        b"http://",
        b"http://u@h/a",
        b"http://h:x/a",
        b"http://h#f",
        b"/a#f",
        b"/a?b#f",
        b"/%",
        b"/%4",
        b"/%4g",
        b"/%zz",
        b"/a%",
        b"/%C3",
        b"/%ff",
        b"/\xff",
        b"/%ED%A0%80",
    ],
)
def test_refused_targets(target: bytes) -> None:
    """Other forms, fragments, malformed escapes and paths not in UTF-8 are 400."""
    with pytest.raises(HttpError) as caught:
        parse_target(target)
    assert caught.value.status == 400


@FAST
@given(st.text(st.characters(codec="utf-8")), st.text(string.ascii_letters + "=&%"))
def test_quoted_paths_decode_to_themselves(path: str, query: str) -> None:
    """Any path, percent-encoded as the client does, decodes back to itself."""
    target = parse_target(b"/" + quote_path(path) + b"?" + query.encode())
    assert (target.path, target.query) == (path, query)
    assert target.folder is (path == "" or path.endswith("/"))


def test_target_is_immutable() -> None:
    """A target's attributes cannot be set."""
    target = parse_target(b"/a")
    with pytest.raises(AttributeError):
        target.path = "b"  # type: ignore[misc]
    assert target == Target("a", "")


# wants_json


@pytest.mark.parametrize(
    "query, accept, expected",
    [
        ("", None, False),
        ("format=json", None, True),
        ("x=1&format=json", b"text/html", True),
        ("format=JSON", None, True),
        ("format=html", b"application/json", False),
        ("format=xml", b"application/json", True),
        ("formats=json", None, False),
        ("", b"application/json", True),
        ("", b"Application/JSON", True),
        ("", b"application/json; charset=utf-8", True),
        ("", b"application/json, text/plain, */*", True),
        ("", b"application/json;q=0", False),
        ("", b"application/json;q=0.000", False),
        ("", b"application/json;q=0.001", True),
        ("", b"application/json;q=abc", False),
        ("", b"application/json;q=1.5", False),
        ("", b"text/html, application/json", False),
        ("", b"text/html;q=0.9, application/json", True),
        ("", b"application/json;q=0.5, text/html;q=0.9", False),
        ("", b"application/json, text/html;q=0", True),
        ("", b"application/json ; Q=0.8 , text/html ; q=0.7", True),
        ("", b"*/*", False),
        ("", b"application/*", False),
        (
            "",
            b"text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8",
            False,
        ),
        ("", b"text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8", False),
    ],
)
def test_wants_json(query: str, accept: bytes | None, expected: bool) -> None:
    """C{format=} decides; else JSON only when Accept rates it above HTML; browsers get HTML."""
    head = head_with() if accept is None else head_with((b"accept", accept))
    assert wants_json(head, Target("", query)) is expected


# parse_range


@pytest.mark.parametrize(
    "value, size, expected",
    [
        (b"bytes=0-0", 10, (0, 0)),
        (b"bytes=0-9", 10, (0, 9)),
        (b"bytes=2-5", 10, (2, 5)),
        (b"bytes=5-100", 10, (5, 9)),
        (b"bytes=5-", 10, (5, 9)),
        (b"bytes=9-", 10, (9, 9)),
        (b"bytes=-3", 10, (7, 9)),
        (b"bytes=-10", 10, (0, 9)),
        (b"bytes=-100", 10, (0, 9)),
        (b"BYTES=1-2", 10, (1, 2)),
        (b"Bytes=1-2", 10, (1, 2)),
        (b"bytes=007-008", 10, (7, 8)),
        (b"bytes=1-2 ,", 10, (1, 2)),
        (b"bytes= 1-2", 10, (1, 2)),
        (b"bytes=,,1-2, ,", 10, (1, 2)),
        (b"bytes=1-2, 20-30", 10, (1, 2)),
        (b"bytes=1-" + b"9" * 5000, 10, (1, 9)),
        (b"bytes=-" + b"9" * 5000, 10, (0, 9)),
        (b"bytes=10-", 10, UNSATISFIABLE),
        (b"bytes=10-20", 10, UNSATISFIABLE),
        (b"bytes=-0", 10, UNSATISFIABLE),
        (b"bytes=-000", 10, UNSATISFIABLE),
        (b"bytes=10-20, 30-", 10, UNSATISFIABLE),
        (b"bytes=0-", 0, UNSATISFIABLE),
        (b"bytes=-5", 0, UNSATISFIABLE),
        (b"bytes=0-0", 0, UNSATISFIABLE),
        (b"bytes=" + b"9" * 5000 + b"-", 10, UNSATISFIABLE),
        (b"bytes=" + b"0" * 5000 + b"1-2", 10, (1, 2)),
        (b"bytes=" + b"9" * 40 + b"-" + b"9" * 40, 10, UNSATISFIABLE),
        (b"bytes=" + b"9" * 40 + b"-" + b"9" * 39, 10, None),
        (b"bytes=1" + b"0" * 40 + b"-" + b"9" * 40, 10, None),
        (b"bytes=0-1,3-4", 10, None),
        (b"bytes=" + b"0-1," * 15 + b"0-1", 10, None),
        (b"bytes=" + b"20-30," * 15 + b"20-30", 10, UNSATISFIABLE),
        (b"bytes=" + b"20-30," * 16 + b"20-30", 10, None),
        (b"bytes=" + b"," * 16 + b"1-2", 10, None),
        (b"bytes=" + b"," * 15 + b"1-2", 10, (1, 2)),
        (b"bytes=0-1, -2", 10, None),
        (b"bytes=0-1,0-1", 10, None),
        (b"bytes=5-2", 10, None),
        (b"bytes=0-1, 5-2", 10, None),
        (b"bytes=", 10, None),
        (b"bytes=,", 10, None),
        (b"bytes=-", 10, None),
        (b"bytes=a-b", 10, None),
        (b"bytes=1", 10, None),
        (b"bytes=1-2-3", 10, None),
        (b"bytes=+1-2", 10, None),
        (b"bytes=1 - 2", 10, None),
        (b"bytes = 1-2", 10, None),
        (b"bytes 1-2", 10, None),
        (b"items=0-1", 10, None),
        (b"0-1", 10, None),
        (b"", 10, None),
    ],
)
def test_ranges(value: bytes, size: int, expected: object) -> None:
    """
    One satisfiable range is read; valid but unsatisfiable sets are 416; the
    rest is ignored, and so is a set of more than MAX_RANGES (16) elements.
    """
    assert parse_range(value, size) == expected


range_specs = st.one_of(
    st.tuples(st.integers(0, 50), st.none() | st.integers(0, 50)).map(
        lambda r: b"%d-%s" % (r[0], b"" if r[1] is None else b"%d" % r[1])
    ),
    st.integers(0, 50).map(lambda n: b"-%d" % n),
    st.sampled_from([b"", b" ", b"x", b"-", b"1-2-3"]),
)


@FAST
@given(st.lists(range_specs, min_size=1, max_size=4), st.integers(0, 40))
def test_ranges_stay_inside(specs: list[bytes], size: int) -> None:
    """Any set gives a range inside the representation, UNSATISFIABLE, or None; never an error."""
    result = parse_range(b"bytes=" + b",".join(specs), size)
    alone = [parse_range(b"bytes=" + spec, size) for spec in specs]
    if isinstance(result, tuple):
        first, last = result
        assert 0 <= first <= last < size
        assert result in alone
    elif result is UNSATISFIABLE:
        assert all(one is UNSATISFIABLE or (one is None and not spec.strip())
                   for one, spec in zip(alone, specs))


# check_conditions and if_range_allows

ETAG = '"510023-16-18ed46573009fba8"'
OTHER = '"1-2-3"'
MTIME = RFC_EXAMPLE
BEFORE = http_date(MTIME - 1).encode()
AT = http_date(MTIME).encode()
AFTER = http_date(MTIME + 1).encode()


@pytest.mark.parametrize(
    "fields, expected",
    [
        ((), None),
        (((b"if-match", b"*"),), None),
        (((b"if-match", ETAG.encode()),), None),
        (((b"if-match", OTHER.encode() + b", " + ETAG.encode()),), None),
        (((b"if-match", OTHER.encode()),), 412),
        (((b"if-match", b"W/" + ETAG.encode()),), 412),
        (((b"if-match", b"garbage"),), 412),
        (((b"if-match", ETAG.encode()), (b"if-unmodified-since", BEFORE)), None),
        (((b"if-unmodified-since", BEFORE),), 412),
        (((b"if-unmodified-since", AT),), None),
        (((b"if-unmodified-since", AFTER),), None),
        (((b"if-unmodified-since", b"yesterday"),), None),
        (((b"if-none-match", b"*"),), 304),
        (((b"if-none-match", ETAG.encode()),), 304),
        (((b"if-none-match", b"W/" + ETAG.encode()),), 304),
        (((b"if-none-match", OTHER.encode() + b",W/" + ETAG.encode()),), 304),
        (((b"if-none-match", OTHER.encode()),), None),
        (((b"if-none-match", OTHER.encode()), (b"if-modified-since", AFTER)), None),
        (((b"if-none-match", ETAG.encode()), (b"if-modified-since", BEFORE)), 304),
        (((b"if-modified-since", AT),), 304),
        (((b"if-modified-since", AFTER),), 304),
        (((b"if-modified-since", BEFORE),), None),
        (((b"if-modified-since", b"Sun, 06 Nov 1994 08:49:37 UTC"),), None),
        (((b"if-modified-since", AT + b", " + AT),), None),
        (((b"if-match", OTHER.encode()), (b"if-none-match", ETAG.encode())), 412),
        (((b"if-unmodified-since", BEFORE), (b"if-none-match", ETAG.encode())), 412),
        (((b"if-match", ETAG.encode()), (b"if-none-match", ETAG.encode())), 304),
        (((b"if-match", ETAG.encode()), (b"if-modified-since", AT)), 304),
    ],
)
def test_conditions(fields: tuple[tuple[bytes, bytes], ...], expected: int | None) -> None:
    """Preconditions are evaluated in RFC 9110 13.2.2's order, with its comparisons."""
    assert check_conditions(head_with(*fields), ETAG, MTIME) == expected


def test_repeated_if_none_match_fields_form_one_list() -> None:
    """Entity-tags of repeated If-None-Match fields are one list."""
    head = read(b"GET / HTTP/1.1\r\nHost: h\r\nIf-None-Match: " + OTHER.encode()
                + b"\r\nIf-None-Match: " + ETAG.encode() + b"\r\n\r\n")
    assert check_conditions(head, ETAG, MTIME) == 304


def test_weak_etag_of_ours() -> None:
    """A weak ETag of ours never matches strongly, and does weakly."""
    weak = "W/" + ETAG
    assert check_conditions(head_with((b"if-match", ETAG.encode())), weak, MTIME) == 412
    assert check_conditions(head_with((b"if-none-match", ETAG.encode())), weak, MTIME) == 304


@pytest.mark.parametrize(
    "if_range, expected",
    [
        (None, True),
        (ETAG.encode(), True),
        (OTHER.encode(), False),
        (b"W/" + ETAG.encode(), False),
        (ETAG.encode() + b", " + OTHER.encode(), False),
        (AT, True),
        (BEFORE, False),
        (AFTER, False),
        (b"Sunday, 06-Nov-94 08:49:37 GMT", True),
        (b"not a date", False),
        (b"", False),
    ],
)
def test_if_range(if_range: bytes | None, expected: bool) -> None:
    """If-Range allows the range for a strongly matching ETag or the exact Last-Modified date."""
    head = head_with() if if_range is None else head_with((b"if-range", if_range))
    assert if_range_allows(head, ETAG, MTIME) is expected


# Dates


@pytest.mark.parametrize(
    "value, expected",
    [
        (b"Sun, 06 Nov 1994 08:49:37 GMT", RFC_EXAMPLE),
        (b"Sunday, 06-Nov-94 08:49:37 GMT", RFC_EXAMPLE),
        (b"Sun Nov  6 08:49:37 1994", RFC_EXAMPLE),
        (b"Sun Nov 06 08:49:37 1994", RFC_EXAMPLE),
        (b"Thu, 01 Jan 1970 00:00:00 GMT", 0),
        (b"Fri, 31 Dec 9999 23:59:59 GMT", 253402300799),
        (b"Thu, 29 Feb 2024 12:00:00 GMT", 1709208000),
        (b"Sun, 06 Nov 1994 08:49:37 UTC", None),
        (b"Sun, 06 Nov 1994 08:49:37 gmt", None),
        (b"sun, 06 Nov 1994 08:49:37 GMT", None),
        (b"Sun, 6 Nov 1994 08:49:37 GMT", None),
        (b"Sun,  06 Nov 1994 08:49:37 GMT", None),
        (b"Sun, 06 Nov 1994 08:49:37 GMT ", None),
        (b"Sun, 06 Nov 94 08:49:37 GMT", None),
        (b"Sun, 06 Nov 1994 08:49 GMT", None),
        (b"Sun, 06 Nov 1994 24:00:00 GMT", None),
        (b"Sun, 06 Nov 1994 08:60:00 GMT", None),
        (b"Sun, 06 Nov 1994 08:49:61 GMT", None),
        (b"Sun, 31 Feb 1994 08:49:37 GMT", None),
        (b"Thu, 29 Feb 2023 12:00:00 GMT", None),
        (b"Sun, 00 Nov 1994 08:49:37 GMT", None),
        (b"Sun, 06 Nov 0000 08:49:37 GMT", None),
        (b"Sun, 06 Foo 1994 08:49:37 GMT", None),
        (b"Sun, 06-Nov-94 08:49:37 GMT", None),
        (b"Sunday, 06 Nov 1994 08:49:37 GMT", None),
        (b"06 Nov 1994 08:49:37 GMT", None),
        (b"784111777", None),
        (b"", None),
        (b"\xff", None),
    ],
)
def test_parse_http_date(value: bytes, expected: int | None) -> None:
    """The three HTTP-date forms are read (case-sensitive, valid dates only); nothing else is."""
    assert parse_http_date(value) == expected


def test_two_digit_years_are_within_fifty_years() -> None:
    """An RFC 850 year is the one with those digits at most 50 years ahead (RFC 9110 5.6.7)."""
    this = time.gmtime().tm_year
    for digits in range(100):
        seconds = parse_http_date(b"Monday, 01-Jan-%02d 00:00:00 GMT" % digits)
        assert seconds is not None
        year = time.gmtime(seconds).tm_year
        assert year % 100 == digits and this - 50 <= year <= this + 50


def test_http_date() -> None:
    """Dates are IMF-fixdate in GMT, whole seconds."""
    assert http_date(RFC_EXAMPLE) == "Sun, 06 Nov 1994 08:49:37 GMT"
    assert http_date(RFC_EXAMPLE + 0.9) == "Sun, 06 Nov 1994 08:49:37 GMT"
    assert http_date(0) == "Thu, 01 Jan 1970 00:00:00 GMT"


@FAST
@given(st.integers(0, 253402300799))
def test_dates_round_trip(seconds: int) -> None:
    """Every date formatted is read back as the same second."""
    assert parse_http_date(http_date(seconds).encode()) == seconds


def test_date_cache_formats_once_a_second() -> None:
    """The cache gives the date of the clock's second, formatting it again only when it changes."""
    now = [RFC_EXAMPLE + 0.1]
    dates = DateCache(lambda: now[0])
    first = dates.now()
    assert first == b"Sun, 06 Nov 1994 08:49:37 GMT"
    now[0] = RFC_EXAMPLE + 0.9
    assert dates.now() is first
    now[0] = RFC_EXAMPLE + 1.0
    assert dates.now() == b"Sun, 06 Nov 1994 08:49:38 GMT"


# Response heads


def test_reasons() -> None:
    """Every status the daemon sends has its RFC 9110 reason phrase."""
    assert REASONS[200] == "OK"
    assert REASONS[206] == "Partial Content"
    assert REASONS[416] == "Range Not Satisfiable"
    assert REASONS[431] == "Request Header Fields Too Large"
    assert REASONS[505] == "HTTP Version Not Supported"
    for status in (200, 206, 301, 304, 400, 404, 405, 412, 414, 416, 431, 500, 503, 505):
        assert REASONS[status]


def test_format_head() -> None:
    """A head is the status line, one line per field in order, and an empty line."""
    assert format_head(200, [("Content-Length", "6"), ("ETag", '"1-2"')]) == (
        b'HTTP/1.1 200 OK\r\nContent-Length: 6\r\nETag: "1-2"\r\n\r\n'
    )
    assert format_head(304, [], version=b"HTTP/1.0") == b"HTTP/1.0 304 Not Modified\r\n\r\n"
    assert format_head(299, []) == b"HTTP/1.1 299 \r\n\r\n"


@pytest.mark.parametrize(
    "fields",
    [[("Location", "/a\r\nSet-Cookie: x")], [("X", "a\nb")], [("X\r", "a")], [("X", "\r")],
     [("X", "caf\u00e9")]],
)
def test_format_head_refuses_injection(fields: list[tuple[str, str]]) -> None:
    """A field with a CR or LF (or not ASCII) never reaches the wire."""
    with pytest.raises(ValueError):
        format_head(301, fields)


def test_error_response() -> None:
    """An error is a whole plain-text response; C{close} adds C{Connection: close}."""
    assert error_response(400, "bad request", date=b"D", close=True) == (
        b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: 12\r\nDate: D\r\nConnection: close\r\n\r\nbad request\n"
    )
    assert error_response(
        405, "method not allowed", date=b"D", close=False, extra=[("Allow", "GET, HEAD")]
    ) == (
        b"HTTP/1.1 405 Method Not Allowed\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: 19\r\nDate: D\r\nAllow: GET, HEAD\r\n\r\nmethod not allowed\n"
    )


def test_error_response_head_only() -> None:
    """Answering HEAD, the error has no body but the body's Content-Length."""
    data = error_response(404, "not found", date=b"D", close=False, head_only=True)
    assert data.endswith(b"Content-Length: 10\r\nDate: D\r\n\r\n")


def test_etag_and_digest() -> None:
    """The ETag quotes the version token; Repr-Digest is RFC 9530's base64 SHA-256."""
    assert etag_for("510023-16-18ed4657") == '"510023-16-18ed4657"'
    digest = hashlib.sha256(b"hello\n").hexdigest()
    assert repr_digest(digest) == "sha-256=:WJG1tSLV3whtD/CxEPvZ0hu0/HFjrzTQgoai6Eb2vgM=:"
    raw = hashlib.sha256(b"").digest()
    assert repr_digest(raw.hex()) == "sha-256=:" + base64.b64encode(raw).decode() + ":"


@pytest.mark.parametrize(
    "path, expected",
    [
        ("hello.txt", "text/plain; charset=utf-8"),
        ("docs/readme.TXT", "text/plain; charset=utf-8"),
        ("index.html", "text/html; charset=utf-8"),
        ("style.css", "text/css; charset=utf-8"),
        ("data.json", "application/json"),
        ("a/b/photo.png", "image/png"),
        ("photo.jpg", "image/jpeg"),
        ("paper.pdf", "application/pdf"),
        ("notes.v2.txt", "text/plain; charset=utf-8"),
        ("archive.tar.gz", "application/gzip"),
        ("archive.tgz", "application/gzip"),
        ("hello.txt.gz", "application/gzip"),
        ("archive.tar.bz2", "application/x-bzip2"),
        ("README", "application/octet-stream"),
        ("some.dir/README", "application/octet-stream"),
        ("data:text/html,x", "application/octet-stream"),
        ("file.unknownext", "application/octet-stream"),
        ("", "application/octet-stream"),
    ],
)
def test_content_type(path: str, expected: str) -> None:
    """Types come from the file's name; text types say UTF-8; compressed files are what they are."""
    assert content_type(path) == expected


@pytest.mark.parametrize("module", [httphead, httpreply])
def test_module_is_pure(module: types.ModuleType) -> None:
    """The grammar imports neither Twisted nor anything that does I/O of its own."""
    assert module.__file__ is not None
    source = pathlib.Path(module.__file__).read_text(encoding="utf-8")
    assert "twisted" not in source
    assert "import socket" not in source and "import os" not in source
