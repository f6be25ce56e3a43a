"""
Tests for L{filecache.daemon.cache.FifoCache}: a byte budget, eviction in order of
insertion, and entries checked against the file's version.
"""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from zope.interface.verify import verifyClass, verifyObject

from filecache.daemon.cache import CacheEntry, FifoCache, ICache


def entry(size: int, version: str = "v1", fill: bytes = b"x") -> CacheEntry:
    """A cache entry of C{size} bytes for version C{version}."""
    data = (fill * size)[:size]
    return CacheEntry(data, version, hashlib.sha256(data).hexdigest(), 1_700_000_000)


def paths(cache: FifoCache) -> list[str]:
    """The cached paths, oldest first."""
    return [path for path, _ in cache]


def test_provides_icache() -> None:
    """FifoCache implements every method and attribute ICache declares."""
    assert verifyClass(ICache, FifoCache)
    assert verifyObject(ICache, FifoCache(10, entry_overhead=0))
    assert ICache.providedBy(FifoCache(0, entry_overhead=0))


def test_new_cache_is_empty() -> None:
    """A new cache holds nothing, has its capacity, and all counters at zero."""
    cache = FifoCache(100, entry_overhead=0)
    assert (cache.capacity, cache.size, len(cache)) == (100, 0, 0)
    assert (cache.hits, cache.misses, cache.evictions) == (0, 0, 0)
    assert list(cache) == []


def test_negative_capacity_refused() -> None:
    """A negative byte budget raises ValueError."""
    with pytest.raises(ValueError):
        FifoCache(-1)


def test_insert_and_lookup_hit() -> None:
    """An inserted entry is found by lookup with its version, counting one hit."""
    cache = FifoCache(100, entry_overhead=0)
    e = entry(10, "v1")
    assert cache.insert("a", e) is True
    assert cache.lookup("a", "v1") is e
    assert (cache.hits, cache.misses, cache.evictions) == (1, 0, 0)
    assert cache.size == 10
    assert len(cache) == 1


def test_lookup_missing_counts_miss() -> None:
    """A lookup of an absent path returns None and counts one miss, evicting nothing."""
    cache = FifoCache(100, entry_overhead=0)
    cache.insert("a", entry(10))
    assert cache.lookup("b", "v1") is None
    assert (cache.hits, cache.misses, cache.evictions) == (0, 1, 0)
    assert paths(cache) == ["a"]


def test_fifo_eviction_order() -> None:
    """When room is needed the oldest inserted entries are evicted first, one at a time."""
    cache = FifoCache(30, entry_overhead=0)
    for name in "abc":
        assert cache.insert(name, entry(10))
    assert paths(cache) == ["a", "b", "c"]
    assert cache.insert("d", entry(10))
    assert paths(cache) == ["b", "c", "d"]
    assert cache.evictions == 1
    # Needing 20 bytes evicts the two oldest.
    assert cache.insert("e", entry(20))
    assert paths(cache) == ["d", "e"]
    assert cache.evictions == 3
    assert cache.size == 30


def test_hit_does_not_move_entry() -> None:
    """A hit leaves the entry where it was: FIFO, not LRU."""
    cache = FifoCache(30, entry_overhead=0)
    for name in "abc":
        cache.insert(name, entry(10))
    for _ in range(3):
        assert cache.lookup("a", "v1") is not None
    cache.insert("d", entry(10))
    assert paths(cache) == ["b", "c", "d"]
    assert cache.peek("a") is None
    assert cache.hits == 3


def test_evicts_only_as_many_as_needed() -> None:
    """Eviction stops as soon as the new entry fits, keeping younger entries."""
    cache = FifoCache(30, entry_overhead=0)
    cache.insert("a", entry(5))
    cache.insert("b", entry(5))
    cache.insert("c", entry(15))
    cache.insert("d", entry(10))  # needs 10, has 5 free: evicting a (5) is enough
    assert paths(cache) == ["b", "c", "d"]
    assert cache.size == 30
    assert cache.evictions == 1
    cache.insert("e", entry(11))  # needs 11, has 0 free: evict b (5), c (15)
    assert paths(cache) == ["d", "e"]
    assert cache.size == 21
    assert cache.evictions == 3


def test_oversize_entry_refused_without_evicting() -> None:
    """An entry larger than the capacity is refused (False), and nothing else is evicted."""
    cache = FifoCache(20, entry_overhead=0)
    cache.insert("a", entry(10))
    cache.insert("b", entry(10))
    assert cache.insert("big", entry(21)) is False
    assert paths(cache) == ["a", "b"]
    assert cache.size == 20
    assert cache.evictions == 0
    assert cache.peek("big") is None
    assert not cache.admits(21)


def test_oversize_reinsert_drops_old_entry() -> None:
    """
    Re-inserting a path with content too big to cache drops the stale old
    entry (counted as an eviction) and stores nothing for the path.
    """
    cache = FifoCache(20, entry_overhead=0)
    cache.insert("a", entry(10, "v1"))
    cache.insert("b", entry(5))
    assert cache.insert("a", entry(21, "v2")) is False
    assert paths(cache) == ["b"]
    assert cache.peek("a") is None
    assert cache.size == 5
    assert cache.evictions == 1


def test_entry_exactly_capacity_admitted() -> None:
    """An entry exactly as big as the capacity is stored, evicting everything else."""
    cache = FifoCache(20, entry_overhead=0)
    assert cache.admits(20)
    cache.insert("a", entry(10))
    cache.insert("b", entry(5))
    assert cache.insert("whole", entry(20)) is True
    assert paths(cache) == ["whole"]
    assert cache.size == 20
    assert cache.evictions == 2


def test_zero_capacity_holds_only_empty_files() -> None:
    """A zero budget admits empty files only."""
    cache = FifoCache(0, entry_overhead=0)
    assert cache.admits(0)
    assert not cache.admits(1)
    assert cache.insert("empty", entry(0)) is True
    assert cache.insert("one", entry(1)) is False
    assert paths(cache) == ["empty"]
    assert cache.size == 0


def test_reinsert_moves_to_newest_and_counts_eviction() -> None:
    """Re-inserting an existing path replaces it as the newest entry and counts one eviction."""
    cache = FifoCache(30, entry_overhead=0)
    for name in "abc":
        cache.insert(name, entry(10, "v1"))
    new = entry(8, "v2", b"y")
    assert cache.insert("a", new) is True
    assert paths(cache) == ["b", "c", "a"]
    assert cache.peek("a") is new
    assert cache.size == 28
    assert cache.evictions == 1
    assert len(cache) == 3
    # "a" is now the youngest: the next room is made from "b".
    cache.insert("d", entry(10))
    assert paths(cache) == ["c", "a", "d"]


def test_reinsert_of_full_cache_entry_does_not_evict_others() -> None:
    """Replacing an entry by one of the same size in a full cache evicts only the old version."""
    cache = FifoCache(20, entry_overhead=0)
    cache.insert("a", entry(10))
    cache.insert("b", entry(10))
    cache.insert("b", entry(10, "v2"))
    assert paths(cache) == ["a", "b"]
    assert cache.evictions == 1


def test_stale_lookup_evicts_and_misses() -> None:
    """A lookup with another version evicts the stale entry and counts a miss, not a hit."""
    cache = FifoCache(30, entry_overhead=0)
    cache.insert("a", entry(10, "v1"))
    cache.insert("b", entry(10, "v1"))
    assert cache.lookup("a", "v2") is None
    assert (cache.hits, cache.misses, cache.evictions) == (0, 1, 1)
    assert paths(cache) == ["b"]
    assert cache.size == 10
    # Looking it up again is a plain miss: nothing is left to evict.
    assert cache.lookup("a", "v1") is None
    assert (cache.hits, cache.misses, cache.evictions) == (0, 2, 1)


def test_peek_counts_nothing_and_ignores_version() -> None:
    """peek returns the entry whatever its version, changing no counter and no order."""
    cache = FifoCache(30, entry_overhead=0)
    e = entry(10, "v1")
    cache.insert("a", e)
    cache.insert("b", entry(10))
    assert cache.peek("a") is e
    assert cache.peek("zzz") is None
    assert (cache.hits, cache.misses, cache.evictions) == (0, 0, 0)
    assert paths(cache) == ["a", "b"]


def test_discard() -> None:
    """discard evicts a present entry (counted) and ignores an absent one."""
    cache = FifoCache(30, entry_overhead=0)
    cache.insert("a", entry(10))
    cache.insert("b", entry(7))
    cache.discard("a")
    assert paths(cache) == ["b"]
    assert cache.size == 7
    assert cache.evictions == 1
    cache.discard("a")
    cache.discard("nothing")
    assert cache.evictions == 1
    assert cache.size == 7


def test_iteration_is_a_snapshot() -> None:
    """Iterating yields (path, entry) pairs oldest first, and the cache may change meanwhile."""
    cache = FifoCache(30, entry_overhead=0)
    ea, eb = entry(10), entry(10)
    cache.insert("a", ea)
    cache.insert("b", eb)
    seen = []
    for path, e in cache:
        seen.append((path, e))
        cache.discard(path)
    assert seen == [("a", ea), ("b", eb)]
    assert len(cache) == 0
    assert cache.size == 0


class FifoCacheMachine(RuleBasedStateMachine):
    """
    Random sequences of insert, lookup, peek and discard, checked step by
    step against a plain reference model of a FIFO cache.
    """

    def __init__(self) -> None:
        super().__init__()
        self.cache = FifoCache(64, entry_overhead=0)
        # The model: (path, size, version) oldest first, and the counters.
        self.model: list[tuple[str, int, str]] = []
        self.hits = self.misses = self.evictions = 0

    def _model_drop(self, path: str) -> None:
        self.model = [item for item in self.model if item[0] != path]
        self.evictions += 1

    def _model_find(self, path: str) -> tuple[str, int, str] | None:
        for item in self.model:
            if item[0] == path:
                return item
        return None

    @rule(
        path=st.sampled_from("abcdefgh"),
        size=st.integers(0, 80),
        version=st.sampled_from(["v1", "v2"]),
    )
    def insert(self, path: str, size: int, version: str) -> None:
        if self._model_find(path) is not None:
            self._model_drop(path)
        stored = size <= 64
        if stored:
            while sum(s for _, s, _ in self.model) + size > 64:
                self.model.pop(0)
                self.evictions += 1
            self.model.append((path, size, version))
        e = entry(size, version)
        assert self.cache.insert(path, e) is stored
        if stored:
            assert self.cache.peek(path) is e

    @rule(path=st.sampled_from("abcdefgh"), version=st.sampled_from(["v1", "v2"]))
    def lookup(self, path: str, version: str) -> None:
        found = self._model_find(path)
        result = self.cache.lookup(path, version)
        if found is not None and found[2] == version:
            self.hits += 1
            assert result is not None
            assert result.version == version
            assert len(result.data) == found[1]
        else:
            if found is not None:
                self._model_drop(path)
            self.misses += 1
            assert result is None

    @rule(path=st.sampled_from("abcdefgh"))
    def discard(self, path: str) -> None:
        if self._model_find(path) is not None:
            self._model_drop(path)
        self.cache.discard(path)

    @rule(path=st.sampled_from("abcdefgh"))
    def peek(self, path: str) -> None:
        found = self._model_find(path)
        result = self.cache.peek(path)
        if found is None:
            assert result is None
        else:
            assert result is not None
            assert (len(result.data), result.version) == found[1:]

    @invariant()
    def matches_model(self) -> None:
        items = list(self.cache)
        assert [p for p, _ in items] == [p for p, _, _ in self.model]
        assert [(len(e.data), e.version) for _, e in items] == [(s, v) for _, s, v in self.model]
        assert self.cache.size == sum(len(e.data) for _, e in items) <= self.cache.capacity
        assert len(self.cache) == len(items)
        assert (self.cache.hits, self.cache.misses, self.cache.evictions) == (
            self.hits,
            self.misses,
            self.evictions,
        )


FifoCacheMachine.TestCase.settings = settings(
    max_examples=80, stateful_step_count=30, deadline=None
)
TestFifoCacheMachine = FifoCacheMachine.TestCase
TestFifoCacheMachine.__doc__ = (
    "FifoCache agrees with a reference FIFO model on contents, order, size and counters."
)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 100),
    st.lists(st.tuples(st.sampled_from("abcdefghij"), st.integers(0, 120)), max_size=40),
)
def test_budget_and_order_property(capacity: int, inserts: list[tuple[str, int]]) -> None:
    """
    After any sequence of inserts the stored bytes never exceed the budget,
    equal the sum of the entries, and the survivors appear in the order of
    their last insertion.
    """
    cache = FifoCache(capacity, entry_overhead=0)
    last_insert: dict[str, int] = {}
    for step, (path, size) in enumerate(inserts):
        stored = cache.insert(path, entry(size))
        assert stored == (size <= capacity)
        last_insert.pop(path, None)
        if stored:
            last_insert[path] = step
        assert cache.size == sum(len(e.data) for _, e in cache) <= capacity
    survivors = paths(cache)
    assert set(survivors) <= set(last_insert)
    assert survivors == sorted(survivors, key=last_insert.__getitem__)
    # The survivors are the youngest stored entries: any stored entry younger
    # than the oldest survivor survived too.
    if survivors:
        oldest = last_insert[survivors[0]]
        assert survivors == [
            p for p, s in sorted(last_insert.items(), key=lambda i: i[1]) if s >= oldest
        ]


# The budget counts what an entry really costs (issue 8, items 4 and 5).


def test_zero_budget_caches_nothing_not_even_empty_files() -> None:
    """With the default per-entry overhead, --cache-size 0 keeps no entry at all (item 5)."""
    cache = FifoCache(0)
    assert not cache.admits(0)
    assert cache.insert("empty", entry(0)) is False
    assert (len(cache), cache.used) == (0, 0)


def test_each_entry_is_charged_its_overhead() -> None:
    """64 KiB of one-byte files holds about 64 entries, not 65,536 (item 5)."""
    from filecache.daemon.cache import ENTRY_OVERHEAD

    cache = FifoCache(64 * 1024)
    for n in range(65_536):
        cache.insert(f"f{n}", entry(1))
    assert len(cache) == 64 * 1024 // (1 + ENTRY_OVERHEAD)
    assert cache.used <= cache.capacity
    assert cache.used == len(cache) * (1 + ENTRY_OVERHEAD)


def test_reserve_evicts_before_the_bytes_are_read() -> None:
    """A fill's reservation evicts the oldest entries at once, so old and new never coexist (item 4)."""
    cache = FifoCache(100, entry_overhead=0)
    cache.insert("old", entry(60))
    assert cache.reserve(60) is True
    assert paths(cache) == []
    assert cache.used == 60
    # Another fill that would not fit beside the first is refused, not squeezed in.
    assert cache.reserve(60) is False
    # Entries inserted meanwhile cannot eat into the reservation.
    assert cache.insert("small", entry(30)) is True
    assert cache.insert("big", entry(50)) is False
    assert cache.used == 90
    cache.release(60)
    assert cache.insert("new", entry(60)) is True
    assert paths(cache) == ["small", "new"]
    assert cache.used == cache.size == 90
