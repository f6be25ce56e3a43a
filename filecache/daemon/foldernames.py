"""
The sorted names of one folder level, read once per version of the folder
and shared, as one compact immutable snapshot, by every folder page listing
that version meanwhile.
"""

from __future__ import annotations

import errno
import heapq
import os
import threading
import time
import weakref
from array import array
from collections.abc import Callable, Iterable, Iterator
from itertools import chain, islice

from filecache.daemon.walk import WALK_STEP, WalkTooLarge

NAMES_STEP = 4 * WALK_STEP
"""Directory entries one L{OpenedFolder.read_names} call looks at (or names
it packs), at most: a name costs far less than a stat, so this step is
larger than the walk's; and each step's names are sorted into a run of
their own, whose transient lists the allocator keeps (at 16,384 a cold
daemon grew by twice as much)."""

SETTLE_NS = 50_000_000
"""A folder changed less than this long before its names are read gets a
reading of its own, never shared: a change within one tick of the file
system's clock (a few ms on Linux) leaves the folder's times as they were,
so the times tell versions apart only once they are older than a tick."""

COARSE_SETTLE_NS = 2_000_000_000
"""The same for a folder whose times are whole seconds: a file system that
keeps times to the second (or two, as FAT) most likely stored them."""

_OFFSET_TYPE = "I" if array("I").itemsize >= 4 else "L"

FolderKey = tuple[int, int, int, int]
"""A version of a folder: C{(st_dev, st_ino, st_mtime_ns, st_ctime_ns)}.  A
folder's modification time changes whenever an entry is added, removed or
renamed, and its change time whenever that one is set."""


class FolderNames:
    """
    The sorted names of one version of a folder, immutable and compact:
    their UTF-8 bytes, each followed by a NUL byte (which no name holds),
    in one buffer, and an array of where each starts, so about 5 bytes per
    name beyond its own bytes (a list of C{str} costs some 60 more).
    Subfolders come first, then files, each sorted by their UTF-8 bytes.
    Made by L{NamePacking}.

    @ivar folders: how many of the names, the first ones, are subfolders.
    @ivar seen: the directory entries looked at to find them (those left out
        included), which the entry limit counts.
    """

    __slots__ = ("__weakref__", "_blob", "_starts", "folders", "seen")

    def __init__(self, blob: bytearray, starts: array[int], folders: int, seen: int) -> None:
        # Name i runs from starts[i] to starts[i + 1] - 1 (its NUL).  The
        # buffer is never changed (a copy into bytes would only cost a
        # second one for a moment).
        self._blob = blob
        self._starts = starts
        self.folders = folders
        self.seen = seen

    @classmethod
    def of(cls, folders: Iterable[str], files: Iterable[str], seen: int = 0) -> FolderNames:
        """The names C{folders} and C{files}, in any order, packed at once (for tests)."""
        runs = [[sorted_run([name.encode("utf-8") for name in names])] for names in (folders, files)]
        packing = NamePacking(runs[0], runs[1], seen)
        while (names := packing.step(1 << 30)) is None:
            pass
        return names

    def __len__(self) -> int:
        return len(self._starts) - 1

    def names(self, start: int, end: int) -> list[str]:
        """The names C{start} to C{end - 1}, decoded."""
        if start >= end:
            return []
        starts = self._starts
        return self._blob[starts[start] : starts[end] - 1].decode("utf-8").split("\0")


def sorted_run(names: list[bytes]) -> bytes:
    """C{names} sorted (in place), each followed by a NUL: one run for L{NamePacking}."""
    names.sort()
    names.append(b"")
    run = b"\0".join(names)
    names.pop()
    return run


def _run_names(run: bytes) -> Iterator[bytes]:
    at = 0
    find = run.find
    while (end := find(b"\0", at)) >= 0:
        yield run[at:end]
        at = end + 1


class NamePacking:
    """
    Sorted runs of names (L{sorted_run}) merged into one L{FolderNames}, a
    bounded step at a time.  No object per name of the whole folder ever
    exists, and the two buffers are made at their final size at once: a
    list of every name, sorted and dropped, and buffers grown a name at a
    time left several MiB behind in each disk thread's malloc arena.
    """

    def __init__(self, folder_runs: list[bytes], file_runs: list[bytes], seen: int) -> None:
        self._folders = sum(run.count(0) for run in folder_runs)
        self._count = self._folders + sum(run.count(0) for run in file_runs)
        self._blob = bytearray(sum(map(len, folder_runs)) + sum(map(len, file_runs)))
        self._starts = array(_OFFSET_TYPE, [0]) * (self._count + 1)
        self._seen = seen
        self._names = chain(heapq.merge(*map(_run_names, folder_runs)), heapq.merge(*map(_run_names, file_runs)))
        self._packed = 0

    def step(self, step: int) -> FolderNames | None:
        """Pack up to C{step} more names; the names once they are all packed."""
        blob = self._blob
        starts = self._starts
        i = self._packed
        at = starts[i]
        for name in islice(self._names, step):
            end = at + len(name)
            blob[at:end] = name
            at = end + 1  # past its NUL, there already
            i += 1
            starts[i] = at
        self._packed = i
        if i < self._count:
            return None
        return FolderNames(blob, starts, self._folders, self._seen)


class NamesReading:
    """
    The reading of one version of a folder's names, a step at a time, by
    whichever page asks next: every page that opens that version while it
    goes on joins it, so the folder is read once.  Each step sorts the
    names it found into a run; once every name is read, the next steps
    merge the runs into L{names} (L{NamePacking}) and drop them.

    Steps run one at a time (a lock); the directory stream is closed at the
    end, on a failure, or when the last page leaves (L{FolderNamesStore}).
    A failed reading stays failed for the pages that joined it (each gets
    an C{OSError}); pages that come later start a new one.

    @ivar names: the names, once they are all read.
    @ivar usable: whether a page may still join it: not failed, not left
        unfinished by all its pages.
    @ivar users: the pages that joined it and have not left (the store
        counts them, under its lock).
    """

    __slots__ = (
        "__weakref__", "_entries", "_error", "_file_runs", "_folder_runs", "_lock", "_packing", "_seen", "names",
        "usable", "users",
    )

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: os._ScandirIterator[str] | None = None
        self._folder_runs: list[bytes] = []
        self._file_runs: list[bytes] = []
        self._packing: NamePacking | None = None
        self._seen = 0
        self._error: OSError | None = None
        self.names: FolderNames | None = None
        self.usable = True
        self.users = 0

    def step(self, fd: int, max_entries: int, step: int) -> FolderNames | None:
        """
        Read the names of up to C{step} more entries, through C{fd} (the
        folder, open) if the reading has not started yet, or pack up to
        C{step} of them once all are read; the names once they are packed.

        @raise WalkTooLarge: once more than C{max_entries} entries are read.
        @raise OSError: if the folder cannot be read (in this step or an
            earlier one, of any page).
        """
        with self._lock:
            names = self.names
            if names is None:
                if self._error is not None:
                    raise OSError(self._error.errno, self._error.strerror)
                if self._seen <= max_entries:
                    names = self._advance(fd, max_entries, step)
            seen = names.seen if names is not None else self._seen
        if seen > max_entries:
            raise WalkTooLarge(f"more than {max_entries} entries")
        return names

    def _advance(self, fd: int, max_entries: int, step: int) -> FolderNames | None:
        if self._packing is not None:
            names = self._packing.step(step)
            if names is not None:
                self.names = names
                self._packing = None
            return names
        folders: list[bytes] = []
        files: list[bytes] = []
        try:
            if self._entries is None:
                self._entries = os.scandir(fd)
            over = self._read_into(self._entries, folders, files, max_entries, step)
        except OSError as e:
            self._error = e
            self.usable = False
            self._close()
            raise
        if folders:
            self._folder_runs.append(sorted_run(folders))
        if files:
            self._file_runs.append(sorted_run(files))
        if over:
            self._close()
            self._packing = NamePacking(self._folder_runs, self._file_runs, self._seen)
            self._folder_runs = []
            self._file_runs = []
        return None

    def _read_into(
        self, entries: os._ScandirIterator[str], folders: list[bytes], files: list[bytes], max_entries: int, step: int
    ) -> bool:
        """Up to C{step} entries' names into C{folders} and C{files}; whether the folder is read to its end."""
        seen = self._seen
        stop = seen + step
        try:
            for entry in entries:
                seen += 1
                name = entry.name
                if name[0] != "." and "\\" not in name:
                    try:
                        encoded = name.encode("utf-8")
                        if entry.is_dir(follow_symlinks=False):
                            folders.append(encoded)
                        elif entry.is_file(follow_symlinks=False) or entry.is_symlink():
                            files.append(encoded)
                    except UnicodeEncodeError:
                        pass  # not UTF-8 on disk: never shared
                    except OSError as e:
                        if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
                            raise
                if seen > max_entries or seen >= stop:
                    return False
        finally:
            self._seen = seen
        return True

    def close(self) -> None:
        """Close the directory stream if the reading is not over: every page has left."""
        with self._lock:
            self._close()
            self._folder_runs = []
            self._file_runs = []
            self._packing = None

    def _close(self) -> None:
        if self._entries is not None:
            self._entries.close()
            self._entries = None


def _settled(st: os.stat_result, now_ns: int) -> bool:
    mtime, ctime = st.st_mtime_ns, st.st_ctime_ns
    coarse = mtime % 1_000_000_000 == 0 and ctime % 1_000_000_000 == 0
    return now_ns - max(mtime, ctime) > (COARSE_SETTLE_NS if coarse else SETTLE_NS)


class FolderNamesStore:
    """
    The readings of folders' names, under way or done, by the version of
    the folder (L{FolderKey}), held weakly: a reading lives as long as a
    page holds it, so any number of pages listing one unchanged folder share
    one reading and one L{FolderNames}, and both go when the last page ends.
    A folder changed since gives another key, so a new reading.  Thread-safe.

    @param now_ns: the wall clock, in ns, to compare with the folder's times.
    """

    def __init__(self, now_ns: Callable[[], int] = time.time_ns) -> None:
        self._lock = threading.Lock()
        self._readings: weakref.WeakValueDictionary[FolderKey, NamesReading] = weakref.WeakValueDictionary()
        self._now_ns = now_ns

    def join(self, fd: int) -> NamesReading:
        """
        The reading of the folder open as C{fd} as it is now, shared with the
        pages that joined it; the caller must L{leave} it.  A folder changed
        too recently for its times to tell versions apart (L{SETTLE_NS}) gets
        a reading of its own.

        @raise OSError: if C{fd} cannot be stated.
        """
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
        settled = _settled(st, self._now_ns())
        with self._lock:
            reading = self._readings.get(key) if settled else None
            if reading is None or not reading.usable:
                reading = NamesReading()
                if settled:
                    self._readings[key] = reading
            reading.users += 1
        return reading

    def leave(self, reading: NamesReading) -> None:
        """A page is done with C{reading}; the last one closes its directory stream."""
        with self._lock:
            reading.users -= 1
            last = reading.users == 0
            if last and reading.names is None:
                # Left unfinished: a page that comes later starts afresh.
                reading.usable = False
        if last:
            reading.close()

    def __len__(self) -> int:
        """How many readings are alive (held by some page)."""
        with self._lock:
            return len(self._readings)


FOLDER_NAMES = FolderNamesStore()
"""The store of the process: the disk threads of every connection share it."""
