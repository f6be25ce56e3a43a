"""
The in-memory cache of whole files: a byte budget, first-in first-out
eviction, entries checked against the file's current version.  Pure logic.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from zope.interface import Attribute, Interface, implementer

ENTRY_OVERHEAD = 1024
"""Bytes charged to the budget for each entry on top of its content: the
entry, its key, its version and digest and the index slot it takes
(measured at about 600 to 800 bytes on CPython 3.11, see docs/security.md)."""


@dataclass(frozen=True)
class CacheEntry:
    """
    One cached file.

    @ivar data: the whole content.
    @ivar version: the version token of the file the content was read from.
    @ivar digest: SHA-256 of C{data}, hex.
    @ivar mtime: the file's modification time in whole seconds.
    @ivar source: the path on disk it was read from, before symlinks were
        resolved (a C{stat} of it tells whether the entry is still current).
    @ivar state: the file's inode, size, modification and change times in
        nanoseconds when it was read: what its version token is made of, as
        numbers, to compare with a C{stat} cheaply.
    """

    data: bytes | bytearray
    version: str
    digest: str
    mtime: int
    source: str = ""
    state: tuple[int, int, int, int] | None = None


class ICache(Interface):
    """A store of whole files under a byte budget."""

    capacity = Attribute(
        "The budget in bytes; the entries' costs plus the reserved bytes never exceed it."
    )
    size = Attribute("The content bytes stored now.")
    used = Attribute("The budget taken now: every entry's cost, plus reservations.")
    hits = Attribute("Lookups that found a current entry.")
    misses = Attribute("Lookups that did not.")
    evictions = Attribute("Entries dropped to make room or because they went stale.")
    on_drop = Attribute(
        "C{None}, or called with (path, entry) whenever an entry leaves the cache, for whatever reason."
    )

    def lookup(path: str, version: str) -> CacheEntry | None:
        """
        The entry for C{path} if it holds C{version}; a stale entry is
        evicted.  Counts a hit or a miss.
        """

    def peek(path: str) -> CacheEntry | None:
        """The entry for C{path}, whatever its version, counting nothing."""

    def admits(size: int) -> bool:
        """Whether a file of C{size} bytes may be cached at all."""

    def reserve(size: int) -> bool:
        """
        Set aside room for an entry of C{size} content bytes about to be
        read, evicting the oldest entries now, before the bytes are in
        memory.  C{False} (nothing reserved) if it cannot fit beside the
        other reservations.
        """

    def release(size: int) -> None:
        """Give back a reservation made by L{reserve}."""

    def insert(path: str, entry: CacheEntry) -> bool:
        """
        Store C{entry} as the newest, evicting the oldest entries until it
        fits.  Return C{False} (storing nothing) if it can never fit.
        """

    def discard(path: str) -> None:
        """Evict C{path}'s entry if there is one."""

    def __iter__() -> Iterator[tuple[str, CacheEntry]]:
        """The entries, oldest (next to be evicted) first."""

    def __len__() -> int:
        """The number of entries."""


@implementer(ICache)
class FifoCache:
    """
    L{ICache} evicting in order of insertion: a hit does not move an entry,
    and a changed file is re-inserted as the newest.
    """

    def __init__(self, capacity: int, entry_overhead: int = ENTRY_OVERHEAD) -> None:
        if capacity < 0:
            raise ValueError("capacity must not be negative")
        self.capacity = capacity
        self.entry_overhead = entry_overhead
        self.size = 0
        self.used = 0
        self.reserved = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.on_drop: Callable[[str, CacheEntry], None] | None = None
        self._entries: OrderedDict[str, CacheEntry] = OrderedDict()

    def lookup(self, path: str, version: str) -> CacheEntry | None:
        entry = self._entries.get(path)
        if entry is not None:
            if entry.version == version:
                self.hits += 1
                return entry
            self._drop(path)
        self.misses += 1
        return None

    def peek(self, path: str) -> CacheEntry | None:
        return self._entries.get(path)

    def admits(self, size: int) -> bool:
        return size + self.entry_overhead <= self.capacity

    def reserve(self, size: int) -> bool:
        needed = size + self.entry_overhead
        if self.reserved + needed > self.capacity:
            return False
        self._make_room(needed)
        self.reserved += needed
        self.used += needed
        return True

    def release(self, size: int) -> None:
        needed = size + self.entry_overhead
        self.reserved -= needed
        self.used -= needed

    def _make_room(self, needed: int) -> None:
        while self.used + needed > self.capacity and self._entries:
            self._drop(next(iter(self._entries)))

    def insert(self, path: str, entry: CacheEntry) -> bool:
        if path in self._entries:
            self._drop(path)
        needed = len(entry.data) + self.entry_overhead
        if needed + self.reserved > self.capacity:
            return False
        self._make_room(needed)
        self._entries[path] = entry
        self.size += len(entry.data)
        self.used += needed
        return True

    def discard(self, path: str) -> None:
        if path in self._entries:
            self._drop(path)

    def _drop(self, path: str) -> None:
        entry = self._entries.pop(path)
        self.size -= len(entry.data)
        self.used -= len(entry.data) + self.entry_overhead
        self.evictions += 1
        if self.on_drop is not None:
            self.on_drop(path, entry)

    def __iter__(self) -> Iterator[tuple[str, CacheEntry]]:
        return iter(list(self._entries.items()))

    def __len__(self) -> int:
        return len(self._entries)


DIGEST_ENTRY_COST = 320
"""Bytes one remembered digest costs: its version key, 32 digest bytes and
the index slot (measured at about 270 on CPython 3.11)."""

DIGEST_BUDGET = 8 * 1024 * 1024
"""The memory the digest store may take."""


class DigestStore:
    """
    SHA-256 digests of whole files by version token, so a file too big to
    cache is hashed once, not on every transfer.  Bounded in bytes (each
    entry counted at L{DIGEST_ENTRY_COST}); the oldest is dropped first.
    """

    def __init__(self, budget: int = DIGEST_BUDGET) -> None:
        self._limit = budget // DIGEST_ENTRY_COST
        self._digests: OrderedDict[str, bytes] = OrderedDict()

    def __len__(self) -> int:
        return len(self._digests)

    def get(self, version: str) -> str | None:
        raw = self._digests.get(version)
        return raw.hex() if raw is not None else None

    def put(self, version: str, digest: str) -> None:
        self._digests[version] = bytes.fromhex(digest)
        while len(self._digests) > self._limit:
            self._digests.popitem(last=False)
