"""
Walks of the shared folder by directory descriptors, a bounded step at a
time, for LIST (and their bounds and descriptor helpers, which folder pages
share): never out of the tree, never for ever, never all at once.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Callable
from typing import TypeVar

MAX_WALK_ENTRIES = 1_000_000
"""The most directory entries one walk looks at before it gives up."""

MAX_WALK_DEPTH = 64
"""The deepest folder level one walk goes into before it gives up."""

WALK_STEP = 1024
"""Directory entries one L{FolderWalk.next_rows} call looks at, at most."""

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_O_PATH = getattr(os, "O_PATH", 0)

R = TypeVar("R")


class WalkTooLarge(Exception):
    """The folder has more entries or deeper folders than one walk may look at."""


class _Level:
    """One folder being read: its descriptor, its entries, its wire prefix."""

    __slots__ = ("entries", "fd", "prefix")

    def __init__(self, fd: int, prefix: bytes) -> None:
        self.fd = fd
        self.prefix = prefix
        self.entries = os.scandir(fd)

    def close(self) -> None:
        self.entries.close()
        os.close(self.fd)


class FolderWalk:
    """
    A walk of the shared folder, a bounded step at a time, by descriptors.

    Every folder is opened relative to its parent's descriptor with
    C{O_NOFOLLOW}, so a folder swapped for a symlink while the walk runs is
    refused rather than followed out of the tree.  Symlinks to folders are
    not followed at all (each real folder is listed once, at its real
    place); symlinks to regular files are listed when their target is in
    the folder.  Memory is one descriptor and one directory buffer per level
    being read, whatever the size of the folder.

    One thread at a time calls L{next_rows}; L{close} may be called from
    another thread meanwhile: the descriptors are then closed as soon as
    the step under way returns, by whichever thread is last.
    """

    def __init__(
        self,
        root: str,
        inside: Callable[[str], bool],
        proc_fds: bool,
        max_entries: int = MAX_WALK_ENTRIES,
        max_depth: int = MAX_WALK_DEPTH,
    ) -> None:
        self._lock = threading.Lock()
        self._closing = False
        self._root = root
        self._inside = inside
        self._proc_fds = proc_fds
        self._max_entries = max_entries
        self._max_depth = max_depth
        self._seen = 0
        self._stack: list[_Level] = []
        self._visited: set[tuple[int, int]] = set()
        self._started = False

    def next_rows(self, row: Callable[[bytes, os.stat_result], R], step: int = WALK_STEP) -> list[R] | None:
        """
        C{row(utf8_path, stat)} for the next shared files, looking at no more
        than C{step} directory entries; C{None} once the walk is over.  The
        order is the walk's: no sorting.

        @raise WalkTooLarge: past the walk's bounds.
        @raise OSError: if the shared folder itself cannot be read, or
            descriptors run out.
        """
        with self._lock:
            rows = self._step(row, step)
        if self._closing:
            self.close()
        return rows

    def _step(self, row: Callable[[bytes, os.stat_result], R], step: int) -> list[R] | None:
        if self._closing:
            return None
        if not self._started:
            self._started = True
            fd = os.open(self._root, _DIR_FLAGS)
            self._push(fd, b"")
        found: list[R] = []
        append = found.append
        is_reg = stat.S_ISREG
        budget = step
        stack = self._stack
        while stack and budget > 0:
            level = stack[-1]
            prefix = level.prefix
            if self._seen + budget > self._max_entries:
                budget = self._max_entries - self._seen + 1
            seen = 0
            for entry in level.entries:
                seen += 1
                name = entry.name
                # The common case inline (a plain, visible, regular file):
                # the type comes from the directory entry, one stat follows.
                if name[0] != "." and "\\" not in name and entry.is_file(follow_symlinks=False):
                    try:
                        encoded = prefix + name.encode("utf-8")
                        st = entry.stat(follow_symlinks=False)
                    except UnicodeEncodeError:
                        pass
                    except OSError as e:
                        if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
                            raise
                    else:
                        if is_reg(st.st_mode):
                            append(row(encoded, st))
                else:
                    self._visit(level, entry, row, found)
                if seen >= budget or stack[-1] is not level:
                    break
            else:
                stack.pop().close()
            budget -= seen
            self._seen += seen
            if self._seen > self._max_entries:
                raise WalkTooLarge(f"more than {self._max_entries} entries")
        return found if (found or stack) else None

    def _visit(
        self, level: _Level, entry: os.DirEntry[str], row: Callable[[bytes, os.stat_result], R], found: list[R]
    ) -> None:
        name = entry.name
        if name[0] == "." or "\\" in name:
            return
        try:
            encoded = level.prefix + name.encode("utf-8")
        except UnicodeEncodeError:
            return
        try:
            if entry.is_symlink():
                st = self._link_target(level.fd, name)
                if st is not None:
                    found.append(row(encoded, st))
                return
            if entry.is_dir(follow_symlinks=False):
                self._descend(level.fd, name, encoded)
                return
            st = entry.stat(follow_symlinks=False)
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
                raise
            return
        if stat.S_ISREG(st.st_mode):
            found.append(row(encoded, st))

    def _descend(self, parent: int, name: str, encoded: bytes) -> None:
        if len(self._stack) >= self._max_depth:
            raise WalkTooLarge(f"folders nested deeper than {self._max_depth} levels")
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
        try:
            key = _dir_key(os.fstat(fd))
        except OSError:
            os.close(fd)
            raise
        if key in self._visited:
            # The same folder again (a bind mount of an ancestor, say).
            os.close(fd)
            return
        self._push(fd, encoded + b"/")

    def _push(self, fd: int, prefix: bytes) -> None:
        try:
            self._visited.add(_dir_key(os.fstat(fd)))
            self._stack.append(_Level(fd, prefix))
        except OSError:
            os.close(fd)
            raise

    def _link_target(self, parent: int, name: str) -> os.stat_result | None:
        """The state of a symlink's target if it is a shared regular file."""
        return link_target(parent, name, self._inside, self._proc_fds)

    def close(self) -> None:
        """Close every descriptor the walk holds; it ends here."""
        self._closing = True
        if self._lock.acquire(blocking=False):
            try:
                while self._stack:
                    self._stack.pop().close()
                self._started = True
            finally:
                self._lock.release()


def _dir_key(st: os.stat_result) -> tuple[int, int]:
    return (st.st_dev, st.st_ino)


def link_target(
    parent: int, name: str, inside: Callable[[str], bool], proc_fds: bool
) -> os.stat_result | None:
    """
    The state of the target of the symlink C{name} in the folder C{parent}
    if it is a regular file inside the shared folder (C{inside} of its real
    path); C{None} otherwise.  The target is opened once, with C{O_PATH}, and
    checked by its descriptor, so no swap after the check can fool it.
    """
    if not (_O_PATH and proc_fds):
        # Without O_PATH and /proc: resolve by name (racy, not Linux).
        return None
    fd = os.open(name, _O_PATH | os.O_CLOEXEC, dir_fd=parent)
    try:
        real = os.readlink(f"/proc/self/fd/{fd}")
        if not inside(real):
            return None
        st = os.fstat(fd)
    finally:
        os.close(fd)
    return st if stat.S_ISREG(st.st_mode) else None


def open_folder_fd(root: str, parts: tuple[str, ...]) -> int:
    """
    A descriptor of the folder C{root/parts...}, opened one component at a
    time from C{root}'s descriptor with C{O_DIRECTORY | O_NOFOLLOW}: a symlink
    on the way (to a folder or not) is refused, never followed.  The caller
    has checked C{parts} (L{filecache.wire.split_path}).

    @raise OSError: C{ELOOP} for a symlink, C{ENOTDIR} for a file, and so on.
    """
    fd = os.open(root, _DIR_FLAGS)
    try:
        for part in parts:
            child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd

