"""
Freshness checks of cache hits: inotify watches that spare the stat of a
hit, and every change they must still see (docs/operations.md).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from filecache.daemon.cache import CacheEntry, FifoCache
from filecache.daemon.folder import FileStat
from filecache.daemon.freshness import (
    StatFreshness,
    WatchFreshness,
    choose_freshness,
    file_system_of,
)
from filecache.daemon.inotify import IN_Q_OVERFLOW, Inotify, InotifyUnavailable


class CountingStat:
    """os.stat, counting its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, path: str) -> os.stat_result:
        self.calls += 1
        return os.stat(path)


def entry_of(path: Path) -> CacheEntry:
    data = path.read_bytes()
    st = FileStat.of(os.stat(path))
    return CacheEntry(data, st.version, "-", st.mtime, str(path), st.state)


@pytest.fixture
def share(tmp_path: Path) -> Path:
    root = tmp_path / "share"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "f.bin").write_bytes(b"one")
    (root / "top.txt").write_bytes(b"top")
    return root.resolve()


@pytest.fixture
def watch(share: Path) -> Iterator[tuple[WatchFreshness, CountingStat]]:
    counting = CountingStat()
    freshness = WatchFreshness(str(share), stat_path=counting)
    yield freshness, counting
    freshness.close()


def test_a_watched_hit_costs_no_stat_after_the_first(watch: tuple[WatchFreshness, CountingStat], share: Path) -> None:
    """The first check stats and watches; the next ones are answered by the watches alone."""
    freshness, counting = watch
    entry = entry_of(share / "a" / "b" / "f.bin")
    assert freshness.holds(entry)
    assert counting.calls == 1
    for _ in range(100):
        assert freshness.holds(entry)
    assert counting.calls == 1
    figures = dict(freshness.figures())
    assert figures["freshness_watched_files"] == 1
    assert figures["freshness_watched_folders"] == 3  # share, a, a/b


def test_stat_freshness_stats_every_hit(share: Path) -> None:
    """--freshness stat: one stat per check, and a changed file is seen."""
    counting = CountingStat()
    freshness = StatFreshness(counting)
    path = share / "top.txt"
    entry = entry_of(path)
    assert freshness.holds(entry) and freshness.holds(entry)
    assert counting.calls == 2
    path.write_bytes(b"TOP")
    assert not freshness.holds(entry)


def _rewrite(path: Path, share: Path) -> None:
    path.write_bytes(b"two")


def _rewrite_same_size_times_put_back(path: Path, share: Path) -> None:
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.write(b"ONE")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _replace_by_rename(path: Path, share: Path) -> None:
    other = path.with_name("new")
    other.write_bytes(b"two")
    os.replace(other, path)


def _delete(path: Path, share: Path) -> None:
    path.unlink()


def _swap_parent_folder(path: Path, share: Path) -> None:
    # The folder on the path renamed away, another put in its place.
    os.rename(share / "a", share / "old")
    (share / "a" / "b").mkdir(parents=True)
    (share / "a" / "b" / "f.bin").write_bytes(b"two")


def _parent_becomes_a_symlink(path: Path, share: Path) -> None:
    outside = share.parent / "outside"
    (outside / "b").mkdir(parents=True)
    (outside / "b" / "f.bin").write_bytes(b"two")
    shutil.rmtree(share / "a")
    os.symlink(outside, share / "a")


def _chmod(path: Path, share: Path) -> None:
    path.chmod(0o600)


def _hard_link_then_write_through_it(path: Path, share: Path) -> None:
    elsewhere = share.parent / "elsewhere"
    elsewhere.mkdir()
    os.link(path, elsewhere / "link")
    with open(elsewhere / "link", "r+b") as f:
        f.write(b"TWO")


@pytest.mark.parametrize(
    "change",
    [
        _rewrite,
        _rewrite_same_size_times_put_back,
        _replace_by_rename,
        _delete,
        _swap_parent_folder,
        _parent_becomes_a_symlink,
        _chmod,
        _hard_link_then_write_through_it,
    ],
)
def test_every_change_after_the_watch_is_seen(
    watch: tuple[WatchFreshness, CountingStat], share: Path, change: object
) -> None:
    """
    A file watched and found fresh, then changed in one of the ways a file
    can change: the next check no longer trusts the mark, stats the path,
    and (the file being another now) says the entry does not hold.
    """
    freshness, counting = watch
    path = share / "a" / "b" / "f.bin"
    entry = entry_of(path)
    assert freshness.holds(entry) and freshness.holds(entry)
    assert counting.calls == 1
    change(path, share)  # type: ignore[operator]
    assert not freshness.holds(entry)
    assert counting.calls == 2


def test_an_event_that_changes_nothing_costs_one_stat_then_watching_resumes(
    watch: tuple[WatchFreshness, CountingStat], share: Path
) -> None:
    """A file opened for writing and closed unchanged: one stat again, then no more."""
    freshness, counting = watch
    path = share / "a" / "b" / "f.bin"
    entry = entry_of(path)
    assert freshness.holds(entry)
    with open(path, "ab"):
        pass
    assert freshness.holds(entry) and freshness.holds(entry)
    assert counting.calls == 2


def test_a_new_entry_for_the_same_file_is_checked_once(watch: tuple[WatchFreshness, CountingStat], share: Path) -> None:
    """The mark belongs to one entry: a new entry (new version) is stat'ed on its first check."""
    freshness, counting = watch
    path = share / "top.txt"
    old = entry_of(path)
    assert freshness.holds(old)
    path.write_bytes(b"new top")
    new = entry_of(path)
    assert not freshness.holds(old)
    assert freshness.holds(new) and freshness.holds(new)
    assert counting.calls == 3


def test_a_symlinked_path_is_stat_checked_every_time(watch: tuple[WatchFreshness, CountingStat], share: Path) -> None:
    """A path through a symlink: its target's folder is not watched, so every hit stats."""
    freshness, counting = watch
    os.symlink(share / "a", share / "via")
    entry = entry_of(share / "via" / "b" / "f.bin")
    assert freshness.holds(entry) and freshness.holds(entry) and freshness.holds(entry)
    assert counting.calls == 3
    (share / "a" / "b" / "f.bin").write_bytes(b"changed")
    assert not freshness.holds(entry)


def test_a_file_with_two_links_is_stat_checked_every_time(watch: tuple[WatchFreshness, CountingStat], share: Path) -> None:
    """A second link made before the watch: every hit stats, and a write through it is seen."""
    freshness, counting = watch
    path = share / "top.txt"
    os.link(path, share.parent / "second")
    entry = entry_of(path)
    assert freshness.holds(entry) and freshness.holds(entry)
    assert counting.calls == 2
    (share.parent / "second").write_bytes(b"TOP")
    assert not freshness.holds(entry)


def test_lost_events_distrust_every_mark(watch: tuple[WatchFreshness, CountingStat], share: Path) -> None:
    """An overflow of the kernel's queue: every entry is stat'ed again on its next check."""
    freshness, counting = watch
    entries = [entry_of(share / "top.txt"), entry_of(share / "a" / "b" / "f.bin")]
    assert all(freshness.holds(e) for e in entries)
    assert counting.calls == 2

    class Overflowed:
        """The queue as the kernel leaves it after an overflow."""

        fd = freshness._inotify.fd

        def pending(self) -> int:
            return 16

        def events(self) -> Iterator[tuple[int, int, bytes]]:
            yield -1, IN_Q_OVERFLOW, b""

    real = freshness._inotify
    freshness._inotify = Overflowed()  # type: ignore[assignment]
    try:
        freshness.drain()
    finally:
        freshness._inotify = real
    assert all(freshness.holds(e) for e in entries)
    assert counting.calls == 4
    assert dict(freshness.figures())["freshness_overflows"] == 1


def test_past_the_watch_limit_hits_are_stat_checked(share: Path) -> None:
    """With no watch left, the file is checked with a stat on every hit, and still right."""
    counting = CountingStat()
    freshness = WatchFreshness(str(share), stat_path=counting, max_files=1)
    try:
        first, second = entry_of(share / "top.txt"), entry_of(share / "a" / "b" / "f.bin")
        assert freshness.holds(first) and freshness.holds(first)
        assert counting.calls == 1
        assert freshness.holds(second) and freshness.holds(second)
        assert counting.calls == 3
        (share / "a" / "b" / "f.bin").write_bytes(b"changed")
        assert not freshness.holds(second)
    finally:
        freshness.close()


def test_an_evicted_entry_gives_its_watch_back(share: Path) -> None:
    """The cache's on_drop: an entry that leaves the cache takes its file's watch with it."""
    freshness = WatchFreshness(str(share))
    try:
        cache = FifoCache(1500, entry_overhead=1000)
        cache.on_drop = freshness.forget
        first, second = entry_of(share / "top.txt"), entry_of(share / "a" / "b" / "f.bin")
        cache.insert("top.txt", first)
        assert freshness.holds(first)
        assert dict(freshness.figures())["freshness_watched_files"] == 1
        cache.insert("a/b/f.bin", second)  # no room for both: top.txt goes
        assert len(cache) == 1
        assert dict(freshness.figures())["freshness_watched_files"] == 0
    finally:
        freshness.close()


def test_the_shared_folder_renamed_drops_every_watch(watch: tuple[WatchFreshness, CountingStat], share: Path) -> None:
    """The shared root itself moved away: no entry is trusted, the stat finds nothing."""
    freshness, _counting = watch
    entry = entry_of(share / "a" / "b" / "f.bin")
    assert freshness.holds(entry)
    os.rename(share, share.with_name("moved"))
    assert not freshness.holds(entry)
    assert dict(freshness.figures())["freshness_watched_folders"] == 0


def test_mount_table_names_the_file_system(tmp_path: Path) -> None:
    """The type comes from the mount with the path's device; a table without it says None."""
    device = os.stat(tmp_path).st_dev
    table = tmp_path / "mountinfo"
    table.write_text(
        f"22 1 0:99 / /proc rw - proc proc rw\n"
        f"27 1 {os.major(device)}:{os.minor(device)} / / rw,relatime - nfs4 server:/x rw\n"
    )
    assert file_system_of(str(tmp_path), str(table)) == "nfs4"
    table.write_text("22 1 0:99 / /proc rw - proc proc rw\n")
    assert file_system_of(str(tmp_path), str(table)) is None


def test_choosing_falls_back_to_stat_without_inotify(share: Path) -> None:
    """--freshness watch where inotify cannot be had: the stat check, and the reason given."""

    def no_inotify() -> Inotify:
        raise InotifyUnavailable("too many instances")

    chosen, why = choose_freshness("watch", str(share), no_inotify)
    if isinstance(chosen, WatchFreshness):  # pragma: no cover - the opener is ours
        chosen.close()
    kind = file_system_of(str(share))
    assert isinstance(chosen, StatFreshness)
    assert ("no inotify" in why) or (kind is not None and kind in why)
    chosen, why = choose_freshness("stat", str(share))
    assert isinstance(chosen, StatFreshness) and "--freshness stat" in why


def test_the_option_takes_watch_or_stat_and_goes_to_workers(tmp_path: Path) -> None:
    """--freshness: watch by default, stat when asked, anything else refused; workers get it too."""
    from filecache.daemon.startup import ConfigError
    from filecache.daemon.tap import Options

    options = Options()
    options.parseOptions(["--dir", str(tmp_path)])
    assert options.config.freshness == "watch"
    options = Options()
    options.parseOptions(["--dir", str(tmp_path), "--freshness", "STAT"])
    assert options.config.freshness == "stat"
    assert options.config.to_argv()[options.config.to_argv().index("--freshness") + 1] == "stat"
    with pytest.raises(ConfigError) as caught:
        Options().parseOptions(["--dir", str(tmp_path), "--freshness", "inotify"])
    assert str(caught.value) == "filecache: --freshness must be one of watch, stat, not 'inotify'"
