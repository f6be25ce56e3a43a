"""
The HTTP/1.1 grammar of the daemon's answers (RFC 9110, RFC 9530): ranges,
conditional requests, dates, response heads, validators and media types.
Pure; no I/O.  Requests are read by L{httphead}.
"""

from __future__ import annotations

import base64
import calendar
import datetime
import enum
import mimetypes
import re
import time
from collections.abc import Callable
from email.utils import formatdate
from functools import lru_cache
from typing import Final

from filecache.daemon.httphead import RequestHead


class Unsatisfiable(enum.Enum):
    """The type of L{UNSATISFIABLE}."""
    UNSATISFIABLE = "unsatisfiable"


UNSATISFIABLE: Final = Unsatisfiable.UNSATISFIABLE
"""L{parse_range}'s answer for a valid C{Range} that no byte satisfies (416)."""

_RANGE_SPEC = re.compile(rb"([0-9]*)-([0-9]*)\Z").match
MAX_RANGES = 16  # range specs (or empty list elements) read in one Range
_BEYOND = 10**31  # past any file: what a position of more than 30 digits is taken as


def _position(digits: bytes) -> tuple[int, int, bytes]:
    """A position as a number (never converting thousands of digits) and an exact sort key."""
    digits = digits.lstrip(b"0")
    return (int(digits or b"0") if len(digits) <= 30 else _BEYOND), len(digits), digits


def parse_range(value: bytes, size: int) -> tuple[int, int] | Unsatisfiable | None:
    """
    Read a C{Range} for a representation of C{size} bytes.

    @return: C{(first, last)}, inclusive, C{last} cut to C{size - 1}, when
        exactly one range can be satisfied; L{UNSATISFIABLE} when the set is
        valid but none can (first positions at or past the end, C{-0}, any
        range of an empty file); L{None} to ignore the header: malformed,
        another unit, a last position before its first, or several
        satisfiable ranges (answered with the whole file).
    """
    unit, equals, ranges = value.partition(b"=")
    if not equals or unit.lower() != b"bytes" or ranges.count(b",") >= MAX_RANGES:
        return None  # a set of many ranges may be ignored (RFC 9110 14.2): it costs time
    found: list[tuple[int, int]] = []
    specs = 0
    for spec in ranges.split(b","):
        spec = spec.strip(b" \t")
        if not spec:
            continue  # empty list elements are allowed (RFC 9110 5.6.1)
        match = _RANGE_SPEC(spec)
        if match is None or match.group() == b"-":
            return None
        specs += 1
        first_digits, last_digits = match.groups()
        if not first_digits:
            suffix = _position(last_digits)[0]
            if suffix and size:
                found.append((max(0, size - suffix), size - 1))
            continue
        first, *first_key = _position(first_digits)
        last, *last_key = _position(last_digits) if last_digits else (_BEYOND, _BEYOND, b"")
        if last_key < first_key:  # compared exactly, however many digits
            return None
        if first < size:
            found.append((first, min(last, size - 1)))
    if not specs:
        return None
    if not found:
        return UNSATISFIABLE
    return found[0] if len(found) == 1 else None


_ETAG = re.compile(rb'(W/)?"([\x21\x23-\x7e\x80-\xff]*)"')


def _etag_matches(value: bytes, etag: str, weak: bool) -> bool:
    """Whether the list C{value} (or C{*}) has C{etag}, compared weakly or strongly."""
    if value == b"*":
        return True
    ours_weak = etag[:2] == "W/"
    if ours_weak and not weak:
        return False
    wanted = (etag[3:-1] if ours_weak else etag[1:-1]).encode("latin-1")
    if b'"' + wanted + b'"' not in value:
        return False  # the common answer, without a match object per entity-tag
    for match in _ETAG.finditer(value):
        if match[2] == wanted and (weak or match[1] is None):
            return True
    return False


def check_conditions(head: RequestHead, etag: str, last_modified: int) -> int | None:
    """
    A C{GET} or C{HEAD}'s preconditions, in RFC 9110 13.2.2's order, for a
    representation with C{etag} (quoted) and C{last_modified} (Unix seconds):
    412, 304, or L{None} to go on.  Dates that do not parse are ignored.
    """
    if_match = head.get(b"if-match")
    if if_match is not None:
        if not _etag_matches(if_match, etag, weak=False):
            return 412
    elif (since := head.get(b"if-unmodified-since")) is not None:
        date = parse_http_date(since)
        if date is not None and last_modified > date:
            return 412
    if_none_match = head.get(b"if-none-match")
    if if_none_match is not None:
        return 304 if _etag_matches(if_none_match, etag, weak=True) else None
    if (since := head.get(b"if-modified-since")) is not None:
        date = parse_http_date(since)
        if date is not None and last_modified <= date:
            return 304
    return None


def if_range_allows(head: RequestHead, etag: str, last_modified: int) -> bool:
    """
    Whether a C{Range} applies: always without C{If-Range}; with an entity-tag
    that matches C{etag} strongly, or a date that is C{last_modified}.
    """
    value = head.get(b"if-range")
    if value is None:
        return True
    if value[:1] == b'"' or value[:2] == b"W/":
        match = _ETAG.fullmatch(value)
        return match is not None and match[1] is None and _etag_matches(value, etag, False)
    return parse_http_date(value) == last_modified


_MONTHS = {name: number for number, name in enumerate(
    b"Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split(), 1)}
_MONTH = rb"(?P<m>" + b"|".join(_MONTHS) + rb")"
_CLOCK = rb"(?P<H>[0-9]{2}):(?P<M>[0-9]{2}):(?P<S>[0-9]{2})"
_DAY = rb"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun)"
_WEEKDAY = rb"(?:Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday)"
_DATE_FORMS = [  # IMF-fixdate, RFC 850, asctime (RFC 9110 5.6.7), case-sensitive
    re.compile(rb"%s, (?P<d>[0-9]{2}) %s (?P<y>[0-9]{4}) %s GMT\Z" % (_DAY, _MONTH, _CLOCK)).match,
    re.compile(rb"%s, (?P<d>[0-9]{2})-%s-(?P<y>[0-9]{2}) %s GMT\Z" % (_WEEKDAY, _MONTH, _CLOCK)).match,
    re.compile(rb"%s %s (?P<d>[0-9]{2}| [0-9]) %s (?P<y>[0-9]{4})\Z" % (_DAY, _MONTH, _CLOCK)).match,
]


def http_date(seconds: float) -> str:
    """Unix C{seconds} as an IMF-fixdate: C{Sun, 06 Nov 1994 08:49:37 GMT}."""
    return _http_date(int(seconds))


@lru_cache(maxsize=4096)
def _http_date(seconds: int) -> str:
    # Files' modification times repeat from request to request.
    return formatdate(seconds, usegmt=True)


def parse_http_date(value: bytes) -> int | None:
    """An HTTP-date (any of its three forms) as Unix seconds; L{None} if C{value} is not one."""
    for form in _DATE_FORMS:
        match = form(value)
        if match is not None:
            break
    else:
        return None
    day, month, year, hour, minute, second = match.group("d", "m", "y", "H", "M", "S")
    number = int(year)
    if len(year) == 2:  # RFC 9110 5.6.7: never more than 50 years ahead, else the latest past
        this = time.gmtime().tm_year
        past = this - (this - number) % 100
        number = past + 100 if past + 100 <= this + 50 else past
    try:
        moment = datetime.datetime(number, _MONTHS[month], int(day), int(hour), int(minute),
                                   int(second), tzinfo=datetime.timezone.utc)
    except ValueError:
        return None
    return calendar.timegm(moment.utctimetuple())


class DateCache:
    """The C{Date} of now, formatted at most once a second."""

    __slots__ = ("_second", "_seconds", "_value")

    def __init__(self, seconds: Callable[[], float]) -> None:
        self._seconds = seconds
        self._second: int | None = None
        self._value = b""

    def now(self) -> bytes:
        """L{http_date} of the clock's time, in bytes."""
        second = int(self._seconds())
        if second != self._second:
            self._value = http_date(second).encode("ascii")
            self._second = second
        return self._value


REASONS: dict[int, str] = {
    200: "OK", 206: "Partial Content", 301: "Moved Permanently", 304: "Not Modified",
    400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
    412: "Precondition Failed", 414: "URI Too Long", 416: "Range Not Satisfiable",
    431: "Request Header Fields Too Large", 500: "Internal Server Error",
    503: "Service Unavailable", 505: "HTTP Version Not Supported",
}
_STATUS_LINES = {status: b" %d %s\r\n" % (status, reason.encode()) for status, reason in REASONS.items()}


def format_head(status: int, fields: list[tuple[str, str]], *, version: bytes = b"HTTP/1.1") -> bytes:
    """A response head; L{ValueError} if a field has a CR or LF, or is not ASCII."""
    lines = "".join([f"{name}: {value}\r\n" for name, value in fields])
    if lines.count("\n") != len(fields) or lines.count("\r") != len(fields):
        raise ValueError("CR or LF in a response header field")
    status_line = _STATUS_LINES.get(status) or b" %d %s\r\n" % (status, REASONS.get(status, "").encode())
    return b"".join((version, status_line, lines.encode("ascii"), b"\r\n"))


def error_response(status: int, message: str, *, date: bytes, close: bool, head_only: bool = False,
                   extra: list[tuple[str, str]] | None = None) -> bytes:
    """
    A whole response with the body C{message} and a newline, in C{text/plain}
    (C{head_only}: without the body, but with its C{Content-Length}).
    """
    body = (message + "\n").encode("utf-8")
    fields = [("Content-Type", "text/plain; charset=utf-8"),
              ("Content-Length", str(len(body))), ("Date", date.decode("ascii"))]
    fields += extra or []
    if close:
        fields.append(("Connection", "close"))
    head = format_head(status, fields)
    return head if head_only else head + body


def etag_for(version: str) -> str:
    """The strong ETag of a file's version token."""
    return f'"{version}"'


def repr_digest(hex_digest: str) -> str:
    """The C{Repr-Digest} (RFC 9530) of a SHA-256 in hex."""
    return "sha-256=:" + base64.b64encode(bytes.fromhex(hex_digest)).decode("ascii") + ":"


# A compressed file is served as what it is, never with a Content-Encoding.
_COMPRESSED = {"gzip": "application/gzip", "bzip2": "application/x-bzip2",
               "xz": "application/x-xz", "compress": "application/x-compress"}


def content_type(path: str) -> str:
    """A file's type by C{mimetypes}, else C{application/octet-stream}; C{text/*} in UTF-8."""
    name = path.rpartition("/")[2].lstrip(".")
    dot = name.find(".")
    return _type_of_suffixes(name[dot:] if dot >= 0 else "")


@lru_cache(maxsize=1024)
def _type_of_suffixes(suffixes: str) -> str:
    # What comes before a name's first dot never changes the guess; the "/x"
    # keeps mimetypes from taking a "data:" prefix for a data URL.
    kind, encoding = mimetypes.guess_type("/x" + suffixes, strict=False)
    if encoding is not None:
        kind = _COMPRESSED.get(encoding)
    if kind is None:
        return "application/octet-stream"
    return kind + "; charset=utf-8" if kind.startswith("text/") else kind
