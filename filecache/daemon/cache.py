"""
The in-memory cache of whole files: a byte budget, an eviction policy (FIFO,
S3-FIFO or SIEVE), entries checked against the file's current version.  Pure logic.
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
        read, evicting (the oldest entries, or whichever the policy picks)
        now, before the bytes are in memory.  C{False} (nothing reserved)
        if it cannot fit beside the other reservations.
        """

    def release(size: int) -> None:
        """Give back a reservation made by L{reserve}."""

    def insert(path: str, entry: CacheEntry) -> bool:
        """
        Store C{entry} as the newest, evicting (the oldest entries, or
        whichever the policy picks) until it fits.  Return C{False}
        (storing nothing) if it can never fit.
        """

    def discard(path: str) -> None:
        """Evict C{path}'s entry if there is one."""

    def __iter__() -> Iterator[tuple[str, CacheEntry]]:
        """
        A snapshot of the entries, the next to be evicted first: exactly
        for L{FifoCache}, roughly for the other policies (each says how).
        """

    def __len__() -> int:
        """The number of entries."""


class _Budget:
    """
    What every L{ICache} here shares: the byte budget with each entry's
    overhead, reservations made before a file's bytes are read, and the
    counters.  A subclass keeps the entries and says which leaves first
    (C{_make_room}).
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
        raise NotImplementedError


@implementer(ICache)
class FifoCache(_Budget):
    """
    L{ICache} evicting in order of insertion: a hit does not move an entry,
    and a changed file is re-inserted as the newest.
    """

    def __init__(self, capacity: int, entry_overhead: int = ENTRY_OVERHEAD) -> None:
        super().__init__(capacity, entry_overhead)
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


class _Node:
    """An entry and what its policy keeps about it."""

    __slots__ = ("cost", "entry", "freq", "in_main", "newer", "older", "path", "visited")

    def __init__(self, path: str, entry: CacheEntry, cost: int) -> None:
        self.path = path
        self.entry = entry
        self.cost = cost
        self.freq = 0  # S3-FIFO: hits since insertion or the last pass, at most 3
        self.in_main = False  # S3-FIFO: which queue
        self.visited = False  # SIEVE
        self.newer: _Node | None = None  # SIEVE's list
        self.older: _Node | None = None


class _PolicyCache(_Budget):
    """
    The entries of a policy other than FIFO, as linked nodes: a subclass
    decides where a new entry goes, what a hit records, and which entry
    leaves when room is needed.  A hit is one dict lookup and one
    attribute write: it is on the path of every cached request.
    """

    def __init__(self, capacity: int, entry_overhead: int = ENTRY_OVERHEAD) -> None:
        super().__init__(capacity, entry_overhead)
        self._nodes: dict[str, _Node] = {}

    # What a policy provides.

    def _hit(self, node: _Node) -> None:
        raise NotImplementedError

    def _link(self, node: _Node) -> None:
        """Put a new node in its queue."""
        raise NotImplementedError

    def _unlink(self, node: _Node) -> None:
        """Take a node out of its queue."""
        raise NotImplementedError

    def _victim(self) -> _Node:
        """The node to evict for room (there is at least one)."""
        raise NotImplementedError

    def _evicted(self, node: _Node) -> None:
        """C{node} was evicted for room (not discarded, not stale)."""

    # ICache.

    def lookup(self, path: str, version: str) -> CacheEntry | None:
        node = self._nodes.get(path)
        if node is not None:
            if node.entry.version == version:
                self.hits += 1
                self._hit(node)
                return node.entry
            self._drop(node)
        self.misses += 1
        return None

    def peek(self, path: str) -> CacheEntry | None:
        node = self._nodes.get(path)
        return None if node is None else node.entry

    def insert(self, path: str, entry: CacheEntry) -> bool:
        old = self._nodes.get(path)
        if old is not None:
            self._drop(old)
        needed = len(entry.data) + self.entry_overhead
        if needed + self.reserved > self.capacity:
            return False
        self._make_room(needed)
        node = _Node(path, entry, needed)
        self._nodes[path] = node
        self._link(node)
        self.size += len(entry.data)
        self.used += needed
        return True

    def discard(self, path: str) -> None:
        node = self._nodes.get(path)
        if node is not None:
            self._drop(node)

    def __len__(self) -> int:
        return len(self._nodes)

    # The shared bookkeeping.

    def _make_room(self, needed: int) -> None:
        while self.used + needed > self.capacity and self._nodes:
            node = self._victim()
            self._drop(node)
            self._evicted(node)

    def _drop(self, node: _Node) -> None:
        self._unlink(node)
        del self._nodes[node.path]
        self.size -= len(node.entry.data)
        self.used -= node.cost
        self.evictions += 1
        if self.on_drop is not None:
            self.on_drop(node.path, node.entry)


SMALL_SHARE = 0.1
"""S3-FIFO: the share of the budget its probationary queue is kept to."""

GHOST_FLOOR = 64
"""S3-FIFO: the ghost remembers at least this many keys, even in a cache of fewer entries."""

MAX_FREQ = 3


@implementer(ICache)
class S3FifoCache(_PolicyCache):
    """
    L{ICache} after S3-FIFO (Yang et al., SOSP 2023): a new entry waits in
    a small probationary FIFO (about L{SMALL_SHARE} of the budget); one hit
    there by the time it reaches the small queue's tail moves it to the main
    FIFO, and one never hit is evicted and its key kept in a ghost queue.  A
    key found in the ghost when it is inserted again goes straight to main.
    The main queue evicts in FIFO order, but an entry hit since its last
    pass goes round once more (up to three times for three hits).  So a scan
    of files read once churns through the small queue and leaves main, where
    the hot files are, alone.  A changed file's new version starts on
    probation again, like any entry whose key the ghost does not hold
    (entries dropped as stale or discarded are not remembered there).

    The ghost holds keys only, no content, and at most as many as the cache
    has entries (at least L{GHOST_FLOOR}): it is not charged to the budget,
    since each entry's L{ENTRY_OVERHEAD} already pays for a key.

    Iteration gives the small queue oldest first, then the main queue
    oldest first: roughly the order of eviction (the next to go depends on
    the queues' sizes and on which entries were hit).
    """

    def __init__(self, capacity: int, entry_overhead: int = ENTRY_OVERHEAD) -> None:
        super().__init__(capacity, entry_overhead)
        self.small_target = int(capacity * SMALL_SHARE)
        self.small_used = 0
        self._small: OrderedDict[str, _Node] = OrderedDict()
        self._main: OrderedDict[str, _Node] = OrderedDict()
        self._ghost: OrderedDict[str, None] = OrderedDict()

    def _hit(self, node: _Node) -> None:
        if node.freq < MAX_FREQ:
            node.freq += 1

    def _link(self, node: _Node) -> None:
        if node.path in self._ghost:
            del self._ghost[node.path]
            node.in_main = True
            self._main[node.path] = node
        else:
            self._small[node.path] = node
            self.small_used += node.cost

    def _unlink(self, node: _Node) -> None:
        if node.in_main:
            del self._main[node.path]
        else:
            del self._small[node.path]
            self.small_used -= node.cost

    def _victim(self) -> _Node:
        if self.small_used >= self.small_target or not self._main:
            # Promote what was hit on probation; the first never hit leaves.
            small = self._small
            while small:
                node = next(iter(small.values()))
                if not node.freq:
                    return node
                del small[node.path]
                self.small_used -= node.cost
                node.freq = 0
                node.in_main = True
                self._main[node.path] = node
        main = self._main
        while True:
            node = next(iter(main.values()))
            if not node.freq:
                return node
            node.freq -= 1
            main.move_to_end(node.path)

    def _evicted(self, node: _Node) -> None:
        if node.in_main:
            return
        ghost = self._ghost
        ghost[node.path] = None
        limit = max(len(self._nodes), GHOST_FLOOR)
        while len(ghost) > limit:
            del ghost[next(iter(ghost))]

    def in_main(self, path: str) -> bool:
        """Whether C{path}'s entry is in the main queue (for tests and reports)."""
        node = self._nodes.get(path)
        return node is not None and node.in_main

    def in_ghost(self, path: str) -> bool:
        """Whether C{path} is remembered in the ghost queue."""
        return path in self._ghost

    def __iter__(self) -> Iterator[tuple[str, CacheEntry]]:
        items = [(n.path, n.entry) for n in self._small.values()]
        items += [(n.path, n.entry) for n in self._main.values()]
        return iter(items)


@implementer(ICache)
class SieveCache(_PolicyCache):
    """
    L{ICache} after SIEVE (Zhang et al., NSDI 2024): one queue, new entries
    at its head, a visited bit set by a hit (the entry does not move), and a
    hand that walks from the tail toward the head, clearing visited bits
    and evicting the first entry it finds unvisited; it wraps round to the
    tail when it passes the head, and stays where it stopped.  So a hit
    entry survives one more pass of the hand.

    Iteration gives the entries in the order the hand will reach them: from
    the hand toward the head, then from the tail up to the hand (the
    visited ones among them will be passed over once).
    """

    def __init__(self, capacity: int, entry_overhead: int = ENTRY_OVERHEAD) -> None:
        super().__init__(capacity, entry_overhead)
        self._head: _Node | None = None  # the newest
        self._tail: _Node | None = None  # the oldest
        self._hand: _Node | None = None  # None: start at the tail

    def _hit(self, node: _Node) -> None:
        node.visited = True

    def _link(self, node: _Node) -> None:
        node.older = self._head
        node.newer = None
        if self._head is not None:
            self._head.newer = node
        self._head = node
        if self._tail is None:
            self._tail = node

    def _unlink(self, node: _Node) -> None:
        if self._hand is node:
            self._hand = node.newer
        if node.newer is not None:
            node.newer.older = node.older
        else:
            self._head = node.older
        if node.older is not None:
            node.older.newer = node.newer
        else:
            self._tail = node.newer
        node.newer = node.older = None

    def _victim(self) -> _Node:
        node = self._hand or self._tail
        assert node is not None
        while node.visited:
            node.visited = False
            node = node.newer or self._tail
            assert node is not None
        # _unlink moves the hand on to the victim's newer neighbour.
        self._hand = node
        return node

    def visited(self, path: str) -> bool:
        """Whether C{path}'s entry has been hit since the hand last passed it."""
        node = self._nodes.get(path)
        return node is not None and node.visited

    def __iter__(self) -> Iterator[tuple[str, CacheEntry]]:
        items: list[tuple[str, CacheEntry]] = []
        start = self._hand or self._tail
        node = start
        while node is not None:
            items.append((node.path, node.entry))
            node = node.newer
        node = self._tail
        while node is not None and node is not start:
            items.append((node.path, node.entry))
            node = node.newer
        return iter(items)


POLICIES = ("fifo", "s3fifo", "sieve")
"""The values of C{--cache-policy}, the default first."""


def policy_name(cache: ICache) -> str:
    """The C{--cache-policy} that makes a cache like C{cache} (its class name for another ICache)."""
    kind = type(cache)
    names: dict[type, str] = {FifoCache: "fifo", S3FifoCache: "s3fifo", SieveCache: "sieve"}
    return names.get(kind, kind.__name__)


def make_cache(policy: str, capacity: int, entry_overhead: int = ENTRY_OVERHEAD) -> ICache:
    """The cache for C{--cache-policy}: one of L{POLICIES}."""
    if policy == "fifo":
        return FifoCache(capacity, entry_overhead)
    if policy == "s3fifo":
        return S3FifoCache(capacity, entry_overhead)
    if policy == "sieve":
        return SieveCache(capacity, entry_overhead)
    raise ValueError(f"unknown cache policy {policy!r}: one of {', '.join(POLICIES)}")


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
