"""
The shared folder: turns a wire path into an open regular file confined to
the folder, and lists every file that may be shared.  Never writes.
"""

from __future__ import annotations

import errno
import os
import stat
import weakref
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from filecache.daemon.beneath import BeneathOpener, beneath_opener
from filecache.daemon.folders import OpenedFolder
from filecache.daemon.walk import MAX_WALK_DEPTH, MAX_WALK_ENTRIES, FolderWalk, open_folder_fd
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
    return _token(st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _token(ino: int, size: int, mtime_ns: int, ctime_ns: int) -> str:
    # The one place a version token is written.
    return f"{ino:x}-{size:x}-{mtime_ns:x}-{ctime_ns:x}"


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

    @cached_property
    def version(self) -> str:
        """The opaque token that changes whenever the content may have changed."""
        return _token(self.ino, self.size, self.mtime_ns, self.ctime_ns)

    @property
    def mtime(self) -> int:
        return self.mtime_ns // 1_000_000_000

    @property
    def state(self) -> tuple[int, int, int, int]:
        """What the version token is made of, as numbers."""
        return (self.ino, self.size, self.mtime_ns, self.ctime_ns)


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

_FILE_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC


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
        # The folder's own descriptor, for opening files beneath it; closed
        # with this object.
        self._root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        weakref.finalize(self, os.close, self._root_fd)
        self._beneath = beneath_opener(self._root_fd, _FILE_FLAGS)

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
        opener = self._beneath
        if opener is not None:
            opened = self._open_beneath(path, opener)
            if opened is not None:
                return opened
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

    def _open_beneath(self, path: str, opener: BeneathOpener) -> OpenedFile | None:
        """
        C{path} opened beneath the folder's descriptor, where no symlink is
        on the way: three system calls (C{fstatat}, C{openat2}, C{fstat})
        and no look at where the open led, which the kernel has confined.
        C{None} for a path with a symlink, which L{open} follows the long way.
        """
        joined = self.disk_path(path)
        relative = joined[len(self._prefix) :]
        try:
            # Only regular files are opened (see open); lstat-like, so a
            # symlink at the end is seen and not followed here.
            mode = os.stat(relative, dir_fd=self._root_fd, follow_symlinks=False).st_mode
        except OSError as e:
            raise _open_error(path, e) from None
        if stat.S_ISLNK(mode):
            return None
        if not stat.S_ISREG(mode):
            raise NotShared(path)
        try:
            fd = opener.open(relative)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.EXDEV):
                return None  # a symlink on the way
            raise _open_error(path, e) from None
        return self._checked(path, fd, joined, joined)

    @staticmethod
    def _open_fd(path: str, name: str, extra_flags: int) -> int:
        try:
            return os.open(name, _FILE_FLAGS | extra_flags)
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

    def open_folder(self, path: str) -> OpenedFolder:
        """
        Open the shared folder C{path} (C{""}: the root; else a relative
        path such as C{a/b}, no slash at either end), one component at a time
        from the root's descriptor, never through a symlink: a symlinked
        folder is not shared as a folder, as LIST does not follow one.  A few
        system calls, no read.  The caller must L{OpenedFolder.close} it (a
        folder page does).

        @raise NotShared: if it names nothing that is a shared folder.
        @raise Unreadable: if it is one but cannot be opened now.
        """
        return OpenedFolder(path, self._folder_fd(path), self._inside, self._proc_fds)

    def is_folder(self, path: str) -> bool:
        """Whether C{path} names a shared folder (as L{open_folder} would open)."""
        try:
            os.close(self._folder_fd(path))
        except (NotShared, Unreadable):
            return False
        return True

    def _folder_fd(self, path: str) -> int:
        try:
            parts = split_path(path) if path else ()
        except PathError:
            raise NotShared(path) from None
        try:
            return open_folder_fd(self.root, parts)
        except OSError as e:
            raise _open_error(path, e) from None

    def walk(self, *, max_entries: int = MAX_WALK_ENTRIES, max_depth: int = MAX_WALK_DEPTH) -> FolderWalk:
        """A walk of every shared regular file; the caller must L{FolderWalk.close} it."""
        return FolderWalk(self.root, self._inside, self._proc_fds, max_entries, max_depth)


def hash_range(fd: int, hasher: Any, position: int, end: int) -> int:
    """
    Feed bytes C{position} to C{end} of C{fd} to C{hasher}, 1 MiB per read;
    return where it stopped (C{end}).

    @raise OSError: on a read error, or if the file ends first.
    """
    while position < end:
        chunk = os.pread(fd, min(1 << 20, end - position), position)
        if not chunk:
            raise OSError(0, "file ended early")
        hasher.update(chunk)
        position += len(chunk)
    return position
