"""
The shared folder: turns a wire path into an open regular file confined to
the folder, and lists every file that may be shared.  Never writes.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from filecache.wire import PathError, split_path

# Errors that mean "there is no shareable file by that name"; every other
# OSError means the file exists but cannot be served right now.
_ABSENT = frozenset(
    {errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG, errno.EINVAL, errno.ENXIO}
)


class NotShared(Exception):
    """The path names nothing that is shared: absent, hidden, outside, or not a regular file."""


class Unreadable(Exception):
    """The file is shared but cannot be read now (permissions, I/O, descriptors)."""

    def __init__(self, path: str, error: OSError) -> None:
        super().__init__(f"{path}: {error.strerror or error}")
        self.error = error


def version_token(ino: int, size: int, mtime_ns: int) -> str:
    """The version token of a file in this state (see L{FileStat.version})."""
    return f"{ino:x}-{size:x}-{mtime_ns:x}"


@dataclass(frozen=True)
class FileStat:
    """What filecache needs from a file's C{stat}."""

    ino: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileStat:
        return cls(st.st_ino, st.st_size, st.st_mtime_ns)

    @property
    def version(self) -> str:
        """The opaque token that changes whenever the content may have changed."""
        return version_token(self.ino, self.size, self.mtime_ns)

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


Row = TypeVar("Row", bound=tuple)  # type: ignore[type-arg]


def _compact(encoded: bytes, st: os.stat_result) -> tuple[bytes, int, int, int]:
    return (encoded, st.st_size, st.st_mtime_ns, st.st_ino)


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

    def list_files(self) -> list[tuple[str, FileStat]]:
        """
        Every shared regular file, recursively, as (wire path, state), sorted
        by the path's UTF-8 bytes.  Names that are not UTF-8 cannot be put on
        the wire and are left out.
        """
        return [
            (encoded.decode("utf-8"), FileStat(ino, size, mtime_ns))
            for encoded, size, mtime_ns, ino in self.scan(_compact)
        ]

    def scan(self, row: Callable[[bytes, os.stat_result], Row] = _compact) -> list[Row]:  # type: ignore[assignment]
        """
        L{list_files} for folders of many files: C{row(utf8_path, stat)}
        for every shared regular file, sorted by the path, which C{row} puts
        first in the tuple it returns.  By default (UTF-8 path, size, mtime
        in ns, inode).
        """
        found: list[Row] = []
        # Each folder to walk carries the keys of the folders above it, so a
        # symlink back up is not followed, while two paths to one folder
        # are both listed (both can be fetched).
        root_key = _dir_key(os.stat(self.root))
        pending: list[tuple[str, bytes, frozenset[tuple[int, int]]]] = [
            (self.root, b"", frozenset({root_key}))
        ]
        is_reg = stat.S_ISREG
        is_dir = stat.S_ISDIR
        while pending:
            directory, prefix, above = pending.pop()
            try:
                entries = os.scandir(directory)
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM) or not prefix:
                    raise
                continue
            with entries:
                for entry in entries:
                    name = entry.name
                    if name[0] == "." or "\\" in name:
                        continue
                    try:
                        encoded = prefix + name.encode("utf-8")
                    except UnicodeEncodeError:
                        continue
                    try:
                        if entry.is_symlink() and not self._inside(os.path.realpath(entry.path)):
                            continue
                        st = entry.stat()
                    except OSError:
                        continue
                    mode = st.st_mode
                    if is_reg(mode):
                        found.append(row(encoded, st))
                    elif is_dir(mode):
                        key = (st.st_dev, st.st_ino)
                        if key not in above:
                            pending.append((entry.path, encoded + b"/", above | {key}))
        # Paths are unique, so tuples sort by their first element alone.
        found.sort()
        return found


def _dir_key(st: os.stat_result) -> tuple[int, int]:
    return (st.st_dev, st.st_ino)
