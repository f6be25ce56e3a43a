"""
Freshness: whether a cached file on disk is still the one its entry was read
from.  Either one C{stat} per hit, or inotify watches that make a hit cost
one C{ioctl} and fall back to the C{stat} wherever inotify cannot see.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from typing import Any

from twisted.logger import Logger

from filecache.daemon.cache import CacheEntry
from filecache.daemon.inotify import (
    IN_ATTRIB,
    IN_CLOSE_WRITE,
    IN_DELETE,
    IN_DELETE_SELF,
    IN_DONT_FOLLOW,
    IN_IGNORED,
    IN_MODIFY,
    IN_MOVE_SELF,
    IN_MOVED_FROM,
    IN_MOVED_TO,
    IN_ONLYDIR,
    IN_Q_OVERFLOW,
    IN_UNMOUNT,
    Inotify,
    InotifyUnavailable,
)

State = tuple[int, int, int, int]

MODES = ("watch", "stat")

LOCAL_FILE_SYSTEMS = frozenset(
    {
        "ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "jfs", "reiserfs", "bcachefs",
        "zfs", "tmpfs", "ramfs", "overlay", "vfat", "exfat", "ntfs3", "hfsplus",
    }
)  # fmt: skip
"""File systems whose every change goes through this kernel, so inotify sees
it.  On the others (NFS, SMB, FUSE, 9p, ...) a change made elsewhere raises
no event: their hits are checked with a C{stat}."""

MAX_FILE_WATCHES = 65536
"""Cached files watched at most (each watch pins one inode in the kernel);
the rest are checked with a C{stat}."""

MAX_FOLDER_WATCHES = 8192
"""Folders watched at most; files in the rest are checked with a C{stat}."""

# A folder: its entries renamed or deleted (a file or a folder on a cached
# path), their attributes (chmod, utime), and the folder itself going.
_FOLDER_MASK = (
    IN_MOVED_FROM | IN_MOVED_TO | IN_DELETE | IN_ATTRIB | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR | IN_DONT_FOLLOW
)
# A cached file's inode: written through any name it has, its attributes
# (utime, chmod, a new hard link), and the file itself going.
_FILE_MASK = IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_DELETE_SELF | IN_MOVE_SELF | IN_DONT_FOLLOW
_GONE = IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED | IN_UNMOUNT
_UNKNOWN = object()


def _state_of(st: os.stat_result) -> State:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def holds_state(st: os.stat_result, state: State | None) -> bool:
    """Whether C{st} is a regular file in the state C{state} (L{FileStat.state})."""
    return stat.S_ISREG(st.st_mode) and _state_of(st) == state


class StatFreshness:
    """Every hit checked with one C{stat} of its path: right on any file system."""

    mode = "stat"

    def __init__(self, stat_path: Callable[[str], os.stat_result] = os.stat) -> None:
        self._stat = stat_path
        self.stats = 0

    def holds(self, entry: CacheEntry) -> bool:
        """Whether C{entry}'s file on disk is still the one it was read from."""
        self.stats += 1
        try:
            st = self._stat(entry.source)
        except OSError:
            return False
        return holds_state(st, entry.state)

    def forget(self, path: str, entry: CacheEntry) -> None:
        """C{entry} left the cache."""

    def figures(self) -> list[tuple[str, int]]:
        return [
            ("freshness_stats", self.stats),
            ("freshness_watched_files", 0),
            ("freshness_watched_folders", 0),
            ("freshness_overflows", 0),
        ]

    def close(self) -> None:
        pass


class WatchFreshness:
    """
    Hits checked by inotify.  The first check of an entry watches its file's
    inode and every folder from the shared root down to it, then does one
    C{stat}: if the file is still the one read, the entry is marked fresh.
    Any event that may concern it afterwards (a write, a rename or delete of
    the file or of a folder on its path, a change of attributes, lost
    events) takes the mark away, and the next check does a C{stat} again.
    A check drains whatever the kernel has queued first, so every change
    made before a request arrived is seen before its answer.

    Marked only where inotify sees every change: a path with no symlink, a
    file with one link on the shared root's own file system, within the
    watch limits.  Everything else is checked with a C{stat} on every hit.
    """

    mode = "watch"
    _log = Logger()

    def __init__(
        self,
        root: str,
        *,
        stat_path: Callable[[str], os.stat_result] = os.stat,
        inotify: Inotify | None = None,
        max_files: int = MAX_FILE_WATCHES,
        max_folders: int = MAX_FOLDER_WATCHES,
    ) -> None:
        self._root = root.rstrip(os.sep) or os.sep
        self._prefix = self._root.rstrip(os.sep) + os.sep
        self._device = os.stat(self._root).st_dev
        self._stat = stat_path
        self._inotify = inotify if inotify is not None else Inotify()
        self._max_files = max_files
        self._max_folders = max_folders
        self._fresh: dict[str, State] = {}
        self._stat_only: set[str] = set()
        self._file_wd: dict[str, int] = {}
        self._wd_file: dict[int, str] = {}
        self._folder_wd: dict[str, int] = {}
        self._wd_folder: dict[int, str] = {}
        self.stats = 0
        self.overflows = 0

    # Checking

    def holds(self, entry: CacheEntry) -> bool:
        """Whether C{entry}'s file on disk is still the one it was read from."""
        if self._inotify.pending():
            self.drain()
        if self._fresh.get(entry.source, _UNKNOWN) is entry.state:
            return True
        return self._check(entry)

    def _check(self, entry: CacheEntry) -> bool:
        source, state = entry.source, entry.state
        # The watches first, then the stat: a change before the stat shows
        # in it, and one after raises an event.
        watched = state is not None and self._watch(source)
        self.stats += 1
        try:
            st = self._stat(source)
        except OSError:
            return False
        if not holds_state(st, state):
            return False
        if watched:
            if st.st_nlink == 1 and st.st_dev == self._device:
                assert state is not None
                self._fresh[source] = state
            else:
                # A second link can be written to from a folder we do not
                # watch (the inode watch would see it, but a link added
                # before it was in place raised nothing), or another file
                # system is mounted below the root.
                self._unwatch_file(source)
                self._stat_only.add(source)
        return True

    def _watch(self, source: str) -> bool:
        """Watches on C{source} and the folders above it; C{False} if they cannot be had."""
        if source in self._file_wd:
            return True
        if source in self._stat_only or not source.startswith(self._prefix):
            return False
        if os.path.realpath(source) != source or len(self._file_wd) >= self._max_files:
            self._mark_stat_only(source)
            return False
        relative = source[len(self._prefix) :].split(os.sep)[:-1]
        folder = self._root
        try:
            for name in ["", *relative]:
                if name:
                    folder = os.path.join(folder, name)
                if folder not in self._folder_wd:
                    if len(self._folder_wd) >= self._max_folders:
                        self._mark_stat_only(source)
                        return False
                    wd = self._inotify.add(folder, _FOLDER_MASK)
                    self._folder_wd[folder] = wd
                    self._wd_folder[wd] = folder
            wd = self._inotify.add(source, _FILE_MASK)
        except OSError as e:
            # ENOSPC: the user's watch limit; ENOENT, ENOTDIR: gone or
            # swapped for a symlink since realpath looked.
            self._log.debug("not watching {source}: {error}", source=source, error=e)
            self._mark_stat_only(source)
            return False
        if self._wd_file.get(wd, source) != source:
            # The same inode under another name: a second link.
            self._mark_stat_only(source)
            return False
        self._file_wd[source] = wd
        self._wd_file[wd] = source
        return True

    def _mark_stat_only(self, source: str) -> None:
        if len(self._stat_only) >= 4 * self._max_files:
            self._stat_only.clear()  # forgotten entries' marks; they come back as checked
        self._stat_only.add(source)

    # Events

    def drain(self) -> None:
        """Take away the mark of every entry that what the kernel has queued may concern."""
        fresh = self._fresh
        for wd, mask, name in self._inotify.events():
            source = self._wd_file.get(wd)
            if source is not None:
                fresh.pop(source, None)
                if mask & _GONE:
                    self._unwatch_file(source, removed=bool(mask & IN_IGNORED))
                continue
            folder = self._wd_folder.get(wd)
            if folder is not None:
                if name:
                    child = os.path.join(folder, os.fsdecode(name))
                    fresh.pop(child, None)
                    if child in self._folder_wd:
                        self._unwatch_under(child)
                if mask & _GONE:
                    self._unwatch_under(folder)
                elif not name and mask & IN_ATTRIB:
                    self._unmark_under(folder)
            elif wd == -1 and mask & IN_Q_OVERFLOW:
                self.overflows += 1
                fresh.clear()

    def _unmark_under(self, folder: str) -> None:
        if folder == self._root:
            self._fresh.clear()
            return
        below = folder + os.sep
        for source in [s for s in self._fresh if s.startswith(below)]:
            del self._fresh[source]

    def _unwatch_under(self, folder: str) -> None:
        """Forget every watch at or below C{folder}: the next checks watch by path again."""
        self._unmark_under(folder)
        below = folder + os.sep
        for source in [s for s in self._file_wd if s.startswith(below) or folder == self._root]:
            self._unwatch_file(source)
        for path in [p for p in self._folder_wd if p == folder or p.startswith(below) or folder == self._root]:
            wd = self._folder_wd.pop(path)
            del self._wd_folder[wd]
            self._remove(wd)

    def _unwatch_file(self, source: str, removed: bool = False) -> None:
        self._fresh.pop(source, None)
        wd = self._file_wd.pop(source, None)
        if wd is None:
            return
        del self._wd_file[wd]
        if not removed:
            self._remove(wd)

    def _remove(self, wd: int) -> None:
        try:
            self._inotify.remove(wd)
        except OSError:
            pass  # gone already

    # The cache's side

    def forget(self, path: str, entry: CacheEntry) -> None:
        """C{entry} left the cache: its file's watch goes too (folders' stay)."""
        self._stat_only.discard(entry.source)
        self._unwatch_file(entry.source)

    def figures(self) -> list[tuple[str, int]]:
        return [
            ("freshness_stats", self.stats),
            ("freshness_watched_files", len(self._file_wd)),
            ("freshness_watched_folders", len(self._folder_wd)),
            ("freshness_overflows", self.overflows),
        ]

    def close(self) -> None:
        self._inotify.close()


Freshness = StatFreshness | WatchFreshness


def file_system_of(path: str, mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """
    The type of the file system C{path} is on, from the mount table (the
    mount with the same device; C{None} if it cannot be told).
    """
    try:
        device = os.stat(path).st_dev
        with open(mountinfo, encoding="utf-8", errors="replace") as table:
            lines = table.read().splitlines()
    except OSError:
        return None
    wanted = f"{os.major(device)}:{os.minor(device)}"
    for line in lines:
        # id parent major:minor root mount-point options... - type source ...
        fields = line.split()
        if len(fields) > 2 and fields[2] == wanted and " - " in line:
            return line.split(" - ", 1)[1].split()[0]
    return None


def choose_freshness(mode: str, root: str, opener: Callable[[], Any] = Inotify) -> tuple[Freshness, str]:
    """
    The freshness check for the shared folder C{root} in C{mode}, and why
    it is the one it is (for the start-up log line).  C{watch} falls back
    to C{stat} where inotify cannot see every change.
    """
    if mode == "stat":
        return StatFreshness(), "every hit checked with a stat (--freshness stat)"
    kind = file_system_of(root)
    if kind not in LOCAL_FILE_SYSTEMS:
        return StatFreshness(), f"every hit checked with a stat: inotify cannot see changes on {kind or 'this'} file system"
    try:
        inotify = opener()
    except InotifyUnavailable as e:
        return StatFreshness(), f"every hit checked with a stat: no inotify ({e})"
    return WatchFreshness(root, inotify=inotify), f"hits checked by inotify ({kind})"
