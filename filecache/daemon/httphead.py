"""
The HTTP/1.1 grammar of the daemon's requests (RFC 9110, RFC 9112): request
heads read a line at a time, and targets.  Pure; no I/O.  What an answer is
made of (ranges, conditions, dates, response heads) is in L{httpreply}.
"""

from __future__ import annotations

import re
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
        if size > MAX_HEAD and len(line) <= MAX_REQUEST_LINE:
            raise HttpError(431, "request head too large")
        self._method, self._target, self._version = parse_request_line(line)


def parse_request_line(line: bytes) -> tuple[bytes, bytes, tuple[int, int]]:
    """
    The method, target and version of a request line (without its line
    end), checked as L{HeadReader} checks it.

    @raise HttpError: C{414}, C{400} or C{505}.
    """
    if len(line) > MAX_REQUEST_LINE:
        raise HttpError(414, "request line too long")
    match = _REQUEST_LINE(line)
    if match is None:
        raise _line_error(line, "malformed request line")
    method, target, major, minor = match.groups()
    if major != b"1":
        raise HttpError(505, "HTTP version not supported")
    return method, target, _V10 if minor == b"0" else _V11


def with_request_line(head: RequestHead, method: bytes, target: bytes) -> RequestHead:
    """
    A head with C{head}'s version and header fields (shared, as both are
    immutable) and another method and target: for a head whose fields were
    read before.
    """
    return _fill(_new(RequestHead), method, target, head.version, head.fields, head._index)


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
