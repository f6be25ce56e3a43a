"""
The filecache wire format, version 1: parsing requests, encoding replies and
percent-encoding paths.  Pure functions on bytes; no I/O (see docs/protocol.md).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

MAX_LINE = 4096
"""The longest request line, in bytes, not counting its terminator."""

CRLF = b"\r\n"

# Error codes, as they appear after "ERR ".
NOT_FOUND = "not-found"
BAD_REQUEST = "bad-request"
TOO_LONG = "too-long"
BUSY = "busy"
UNAVAILABLE = "unavailable"

_SAFE = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~/"
)
_QUOTE_TABLE = [chr(b) if b in _SAFE else f"%{b:02X}" for b in range(256)]
_HEX = frozenset(b"0123456789abcdefABCDEF")
_INTEGER = re.compile(rb"-?[0-9]+\Z")


class WireError(Exception):
    """
    A request or reply that breaks the wire format.

    @ivar code: the protocol error code that answers it.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class PathError(ValueError):
    """
    A path that cannot name a shared file: empty, absolute, with a C{.} or
    C{..} component, a dot-file, a backslash or a NUL byte.
    """


_PLAIN = re.compile(rb"[A-Za-z0-9\-._~/]*\Z")


def quote_path(path: str) -> bytes:
    """
    Percent-encode C{path} for the wire: every byte of its UTF-8 form outside
    C{A-Z a-z 0-9 - . _ ~ /} becomes C{%XX}.
    """
    return quote_bytes(path.encode("utf-8"))


def quote_bytes(raw: bytes) -> bytes:
    """L{quote_path} for a path already in UTF-8."""
    if _PLAIN.match(raw):
        return raw
    return "".join([_QUOTE_TABLE[b] for b in raw]).encode("ascii")


def unquote_path(quoted: bytes) -> str:
    """
    Decode a percent-encoded path from the wire.

    @raise WireError: (bad-request) on a malformed escape or a result that is
        not UTF-8.
    """
    if b"%" not in quoted:
        try:
            return quoted.decode("utf-8")
        except UnicodeDecodeError:
            raise WireError(BAD_REQUEST, "path is not UTF-8") from None
    out = bytearray()
    i = 0
    n = len(quoted)
    while i < n:
        c = quoted[i]
        if c == 0x25:  # "%"
            pair = quoted[i + 1 : i + 3]
            if len(pair) != 2 or pair[0] not in _HEX or pair[1] not in _HEX:
                raise WireError(BAD_REQUEST, "malformed percent escape")
            out.append(int(pair, 16))
            i += 3
        else:
            out.append(c)
            i += 1
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        raise WireError(BAD_REQUEST, "path is not UTF-8") from None


def split_path(path: str) -> tuple[str, ...]:
    """
    Split a shared path into its components, refusing every form that could
    leave the shared folder or name a hidden file.

    @raise PathError: if C{path} cannot name a shared file.
    """
    if not path or path.startswith("/") or "\\" in path or "\x00" in path:
        raise PathError(path)
    parts = tuple(path.split("/"))
    for part in parts:
        if not part or part.startswith("."):
            raise PathError(path)
    return parts


# Requests


@dataclass(frozen=True)
class ListRequest:
    """C{LIST} or C{LIST CACHED}."""

    cached: bool = False


@dataclass(frozen=True)
class GetRequest:
    """C{GET <path> [<offset>]}."""

    path: str
    offset: int = 0


@dataclass(frozen=True)
class HashRequest:
    """C{HASH <path>}: the whole file's size, version and SHA-256."""

    path: str


@dataclass(frozen=True)
class StatsRequest:
    """C{STATS}."""


@dataclass(frozen=True)
class QuitRequest:
    """C{QUIT}."""


Request = ListRequest | GetRequest | HashRequest | StatsRequest | QuitRequest


def _parse_offset(token: bytes) -> int:
    if not token.isdigit() or len(token) > 20:
        raise WireError(BAD_REQUEST, "offset must be a non-negative integer")
    return int(token)


def parse_request(line: bytes) -> Request:
    """
    Parse one request line (without its C{\\n}; a trailing C{\\r} is
    ignored).

    @raise WireError: with the code of the error reply that answers it.
    """
    if line.endswith(b"\r"):
        line = line[:-1]
    if len(line) > MAX_LINE:
        raise WireError(TOO_LONG, f"request line longer than {MAX_LINE} bytes")
    words = line.split(b" ")
    verb = words[0].upper()
    args = words[1:]
    if verb == b"GET":
        if len(args) == 1 and args[0]:
            return GetRequest(unquote_path(args[0]))
        if len(args) == 2 and args[0]:
            return GetRequest(unquote_path(args[0]), _parse_offset(args[1]))
        raise WireError(BAD_REQUEST, "usage: GET <path> [<offset>]")
    if verb == b"HASH":
        if len(args) == 1 and args[0]:
            return HashRequest(unquote_path(args[0]))
        raise WireError(BAD_REQUEST, "usage: HASH <path>")
    if verb == b"LIST":
        if not args:
            return ListRequest()
        if len(args) == 1 and args[0].upper() == b"CACHED":
            return ListRequest(cached=True)
        raise WireError(BAD_REQUEST, "usage: LIST [CACHED]")
    if verb == b"STATS" and not args:
        return StatsRequest()
    if verb == b"QUIT" and not args:
        return QuitRequest()
    if verb in (b"STATS", b"QUIT"):
        raise WireError(BAD_REQUEST, f"{verb.decode()} takes no arguments")
    if not verb:
        raise WireError(BAD_REQUEST, "empty request")
    shown = verb[:32].decode("ascii", "replace")
    raise WireError(BAD_REQUEST, f"unknown command {shown!r}")


def format_request(request: Request) -> bytes:
    """Encode a request as the client sends it, terminator included."""
    if isinstance(request, GetRequest):
        line = b"GET " + quote_path(request.path)
        if request.offset:
            line += b" %d" % (request.offset,)
    elif isinstance(request, HashRequest):
        line = b"HASH " + quote_path(request.path)
    elif isinstance(request, ListRequest):
        line = b"LIST CACHED" if request.cached else b"LIST"
    elif isinstance(request, StatsRequest):
        line = b"STATS"
    else:
        line = b"QUIT"
    return line + b"\r\n"


# Replies


def format_error(code: str, message: str) -> bytes:
    """C{ERR <code> <message>}, with anything but printable ASCII replaced."""
    text = message.encode("ascii", "replace")
    text = bytes(b if 0x20 <= b < 0x7F else 0x3F for b in text)
    return b"ERR " + code.encode("ascii") + b" " + text + CRLF


def format_get_status(size: int, version: str) -> bytes:
    """C{OK <size> <version>}: the status line of a GET reply."""
    return b"OK %d %s\r\n" % (size, version.encode("ascii"))


def format_hash_status(size: int, version: str, digest: str) -> bytes:
    """C{OK <size> <version> <sha256>}: the reply to HASH."""
    return b"OK %d %s %s\r\n" % (size, version.encode("ascii"), digest.encode("ascii"))


def format_end(digest: str) -> bytes:
    """C{END <sha256-hex>}: the line that closes a GET body."""
    return b"END " + digest.encode("ascii") + CRLF


@dataclass(frozen=True)
class ListRow:
    """One file of a C{LIST} reply."""

    size: int
    mtime: int
    cached: bool
    path: str


MAX_LIST_ROWS = 1_000_000
"""The most rows a LIST reply holds: the daemon ends a listing that would
hold more with an error line, and the client refuses more."""

LIST_STATUS = b"OK\r\n"
"""The status line of a LIST reply: rows follow, then C{END <n>}."""


def format_list_row(path: bytes, size: int, mtime: int, cached: bool) -> bytes:
    """One C{<size> <mtime> <C|-> <quoted path>} row from the path's UTF-8 bytes."""
    return b"%d %d %s %s\r\n" % (size, mtime, b"C" if cached else b"-", quote_bytes(path))


def format_list_end(count: int) -> bytes:
    """C{END <n>}: the line that closes a complete LIST reply of C{n} rows."""
    return b"END %d\r\n" % (count,)


def format_list(rows: Iterable[ListRow]) -> bytes:
    """A whole C{LIST} reply: C{OK}, one line per file, C{END <n>}."""
    lines = [
        format_list_row(row.path.encode("utf-8"), row.size, row.mtime, row.cached)
        for row in rows
    ]
    return LIST_STATUS + b"".join(lines) + format_list_end(len(lines))


StatValue = int | str


def format_stats(stats: Iterable[tuple[str, StatValue]]) -> bytes:
    """
    A whole C{STATS} reply: C{OK <n>} and one C{<key> <value>} per line.
    Values are integers, or text without spaces or control characters.
    """
    lines = [b"%s %s\r\n" % (key.encode("ascii"), str(value).encode("ascii")) for key, value in stats]
    return b"OK %d\r\n" % (len(lines),) + b"".join(lines)


def printable(text: str) -> str:
    """
    C{text} safe to show on a terminal or in a log: every control or other
    non-printable character becomes a backslash escape, and a backslash is
    doubled, so what a peer sends can never move a cursor or fake a line.
    """
    if text.isprintable() and "\\" not in text:
        return text
    out = []
    for ch in text:
        if ch == "\\":
            out.append("\\\\")
        elif ch.isprintable():
            out.append(ch)
        else:
            code = ord(ch)
            if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
                code -= 0xDC00
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return "".join(out)


def printable_bytes(raw: bytes) -> str:
    """L{printable} of bytes from a peer, invalid UTF-8 shown as C{\\xNN}."""
    return printable(raw.decode("utf-8", "surrogateescape"))


# What the client parses replies into (filecache/client/reply_lines.py)


@dataclass(frozen=True)
class Status:
    """
    A parsed status line: C{OK} with its fields, or C{ERR} with its code and
    text.
    """

    ok: bool
    fields: tuple[bytes, ...] = ()
    code: str = ""
    message: str = ""
