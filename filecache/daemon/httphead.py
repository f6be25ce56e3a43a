"""
The HTTP/1.1 grammar of the daemon (RFC 9110, RFC 9112): request heads read a
line at a time, targets, ranges, conditions, response heads.  Pure; no I/O.
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
from typing import Final, NamedTuple
from urllib.parse import unquote_to_bytes

# Limits of docs/http.md, in bytes without the line's terminator (the head:
# every line with its terminator).
MAX_REQUEST_LINE = 8192  # longer: 414
MAX_HEADER_LINE = 8192  # longer: 431
MAX_HEAD = 32768  # longer: 431
MAX_FIELDS = 100  # more: 431

_TCHAR = rb"!#$%&'*+\-.^_`|~0-9A-Za-z"
_HTTP_LINE = re.compile(rb"[%s]+ [^ ]+ HTTP/[0-9]\.[0-9]\r?\Z" % _TCHAR).match
_HTTP_START = re.compile(rb"[%s]+ (?:/|(?i:https?)://)" % _TCHAR).match
# A target is visible ASCII or obs-text; a value anything but controls other
# than HTAB (RFC 9110 5.5).  Both patterns run in linear time.
_REQUEST_LINE = re.compile(rb"([%s]+) ([!-~\x80-\xff]+) HTTP/([0-9])\.([0-9])\Z" % _TCHAR).match
_FIELD_LINE = re.compile(rb"([%s]+):([^\x00-\x08\x0a-\x1f\x7f]*)\Z" % _TCHAR).match
_TOKEN = re.compile(rb"[%s]+\Z" % _TCHAR).match
_HOST = rb"(?:\[[0-9A-Za-z:.]+\]|[A-Za-z0-9\-._~%!$&'()*+,;=]*)(?::[0-9]*)?"
_HOST_VALUE = re.compile(_HOST + rb"\Z").match
_ABSOLUTE = re.compile(rb"(?i:https?)://(?=[^/?:])" + _HOST + rb"(?=[/?]|\Z)").match
_BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})").search
_V10: Final = (1, 0)
_V11: Final = (1, 1)


def is_request_line(line: bytes) -> bool:
    """Whether C{line} (perhaps with a C{\\r}) is C{TOKEN SP target SP HTTP/<digit>.<digit>}."""
    return _HTTP_LINE(line) is not None


def starts_like_http(buffer: bytes) -> bool:
    """Whether a line too long to read starts with C{TOKEN SP /} (or an C{http(s)://})."""
    return _HTTP_START(buffer) is not None


class HttpError(Exception):
    """A head answered with C{status} (400, 414, 431, 505) and C{message} (one ASCII line)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(status, message)
        self.status = status
        self.message = message


class RequestHead:
    """
    One request's head, as L{HeadReader} read and checked it.  Immutable.

    @ivar method: as sent (methods are case-sensitive).
    @ivar target: the request-target, as sent.
    @ivar version: C{(1, 0)} or C{(1, 1)} (any C{HTTP/1.x} above 1.0 is 1.1).
    @ivar fields: C{(name, value)} pairs in order, names lower-cased, values
        without the whitespace around them.
    """

    __slots__ = ("_index", "fields", "method", "target", "version")
    method: bytes
    target: bytes
    version: tuple[int, int]
    fields: tuple[tuple[bytes, bytes], ...]
    _index: dict[bytes, bytes]

    def __init__(self, method: bytes, target: bytes, version: tuple[int, int],
                 fields: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        index: dict[bytes, bytes] = {}
        for name, value in fields:
            index[name] = index[name] + b", " + value if name in index else value
        _fill(self, method, target, version, fields, index)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("RequestHead is immutable")

    def __repr__(self) -> str:
        return f"RequestHead({self.method!r}, {self.target!r}, {self.version}, {self.fields!r})"

    def get(self, name: bytes) -> bytes | None:
        """Field C{name}'s value (C{name} lower-case), repeated fields joined with C{, }."""
        return self._index.get(name)

    @property
    def keep_alive(self) -> bool:
        """Whether the connection stays open: 1.1 without C{Connection: close}, 1.0 with C{keep-alive}."""
        value = self._index.get(b"connection")
        if value is None:
            return self.version == _V11
        tokens = {token.strip(b" \t") for token in value.lower().split(b",")}
        return b"close" not in tokens and (self.version == _V11 or b"keep-alive" in tokens)


# The slots' own descriptors set them past __setattr__, at half the cost of
# object.__setattr__: this runs for every request.
_SET = [RequestHead.__dict__[name].__set__ for name in RequestHead.__slots__]


def _fill(head: RequestHead, method: bytes, target: bytes, version: tuple[int, int],
          fields: tuple[tuple[bytes, bytes], ...], index: dict[bytes, bytes]) -> RequestHead:
    set_index, set_fields, set_method, set_target, set_version = _SET
    set_index(head, index)
    set_fields(head, fields)
    set_method(head, method)
    set_target(head, target)
    set_version(head, version)
    return head


_new = object.__new__
_CHECKED = frozenset((b"host", b"content-length", b"transfer-encoding"))


class HeadReader:
    """
    Reads request heads a line at a time, checking them as docs/http.md
    ("Requests") says: once a head is returned, the next one begins.  After
    it has raised, it is not fed again.  Empty lines before a request line
    count in the head's size.
    """

    __slots__ = ("_fields", "_index", "_method", "_size", "_target", "_version")

    def __init__(self) -> None:
        self._method: bytes | None = None
        self._target = b""
        self._version = _V11
        self._fields: list[tuple[bytes, bytes]] = []
        self._index: dict[bytes, bytes] = {}
        self._size = 0

    @property
    def started(self) -> bool:
        """Whether the request line of an unfinished head has been read."""
        return self._method is not None

    def feed(self, line: bytes) -> RequestHead | None:
        """
        Take one line, without its C{\\n} (one trailing C{\\r} is dropped).

        @return: the head, on the empty line that ends it; else L{None}.
        @raise HttpError: for a head that breaks the rules.
        """
        self._size = size = self._size + len(line) + 1
        if line[-1:] == b"\r":
            line = line[:-1]
        if self._method is None:
            if line:
                self._request_line(line, size)
            elif size > MAX_HEAD:  # empty lines before a request are ignored (RFC 9112 2.2)
                raise HttpError(431, "request head too large")
            return None
        if len(line) > MAX_HEADER_LINE:
            raise HttpError(431, "header line too long")
        if size > MAX_HEAD:
            raise HttpError(431, "request head too large")
        index = self._index
        if not line:
            if self._version == _V11 and b"host" not in index:
                raise HttpError(400, "missing Host")
            head = _fill(_new(RequestHead), self._method, self._target, self._version,
                         tuple(self._fields), index)
            self._method, self._fields, self._index, self._size = None, [], {}, 0
            return head
        fields = self._fields
        if len(fields) >= MAX_FIELDS:
            raise HttpError(431, "too many header fields")
        match = _FIELD_LINE(line)
        if match is None:
            raise _field_error(line)
        name, value = match.groups()
        name = name.lower()
        value = value.strip(b" \t")
        if name in index:
            if name in _CHECKED:
                raise HttpError(400, "repeated " + name.decode())
            index[name] += b", " + value
        else:
            if name in _CHECKED:
                _check_field(name, value)
            index[name] = value
        fields.append((name, value))
        return None

    def _request_line(self, line: bytes, size: int) -> None:
        if len(line) > MAX_REQUEST_LINE:
            raise HttpError(414, "request line too long")
        if size > MAX_HEAD:
            raise HttpError(431, "request head too large")
        match = _REQUEST_LINE(line)
        if match is None:
            raise _line_error(line, "malformed request line")
        method, target, major, minor = match.groups()
        if major != b"1":
            raise HttpError(505, "HTTP version not supported")
        self._method = method
        self._target = target
        self._version = _V10 if minor == b"0" else _V11


def _check_field(name: bytes, value: bytes) -> None:
    # No body at all (RFC 9112 6.3 then leaves nothing to smuggle); a valid Host.
    if name == b"host":
        if _HOST_VALUE(value) is None:
            raise HttpError(400, "malformed Host")
    elif name == b"transfer-encoding" or value != b"0":
        raise HttpError(400, "request bodies are not accepted")


def _field_error(line: bytes) -> HttpError:
    # Which rule a header line that failed its pattern breaks.
    name, colon, _ = line.partition(b":")
    if line[:1] in (b" ", b"\t"):
        return HttpError(400, "obsolete line folding")
    if colon and name[-1:] in (b" ", b"\t"):
        return HttpError(400, "whitespace before a colon")
    if colon and _TOKEN(name) is None and b"\r" not in name:
        return HttpError(400, "header name is not a token")
    return _line_error(line, "control character in a header value" if colon else "no colon in a header")


def _line_error(line: bytes, message: str) -> HttpError:
    return HttpError(400, "bare CR in the request head" if b"\r" in line else message)


class Target(NamedTuple):
    """
    A request-target, decoded.

    @ivar path: percent-decoded UTF-8 without its leading C{/} (C{""}: the
        root), not otherwise normalised: the shared folder refuses what it must.
    @ivar query: the raw query after C{?} (one character a byte), C{""} if none.
    """

    path: str
    query: str = ""

    @property
    def folder(self) -> bool:
        """Whether L{path} is C{""} or ends with C{/}."""
        return not self.path or self.path[-1] == "/"


def parse_target(target: bytes) -> Target:
    """
    Decode an origin-form (C{/p?q}) or absolute-form (C{http[s]://host/p?q}) target.

    @raise HttpError: (400) any other form, a fragment, a bad escape, a path not in UTF-8.
    """
    if target[:1] != b"/":
        match = _ABSOLUTE(target)
        if match is None:
            raise HttpError(400, "unsupported request target")
        target = target[match.end():]
        if target[:1] != b"/":
            target = b"/" + target
    if b"#" in target:
        raise HttpError(400, "fragment in the request target")
    path, _, query = target[1:].partition(b"?")
    if b"%" in path:
        if _BAD_ESCAPE(path) is not None:
            raise HttpError(400, "malformed percent escape")
        path = unquote_to_bytes(path)
    try:
        return Target(path.decode("utf-8"), query.decode("latin-1"))
    except UnicodeDecodeError:
        raise HttpError(400, "path is not UTF-8") from None


_QVALUE = re.compile(rb"(?:0(?:\.[0-9]{0,3})?|1(?:\.0{0,3})?)\Z").match


def wants_json(head: RequestHead, target: Target) -> bool:
    """
    Whether a folder listing goes out as JSON: the query's C{format=json} or
    C{format=html} decides; else C{Accept} must name C{application/json}
    (q > 0) and rate it above C{text/html} (not named: not rated), so a
    browser, whose C{Accept} names HTML and wildcards, gets HTML.
    """
    for part in target.query.split("&"):
        key, _, value = part.partition("=")
        if key == "format" and value.lower() in ("json", "html"):
            return value.lower() == "json"
    accept = head.get(b"accept") or b""
    rated = {b"application/json": 0, b"text/html": 0}
    for item in accept.split(b","):
        media, *params = item.split(b";")
        media = media.strip(b" \t").lower()
        if media in rated:
            q = 1000
            for param in params:
                key_b, _, value_b = param.partition(b"=")
                if key_b.strip(b" \t").lower() == b"q":
                    value_b = value_b.strip(b" \t")
                    q = round(float(value_b) * 1000) if _QVALUE(value_b) else -1
            rated[media] = max(rated[media], q)
    return rated[b"application/json"] > rated[b"text/html"]


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
