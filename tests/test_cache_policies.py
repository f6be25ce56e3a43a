"""
Tests for the scan-resistant cache policies, L{S3FifoCache} and
L{SieveCache}: the ICache contract they share with FifoCache, what defines
each policy, and --cache-policy.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from twisted.internet.testing import MemoryReactorClock
from zope.interface.verify import verifyClass, verifyObject

from filecache.daemon.cache import (
    POLICIES,
    CacheEntry,
    FifoCache,
    ICache,
    S3FifoCache,
    SieveCache,
    make_cache,
    policy_name,
)

PolicyCache = S3FifoCache | SieveCache
NEW_POLICIES = [S3FifoCache, SieveCache]


def entry(size: int, version: str = "v1", fill: bytes = b"x") -> CacheEntry:
    """A cache entry of C{size} bytes for version C{version}."""
    data = (fill * size)[:size]
    return CacheEntry(data, version, hashlib.sha256(data).hexdigest(), 1_700_000_000)


def paths(cache: ICache) -> list[str]:
    """The cached paths, in the cache's iteration order."""
    return [path for path, _ in cache]


# What both share with FifoCache.


@pytest.mark.parametrize("kind", NEW_POLICIES)
def test_provides_icache(kind: type[PolicyCache]) -> None:
    """Each policy implements every method and attribute ICache declares."""
    assert verifyClass(ICache, kind)
    assert verifyObject(ICache, kind(10, entry_overhead=0))
    assert ICache.providedBy(kind(0, entry_overhead=0))


@pytest.mark.parametrize("kind", NEW_POLICIES)
def test_negative_capacity_refused(kind: type[PolicyCache]) -> None:
    """A negative byte budget raises ValueError."""
    with pytest.raises(ValueError):
        kind(-1)


@pytest.mark.parametrize("kind", NEW_POLICIES)
def test_hit_miss_stale_and_peek(kind: type[PolicyCache]) -> None:
    """
    A lookup with the stored version is a hit; another version evicts the
    stale entry and is a miss; an absent path is a miss; peek counts nothing.
    """
    cache = kind(100, entry_overhead=0)
    e = entry(10)
    assert cache.insert("a", e) is True
    assert cache.peek("a") is e and cache.peek("b") is None
    assert (cache.hits, cache.misses, cache.evictions) == (0, 0, 0)
    assert cache.lookup("a", "v1") is e
    assert cache.lookup("b", "v1") is None
    assert (cache.hits, cache.misses, cache.evictions) == (1, 1, 0)
    assert cache.lookup("a", "v2") is None
    assert (cache.hits, cache.misses, cache.evictions) == (1, 2, 1)
    assert (len(cache), cache.size, cache.used) == (0, 0, 0)


@pytest.mark.parametrize("kind", NEW_POLICIES)
def test_every_entry_that_leaves_is_reported(kind: type[PolicyCache]) -> None:
    """on_drop hears of an entry evicted for room, discarded, made stale or replaced."""
    cache = kind(30, entry_overhead=0)
    dropped: list[tuple[str, CacheEntry]] = []
    cache.on_drop = lambda path, e: dropped.append((path, e))
    ea, eb, ec, ed = entry(10), entry(10), entry(10), entry(10)
    for name, e in zip("abc", (ea, eb, ec)):
        cache.insert(name, e)
    cache.insert("d", ed)  # room for d: one of a, b, c goes
    assert len(dropped) == 1 and dropped[0][0] in "abc"
    gone = dropped[0][0]
    left = [p for p in "abc" if p != gone]
    cache.discard(left[0])
    cache.lookup(left[1], "v2")
    new_d = entry(5, "v2")
    cache.insert("d", new_d)
    assert [p for p, _ in dropped] == [gone, left[0], left[1], "d"]
    assert dropped[3][1] is ed
    assert paths(cache) == ["d"] and cache.evictions == 4


@pytest.mark.parametrize("kind", NEW_POLICIES)
def test_reserve_evicts_before_the_bytes_are_read(kind: type[PolicyCache]) -> None:
    """A reservation makes room at once, is never squeezed by inserts, and is given back."""
    cache = kind(100, entry_overhead=0)
    cache.insert("old", entry(60))
    assert cache.reserve(60) is True
    assert paths(cache) == [] and cache.used == 60
    assert cache.reserve(60) is False
    assert cache.insert("small", entry(30)) is True
    assert cache.insert("big", entry(50)) is False
    assert cache.used == 90
    cache.release(60)
    assert cache.insert("new", entry(60)) is True
    assert sorted(paths(cache)) == ["new", "small"]
    assert cache.used == cache.size == 90


@pytest.mark.parametrize("kind", NEW_POLICIES)
def test_budget_counts_the_overhead(kind: type[PolicyCache]) -> None:
    """Each entry costs its bytes plus the overhead; a zero budget holds nothing."""
    assert kind(0).insert("empty", entry(0)) is False
    cache = kind(1000, entry_overhead=100)
    assert not cache.admits(901)
    for n in range(20):
        assert cache.insert(f"f{n}", entry(100))
    assert len(cache) == 5 and cache.used == 1000 and cache.size == 500


# S3-FIFO.


def test_s3fifo_new_entries_are_on_probation() -> None:
    """A new entry goes to the small queue; one never hit leaves first, to the ghost."""
    cache = S3FifoCache(100, entry_overhead=0)
    assert cache.small_target == 10
    cache.insert("a", entry(10))
    assert not cache.in_main("a")
    cache.insert("b", entry(95))  # needs room: a, never hit, goes
    assert cache.peek("a") is None
    assert cache.in_ghost("a")
    assert cache.evictions == 1


def test_s3fifo_hit_on_probation_promotes_to_main() -> None:
    """An entry hit while in the small queue moves to main when it reaches the tail."""
    cache = S3FifoCache(100, entry_overhead=0)
    cache.insert("a", entry(10))
    cache.insert("b", entry(10))
    assert cache.lookup("a", "v1") is not None
    cache.insert("c", entry(85))  # room for 5 more: a is promoted, b (never hit) goes
    assert cache.in_main("a")
    assert cache.peek("b") is None and cache.in_ghost("b")
    assert not cache.in_ghost("a")


def test_s3fifo_ghost_hit_goes_to_main() -> None:
    """A key remembered in the ghost goes straight to main when inserted again."""
    cache = S3FifoCache(100, entry_overhead=0)
    cache.insert("a", entry(10))
    cache.insert("filler", entry(95))
    assert cache.in_ghost("a")
    assert cache.insert("a", entry(10, "v2")) is True
    assert cache.in_main("a") and not cache.in_ghost("a")
    # A key never seen goes to the small queue as usual.
    cache.insert("z", entry(1))
    assert not cache.in_main("z")


def test_s3fifo_scan_does_not_evict_hot_main_entry() -> None:
    """
    A scan of many entries read once does not push out an entry in main that
    is hit between them: the scan churns through the small queue.
    """
    cache = S3FifoCache(1000, entry_overhead=0)
    cache.insert("hot", entry(100))
    cache.lookup("hot", "v1")
    # Fill the small queue until hot reaches its tail and is promoted.
    for n in range(20):
        cache.insert(f"warm{n}", entry(100))
    assert cache.in_main("hot")
    for n in range(500):
        cache.insert(f"scan{n}", entry(50))
        if n % 10 == 0:
            assert cache.lookup("hot", "v1") is not None
    assert cache.peek("hot") is not None and cache.in_main("hot")
    assert cache.used <= cache.capacity


def test_fifo_scan_does_evict_the_hot_entry() -> None:
    """The same scan flushes the hot entry from a FifoCache: what S3-FIFO is for."""
    cache = FifoCache(1000, entry_overhead=0)
    cache.insert("hot", entry(100))
    for n in range(500):
        cache.insert(f"scan{n}", entry(50))
        if n % 10 == 0:
            cache.lookup("hot", "v1")
    assert cache.peek("hot") is None


def test_s3fifo_main_reinserts_hit_entries() -> None:
    """Main evicts FIFO, but an entry hit since its last pass goes round once more."""
    cache = S3FifoCache(1000, entry_overhead=0)
    for name in "abc":
        cache.insert(name, entry(300))
        cache.lookup(name, "v1")
    cache.insert("d", entry(50))
    # Room for e: a, b, c (hit) are promoted, d (never hit) goes to the ghost.
    cache.insert("e", entry(60))
    assert all(cache.in_main(n) for n in "abc")
    assert cache.in_ghost("d") and not cache.in_main("e")
    cache.lookup("a", "v1")
    # Room for f with the small queue under its share: main gives it, passing
    # over a (hit since its promotion) and evicting b, the next oldest.
    cache.insert("f", entry(60))
    assert cache.peek("b") is None
    assert cache.peek("a") is not None and cache.in_main("a")
    assert not cache.in_ghost("b")  # main's evictions are not remembered
    assert paths(cache) == ["e", "f", "c", "a"]


def test_s3fifo_ghost_is_bounded() -> None:
    """The ghost keeps at most as many keys as the cache has entries, or the floor."""
    from filecache.daemon.cache import GHOST_FLOOR

    cache = S3FifoCache(100, entry_overhead=0)
    for n in range(GHOST_FLOOR * 3):
        cache.insert(f"f{n}", entry(50))
    assert len(cache._ghost) == GHOST_FLOOR
    assert cache.in_ghost(f"f{GHOST_FLOOR * 3 - 3}")
    assert not cache.in_ghost("f0")


# SIEVE.


def test_sieve_visited_survives_one_pass() -> None:
    """
    The hand passes over an entry hit since its last pass (clearing the
    bit) and evicts the first unvisited one; with no new hit, the survivor
    goes at the next pass.
    """
    cache = SieveCache(30, entry_overhead=0)
    for name in "abc":
        cache.insert(name, entry(10))
    cache.lookup("a", "v1")
    assert cache.visited("a")
    cache.insert("d", entry(10))
    assert cache.peek("a") is not None and cache.peek("b") is None
    assert not cache.visited("a")
    cache.insert("e", entry(10))  # the hand goes on from where it stopped: c
    assert cache.peek("c") is None and cache.peek("a") is not None
    cache.lookup("d", "v1")
    cache.lookup("e", "v1")
    # The hand clears d and e, passes the head, wraps to the tail: a, not
    # hit again since its bit was cleared, goes now.
    cache.insert("f", entry(10))
    assert cache.peek("a") is None
    assert sorted(paths(cache)) == ["d", "e", "f"]
    assert not cache.visited("d") and not cache.visited("e")


def test_sieve_hit_does_not_move_and_all_visited_wraps() -> None:
    """When every entry was hit the hand clears them all and evicts the oldest."""
    cache = SieveCache(30, entry_overhead=0)
    for name in "abc":
        cache.insert(name, entry(10))
        cache.lookup(name, "v1")
    assert paths(cache) == ["a", "b", "c"]
    cache.insert("d", entry(10))
    assert paths(cache) == ["b", "c", "d"]
    assert not cache.visited("b") and not cache.visited("c")


def test_sieve_iteration_starts_at_the_hand() -> None:
    """Iteration gives the entries in the order the hand reaches them."""
    cache = SieveCache(40, entry_overhead=0)
    for name in "abcd":
        cache.insert(name, entry(10))
    cache.lookup("a", "v1")
    cache.insert("e", entry(10))  # passes a, evicts b; the hand is at c
    assert paths(cache) == ["c", "d", "e", "a"]
    cache.discard("c")  # the hand moves on to d
    assert paths(cache) == ["d", "e", "a"]


# make_cache and --cache-policy.


def test_make_cache_builds_each_policy() -> None:
    """make_cache gives the class each policy name stands for, and refuses others."""
    assert POLICIES[0] == "fifo"
    kinds = {name: type(make_cache(name, 10)) for name in POLICIES}
    assert kinds == {"fifo": FifoCache, "s3fifo": S3FifoCache, "sieve": SieveCache}
    with pytest.raises(ValueError):
        make_cache("lru", 10)
    assert [policy_name(make_cache(name, 10)) for name in POLICIES] == list(POLICIES)


def test_cache_policy_option(tmp_path: Path) -> None:
    """--cache-policy: fifo by default, any policy when asked, junk refused in one line; workers get it."""
    from filecache.daemon.startup import ConfigError
    from filecache.daemon.tap import Options

    options = Options()
    options.parseOptions(["--dir", str(tmp_path)])
    assert options.config.cache_policy == "fifo"
    options = Options()
    options.parseOptions(["--dir", str(tmp_path), "--cache-policy", "S3FIFO", "--workers", "2"])
    assert options.config.cache_policy == "s3fifo"
    argv = options.config.to_argv()
    assert argv[argv.index("--cache-policy") + 1] == "s3fifo"
    worker = Options()
    worker.parseOptions([*argv, "--inherit-fd", "5:2"])
    assert worker.config.cache_policy == "s3fifo"
    with pytest.raises(ConfigError) as caught:
        Options().parseOptions(["--dir", str(tmp_path), "--cache-policy", "lru"])
    assert str(caught.value) == "filecache: --cache-policy must be one of fifo, s3fifo, sieve, not 'lru'"


@pytest.mark.parametrize(("policy", "kind"), [("fifo", FifoCache), ("s3fifo", S3FifoCache), ("sieve", SieveCache)])
def test_make_service_builds_the_chosen_cache(tmp_path: Path, policy: str, kind: type) -> None:
    """makeService gives the responder the cache --cache-policy names, of --cache-size."""
    from twisted.application.internet import StreamServerEndpointService
    from twisted.application.service import MultiService

    from filecache.daemon.native import FileCacheFactory
    from filecache.daemon.tap import Options, makeService

    options = Options()
    options.parseOptions([
        "--dir", str(tmp_path), "--cache-policy", policy, "--cache-size", "2M",
        "--freshness", "stat", "--port", "tcp:0:interface=127.0.0.1",
    ])
    top = makeService(options, MemoryReactorClock())
    assert isinstance(top, MultiService)
    [listener] = [s for s in top if isinstance(s, StreamServerEndpointService)]
    factory = listener.factory
    assert isinstance(factory, FileCacheFactory)
    cache = factory.responder.cache
    assert type(cache) is kind
    assert cache.capacity == 2 << 20


# The invariants, under random operations.


class PolicyMachine(RuleBasedStateMachine):
    """
    Random inserts, lookups, peeks, discards, reservations and releases,
    checking after every step the invariants every policy keeps: the
    budget, the counters, on_drop reporting each entry once, and lookups
    that never return a stale version.
    """

    kind: type[PolicyCache]
    CAPACITY = 120
    OVERHEAD = 4

    def __init__(self) -> None:
        super().__init__()
        self.cache = self.kind(self.CAPACITY, entry_overhead=self.OVERHEAD)
        self.cache.on_drop = self._dropped
        # Every entry stored and not yet reported dropped, by path.
        self.live: dict[str, CacheEntry] = {}
        self.reservations: list[int] = []
        self.hits = self.misses = self.reports = 0

    def _dropped(self, path: str, e: CacheEntry) -> None:
        assert self.live.get(path) is e, f"{path} reported dropped but not live (or twice)"
        del self.live[path]
        self.reports += 1

    @rule(
        path=st.sampled_from("abcdefghij"),
        size=st.integers(0, 130),
        version=st.sampled_from(["v1", "v2"]),
    )
    def insert(self, path: str, size: int, version: str) -> None:
        e = entry(size, version)
        fits = size + self.OVERHEAD + sum(self.reservations) <= self.CAPACITY
        assert self.cache.insert(path, e) is fits
        if fits:
            assert path not in self.live  # the old entry, if any, was reported
            self.live[path] = e
            assert self.cache.peek(path) is e
        else:
            assert self.cache.peek(path) is None

    @rule(path=st.sampled_from("abcdefghij"), version=st.sampled_from(["v1", "v2"]))
    def lookup(self, path: str, version: str) -> None:
        before = self.cache.peek(path)
        result = self.cache.lookup(path, version)
        if before is not None and before.version == version:
            assert result is before
            self.hits += 1
        else:
            assert result is None
            self.misses += 1
            assert self.cache.peek(path) is None

    @rule(path=st.sampled_from("abcdefghij"))
    def peek(self, path: str) -> None:
        counters = (self.cache.hits, self.cache.misses, self.cache.evictions)
        assert self.cache.peek(path) is self.live.get(path)
        assert (self.cache.hits, self.cache.misses, self.cache.evictions) == counters

    @rule(path=st.sampled_from("abcdefghij"))
    def discard(self, path: str) -> None:
        self.cache.discard(path)
        assert self.cache.peek(path) is None and path not in self.live

    @rule(size=st.integers(0, 80))
    def reserve(self, size: int) -> None:
        fits = size + self.OVERHEAD + sum(self.reservations) <= self.CAPACITY
        assert self.cache.reserve(size) is fits
        if fits:
            self.reservations.append(size + self.OVERHEAD)
            assert self.cache.used <= self.CAPACITY

    @precondition(lambda self: self.reservations)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        cost = self.reservations.pop(data.draw(st.integers(0, len(self.reservations) - 1)))
        self.cache.release(cost - self.OVERHEAD)

    @invariant()
    def keeps_the_budget(self) -> None:
        items = list(self.cache)
        assert len({p for p, _ in items}) == len(items) == len(self.cache)
        assert dict(items) == self.live
        costs = sum(len(e.data) + self.OVERHEAD for _, e in items)
        assert self.cache.used == costs + sum(self.reservations) <= self.cache.capacity
        assert self.cache.size == sum(len(e.data) for _, e in items)
        assert (self.cache.hits, self.cache.misses) == (self.hits, self.misses)
        assert self.cache.evictions == self.reports


class S3FifoMachine(PolicyMachine):
    """PolicyMachine for S3-FIFO, also checking its queues' bookkeeping."""

    kind = S3FifoCache

    @invariant()
    def queues_agree(self) -> None:
        cache = self.cache
        assert isinstance(cache, S3FifoCache)
        small = [n for n in cache._small.values()]
        assert cache.small_used == sum(n.cost for n in small)
        assert not any(n.in_main for n in small)
        assert all(n.in_main for n in cache._main.values())
        assert not set(cache._ghost) & set(cache._nodes)
        assert len(cache._ghost) <= max(len(cache), 64)
        assert all(0 <= n.freq <= 3 for n in cache._nodes.values())


class SieveMachine(PolicyMachine):
    """PolicyMachine for SIEVE, also checking its list's links and hand."""

    kind = SieveCache

    @invariant()
    def list_agrees(self) -> None:
        cache = self.cache
        assert isinstance(cache, SieveCache)
        forward, node = [], cache._tail
        while node is not None:
            forward.append(node)
            node = node.newer
        backward, node = [], cache._head
        while node is not None:
            backward.append(node)
            node = node.older
        assert forward == backward[::-1]
        assert {n.path for n in forward} == set(cache._nodes)
        assert cache._hand is None or cache._hand in forward


_MACHINE_SETTINGS = settings(max_examples=60, stateful_step_count=40, deadline=None)
S3FifoMachine.TestCase.settings = _MACHINE_SETTINGS
SieveMachine.TestCase.settings = _MACHINE_SETTINGS
TestS3FifoMachine = S3FifoMachine.TestCase
TestS3FifoMachine.__doc__ = "S3FifoCache keeps the budget, counters and on_drop reports under random operations."
TestSieveMachine = SieveMachine.TestCase
TestSieveMachine.__doc__ = "SieveCache keeps the budget, counters and on_drop reports under random operations."
