"""
The lines of the server's replies, read by the client (docs/protocol.md):
pure functions on one line, its CRLF already gone; a malformed one raises MalformedReply.
"""

from __future__ import annotations

import re

from filecache import wire
from filecache.client.errors import MalformedReply

_VERSION = re.compile(rb"[0-9a-f]+(?:-[0-9a-f]+)*\Z")
_DIGEST = re.compile(rb"[0-9a-f]{64}\Z")
_INTEGER = re.compile(rb"-?[0-9]+\Z")
_TOKEN = re.compile(rb"[\x21-\x7e]+\Z")


def parse_status(line: bytes) -> wire.Status:
    """A status line: C{OK} with its fields, or C{ERR} with its code and text."""
    if line == b"OK" or line.startswith(b"OK "):
        return wire.Status(ok=True, fields=tuple(line[3:].split()))
    if line.startswith(b"ERR "):
        code, _, text = line[4:].partition(b" ")
        return wire.Status(
            ok=False,
            code=code.decode("ascii", "replace"),
            message=text.decode("utf-8", "replace"),
        )
    raise MalformedReply("malformed status line from server")


def parse_count(status: wire.Status) -> int:
    """The C{<n>} of an C{OK <n>} status (STATS)."""
    if len(status.fields) != 1 or not status.fields[0].isdigit():
        raise MalformedReply("malformed count in status line")
    return int(status.fields[0])


def parse_get_status(status: wire.Status) -> tuple[int, str]:
    """The C{<size>} and C{<version>} of a GET reply's C{OK} status."""
    if len(status.fields) != 2 or not status.fields[0].isdigit():
        raise MalformedReply("malformed GET status line")
    if not _VERSION.match(status.fields[1]):
        raise MalformedReply("malformed version in GET status line")
    return int(status.fields[0]), status.fields[1].decode("ascii")


def parse_hash_status(status: wire.Status) -> tuple[int, str, str]:
    """The C{<size>}, C{<version>} and C{<sha256>} of a HASH reply."""
    if len(status.fields) != 3:
        raise MalformedReply("malformed HASH status line")
    size, version = parse_get_status(wire.Status(True, status.fields[:2]))
    if not _DIGEST.match(status.fields[2]):
        raise MalformedReply("malformed digest in HASH status line")
    return size, version, status.fields[2].decode("ascii")


def parse_end(line: bytes) -> str:
    """The digest of the C{END <sha256-hex>} line that closes a GET body."""
    if not line.startswith(b"END ") or not _DIGEST.match(line[4:]):
        raise MalformedReply("malformed END line")
    return line[4:].decode("ascii")


def parse_list_row(line: bytes) -> wire.ListRow:
    """One C{<size> <mtime> <C|-> <path>} line of a LIST reply."""
    parts = line.split(b" ")
    if (
        len(parts) != 4
        or not parts[0].isdigit()
        or not _INTEGER.match(parts[1])
        or parts[2] not in (b"C", b"-")
    ):
        raise MalformedReply("malformed LIST row")
    try:
        path = wire.unquote_path(parts[3])
    except wire.WireError as e:
        # The shared decoder speaks in the daemon's terms (an error code
        # that answers a request); from the server it is a malformed reply.
        raise MalformedReply(e.message) from None
    return wire.ListRow(
        size=int(parts[0]),
        mtime=int(parts[1]),
        cached=parts[2] == b"C",
        path=path,
    )


def parse_list_end(line: bytes) -> int | None:
    """
    The C{<n>} of the C{END <n>} line that closes a LIST reply, or C{None}
    if C{line} is not an C{END} line (a row, or an error line).
    """
    if not line.startswith(b"END"):
        return None
    if not line.startswith(b"END ") or not line[4:].isdigit():
        raise MalformedReply("malformed END line of a LIST reply")
    return int(line[4:])


def parse_stats_row(line: bytes) -> tuple[str, wire.StatValue]:
    """
    One C{<key> <value>} line of a STATS reply: an integer value, or a text
    one (such as C{version}).
    """
    key, _, value = line.partition(b" ")
    if not key or not value or not _TOKEN.match(value):
        raise MalformedReply("malformed STATS row")
    if _INTEGER.match(value):
        return key.decode("ascii", "replace"), int(value)
    return key.decode("ascii", "replace"), value.decode("ascii")
