"""
What the adapters keep between requests, each bounded: whole responses to
plain HTTP GETs of small cached files, the header fields of request heads
read before, and plain GET requests of either protocol known by their bytes.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

from filecache.daemon.cache import CacheEntry
from filecache.daemon.httphead import RequestHead

V = TypeVar("V")

READY_BUDGET = 8 * 1024 * 1024
"""Bytes of whole small-file responses kept ready for the next plain GET."""


class ReadyResponses:
    """
    Whole C{200} responses to plain GETs of small cached files, but for
    their Date, by request-target: building the same head for every hit of
    a small file costs more than sending it.  Each is kept beside the cache
    entry it was built from and used only while the responder says that
    entry is still current; the oldest go first past L{READY_BUDGET}.
    """

    def __init__(self, budget: int = READY_BUDGET) -> None:
        self._budget = budget
        self._kept: OrderedDict[bytes, tuple[CacheEntry, str, bytes, bytes]] = OrderedDict()
        self._bytes = 0

    def get(self, target: bytes) -> tuple[CacheEntry, str, bytes, bytes] | None:
        return self._kept.get(target)

    def keep(self, target: bytes, entry: CacheEntry, path: str, head: bytes, body: bytes) -> None:
        old = self._kept.pop(target, None)
        if old is not None:
            self._bytes -= len(old[2]) + len(old[3])
        self._kept[target] = (entry, path, head, body)
        self._bytes += len(head) + len(body)
        while self._bytes > self._budget:
            _, (_, _, h, b) = self._kept.popitem(last=False)
            self._bytes -= len(h) + len(b)


HEAD_MEMO_SIZE = 4096
"""The longest request head kept parsed for the next time the same bytes come."""

HEAD_MEMO_ENTRIES = 256


class ParsedHeads:
    """
    The header fields of request heads read before, by their exact bytes
    and the request's version: a keep-alive client (a browser, a download
    tool, a load balancer's health check) sends the same fields again and
    again with only the request line changing, and reading the fields is a
    pure function of those bytes, so fields seen before need no second
    reading; the request line is still read every time.  Only heads read
    without error are kept; at most L{HEAD_MEMO_ENTRIES} of at most
    L{HEAD_MEMO_SIZE} bytes, the oldest dropped first.
    """

    def __init__(self, entries: int = HEAD_MEMO_ENTRIES) -> None:
        self._entries = entries
        # Ordered: the oldest goes in O(1) (deleting a plain dict's first key
        # again and again makes finding the next first key ever slower).
        self._kept: OrderedDict[tuple[tuple[int, int], bytes], RequestHead] = OrderedDict()

    def get(self, version: tuple[int, int], fields: bytes) -> RequestHead | None:
        return self._kept.get((version, fields))

    def keep(self, fields: bytes, head: RequestHead) -> None:
        kept = self._kept
        if len(kept) >= self._entries:
            kept.popitem(last=False)
        kept[(head.version, fields)] = head


KNOWN_REQUESTS = 4096
"""Requests remembered by their bytes, at most, for each protocol."""


class KnownRequests(Generic[V]):
    """
    Whole requests known to be plain GETs, by their exact bytes, with what
    they ask for: HTTP heads of keep-alive HTTP/1.1 GETs with no range and
    no condition (with their request-target), native C{GET <path> 0} lines
    (with their path).  What a request asks is a pure function of its
    bytes, and a client fetching small files sends the same request for the
    same file again and again: a read that is exactly such a request needs
    no parsing at all.  At most L{KNOWN_REQUESTS}, of at most
    L{HEAD_MEMO_SIZE} bytes; the oldest go first.
    """

    def __init__(self, entries: int = KNOWN_REQUESTS) -> None:
        self._entries = entries
        self._kept: OrderedDict[bytes, V] = OrderedDict()  # see ParsedHeads

    def get(self, request: bytes) -> V | None:
        return self._kept.get(request)

    def keep(self, request: bytes, asked: V) -> None:
        kept = self._kept
        if request in kept or len(request) > HEAD_MEMO_SIZE:
            return
        if len(kept) >= self._entries:
            kept.popitem(last=False)
        kept[request] = asked
