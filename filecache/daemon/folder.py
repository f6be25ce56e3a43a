"""
The shared folder: turns a wire path into an open regular file confined to
the folder, and lists every file that may be shared.  Never writes.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from filecache.wire import PathError, split_path

# Errors that mean "there is no shareable file by that name"; every other
# OSError means the file exists but cannot be served right now.
_ABSENT = frozenset(
    {errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG, errno.EINVAL, errno.ENXIO}
)


SETTLE = 0.05
"""Seconds after a file's last change before one read of it is trusted: a
write stamps the change time before it copies its bytes, so a write still
copying (its writer preempted, say) cannot be seen in the file's state."""

MAX_WALK_ENTRIES = 1_000_000
"""The most directory entries one walk looks at before it gives up."""

MAX_WALK_DEPTH = 64
"""The deepest folder level one walk goes into before it gives up."""

WALK_STEP = 1024
"""Directory entries one L{FolderWalk.next_rows} call looks at, at most."""

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_O_PATH = getattr(os, "O_PATH", 0)

class NotShared(Exception):
    """The path names nothing that is shared: absent, hidden, outside, or not a regular file."""


class Unreadable(Exception):
    """The file is shared but cannot be read now (permissions, I/O, descriptors)."""

    def __init__(self, path: str, error: OSError) -> None:
        super().__init__(f"{path}: {error.strerror or error}")
        self.error = error


def version_token(st: os.stat_result) -> str:
    """
    The version token of a file in the state C{st}: inode, size, and the
    modification and change times in nanoseconds.  The change time moves on
    every write and every C{utime}, and no program can set it, so a file
    rewritten with its modification time put back (C{cp -p}, C{rsync -t},
    C{touch -r}) still gets a new token.
    """
    return f"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}-{st.st_ctime_ns:x}"


@dataclass(frozen=True)
class FileStat:
    """What filecache needs from a file's C{stat}."""

    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileStat:
        return cls(st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    @property
    def version(self) -> str:
        """The opaque token that changes whenever the content may have changed."""
        return f"{self.ino:x}-{self.size:x}-{self.mtime_ns:x}-{self.ctime_ns:x}"

    @property
    def mtime(self) -> int:
        return self.mtime_ns // 1_000_000_000


@dataclass(frozen=True)
class OpenedFile:
    """
    A shared file opened for reading.  The owner must call L{close}.

    @ivar path: the wire path it was opened by.
    @ivar real: its resolved path on disk.
    @ivar fd: the open descriptor.
    @ivar stat: its state when opened.
    @ivar source: the path it was opened by, on disk, before symlinks were
        resolved: a later C{stat} of it tells whether it still leads here.
    """

    path: str
    real: str
    fd: int
    stat: FileStat
    source: str = ""

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


_HIDDEN = os.sep + "."


def _has_hidden_part(relative: str) -> bool:
    return relative.startswith(".") or _HIDDEN in relative


def _open_error(path: str, error: OSError) -> Exception:
    """NotShared for errors that mean no such file, Unreadable for the rest."""
    if error.errno in _ABSENT:
        return NotShared(path)
    return Unreadable(path, error)


class SharedFolder:
    """
    The folder whose regular files are shared.

    A path is resolved with every symlink followed, and must still lead to a
    regular file inside the folder with no component that starts with C{.}.
    """

    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(root)
        if not os.path.isdir(self.root):
            raise NotADirectoryError(root)
        self._prefix = self.root.rstrip(os.sep) + os.sep
        self._proc_fds = os.path.isdir("/proc/self/fd")

    def _inside(self, real: str) -> bool:
        if not real.startswith(self._prefix):
            return False
        return not _has_hidden_part(real[len(self._prefix) :])

    def resolve(self, path: str) -> str:
        """
        The real path that the wire path C{path} names, if it is inside.

        @raise NotShared: if it names nothing that may be shared.
        """
        try:
            parts = split_path(path)
        except PathError:
            raise NotShared(path) from None
        real = os.path.realpath(os.path.join(self.root, *parts))
        if not self._inside(real):
            raise NotShared(path)
        return real

    def disk_path(self, path: str) -> str:
        """
        The path on disk that the wire path C{path} names, before symlinks
        are resolved.

        @raise NotShared: if C{path} is not a plain relative path.
        """
        try:
            parts = split_path(path)
        except PathError:
            raise NotShared(path) from None
        return os.path.join(self.root, *parts)

    def open(self, path: str) -> OpenedFile:
        """
        Open the shared regular file C{path}.

        @raise NotShared: if it names nothing that may be shared.
        @raise Unreadable: if it is shared but cannot be opened now.
        """
        if not self._proc_fds:
            # Without /proc: resolve first, then refuse a symlink put in since.
            real = self.resolve(path)
            fd = self._open_fd(path, real, os.O_NOFOLLOW)
            return self._checked(path, fd, real, self.disk_path(path))
        joined = self.disk_path(path)
        try:
            # Only regular files are opened: opening a device can have
            # effects of its own, and a FIFO would wait for a writer.
            if not stat.S_ISREG(os.stat(joined).st_mode):
                raise NotShared(path)
        except OSError as e:
            raise _open_error(path, e) from None
        return self._checked(path, self._open_fd(path, joined, 0), None, joined)

    @staticmethod
    def _open_fd(path: str, name: str, extra_flags: int) -> int:
        try:
            return os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | extra_flags)
        except OSError as e:
            raise _open_error(path, e) from None

    def _checked(self, path: str, fd: int, real: str | None, joined: str) -> OpenedFile:
        """
        The L{OpenedFile} for C{fd} if it is a regular file inside the
        folder; otherwise C{fd} is closed and the reason raised.
        """
        try:
            if real is None:
                # Where the open really led, every symlink followed: checked
                # on the open descriptor, so no swap after a check can fool it.
                real = os.readlink(f"/proc/self/fd/{fd}")
                if not self._inside(real):
                    raise NotShared(path)
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise NotShared(path)
        except NotShared:
            os.close(fd)
            raise
        except OSError as e:
            os.close(fd)
            raise Unreadable(path, e) from None
        return OpenedFile(path, real, fd, FileStat.of(st), joined)

    def is_current(self, opened: OpenedFile) -> bool:
        """
        Whether C{opened} still holds what it held when it was opened, and
        its path still names that same file.
        """
        try:
            now = FileStat.of(os.fstat(opened.fd))
            named = FileStat.of(os.stat(opened.real))
        except OSError:
            return False
        return now == opened.stat == named

    def read_whole(self, opened: OpenedFile) -> bytes:
        """
        The whole content of a small file, checked against its state: a
        write that began after it was opened changes its change time, so a
        read that overlapped one is refused.  (A write already under way
        when it was opened changes nothing visible afterwards: see
        L{SETTLE}, which the caller applies.)

        @raise Unreadable: on a read error, or if the file changed.
        """
        size = opened.stat.size
        try:
            data = os.pread(opened.fd, size + 1, 0)
            after = FileStat.of(os.fstat(opened.fd))
        except OSError as e:
            raise Unreadable(opened.path, e) from None
        if after != opened.stat or len(data) != size:
            raise Unreadable(opened.path, OSError(0, "file changed while being read; try again"))
        return data

    def walk(self, *, max_entries: int = MAX_WALK_ENTRIES, max_depth: int = MAX_WALK_DEPTH) -> FolderWalk:
        """A walk of every shared regular file; the caller must L{FolderWalk.close} it."""
        return FolderWalk(self, max_entries, max_depth)

    def list_files(self) -> list[tuple[str, FileStat]]:
        """
        Every shared regular file, recursively, as (wire path, state), sorted
        by the path's UTF-8 bytes: a whole walk, for callers that want it all.
        """
        found: list[tuple[bytes, FileStat]] = []
        walk = self.walk()
        try:
            while True:
                rows = walk.next_rows(lambda path, st: (path, FileStat.of(st)))
                if rows is None:
                    break
                found.extend(rows)
        finally:
            walk.close()
        found.sort(key=lambda row: row[0])
        return [(path.decode("utf-8"), st) for path, st in found]


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

    def __init__(self, folder: SharedFolder, max_entries: int, max_depth: int) -> None:
        self._lock = threading.Lock()
        self._closing = False
        self._folder = folder
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
            fd = os.open(self._folder.root, _DIR_FLAGS)
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
        folder = self._folder
        if not (_O_PATH and folder._proc_fds):
            # Without O_PATH and /proc: resolve by name (racy, not Linux).
            return None
        fd = os.open(name, _O_PATH | os.O_CLOEXEC, dir_fd=parent)
        try:
            real = os.readlink(f"/proc/self/fd/{fd}")
            if not folder._inside(real):
                return None
            st = os.fstat(fd)
        finally:
            os.close(fd)
        return st if stat.S_ISREG(st.st_mode) else None

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
