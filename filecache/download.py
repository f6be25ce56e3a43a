"""
Saving downloads: a shared path becomes a file inside the destination folder,
written under a C{.part} name and renamed into place only once verified.
"""

from __future__ import annotations

import os
from typing import IO, Callable

from filecache.client import BrokenReply, Download, FileCacheClientProtocol, ServerError
from filecache.wire import PathError, split_path

PART_SUFFIX = ".part"


class LocalError(Exception):
    """The download cannot be saved: unsafe name, existing file, disk error."""


class Progress:
    """What a download reports progress to (a tqdm bar, or nothing)."""

    def start(self, name: str, total: int) -> None:
        pass

    def advance(self, count: int) -> None:
        pass

    def close(self) -> None:
        pass


def destination(folder: str, path: str) -> str:
    """
    The local file that shared C{path} is saved to inside C{folder},
    sub-folders kept (C{a/b.txt} -> C{folder/a/b.txt}).

    @raise LocalError: if C{path} could name something outside C{folder}.
    """
    try:
        parts = split_path(path)
    except PathError:
        raise LocalError(f"refusing to save {path!r}: not a plain relative path") from None
    return os.path.join(folder, *parts)


def _inside(folder: str, directory: str) -> bool:
    root = os.path.realpath(folder)
    real = os.path.realpath(directory)
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


class PartFile:
    """
    A L{BodySink} writing into C{<final>.part}; L{commit} renames it to the
    final name, L{discard} removes it.
    """

    def __init__(self, final: str, name: str, progress: Progress) -> None:
        self.final = final
        self.part = final + PART_SUFFIX
        self._name = name
        self._progress = progress
        self._file: IO[bytes] | None = None

    def begin(self, size: int, version: str) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(self.part, flags, 0o644)
        except OSError as e:
            raise LocalError(f"cannot write {self.part}: {e.strerror}") from None
        self._file = os.fdopen(fd, "wb")
        self._progress.start(self._name, size)

    def write(self, data: bytes) -> None:
        assert self._file is not None
        try:
            self._file.write(data)
        except OSError as e:
            raise LocalError(f"cannot write {self.part}: {e.strerror}") from None
        self._progress.advance(len(data))

    def _close(self) -> None:
        self._progress.close()
        if self._file is not None:
            f, self._file = self._file, None
            f.close()

    def commit(self) -> None:
        """The body was verified: move it to its final name."""
        self._close()
        try:
            os.replace(self.part, self.final)
        except OSError as e:
            raise LocalError(f"cannot rename {self.part}: {e.strerror}") from None

    def keep(self) -> None:
        """The transfer broke off: close, leaving the C{.part} file."""
        self._close()

    def discard(self) -> None:
        """The bytes are bad: remove the C{.part} file."""
        self._close()
        try:
            os.unlink(self.part)
        except FileNotFoundError:
            pass


async def fetch(
    client: FileCacheClientProtocol,
    path: str,
    folder: str,
    *,
    force: bool = False,
    progress: Callable[[], Progress] = Progress,
) -> tuple[str, Download]:
    """
    Download shared C{path} into C{folder}; return the saved file's name and
    what was received.

    @raise LocalError: unsafe name, existing destination without C{force},
        or a local write error.
    @raise ServerError: the server answered an error.
    @raise BrokenReply: the bytes failed the size or digest check.
    """
    final = destination(folder, path)
    if os.path.lexists(final) and not force:
        raise LocalError(f"{final} exists (use --force to overwrite)")
    parent = os.path.dirname(final)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise LocalError(f"cannot create {parent}: {e.strerror}") from None
    if not _inside(folder, parent):
        raise LocalError(f"refusing to save {path!r}: {parent} leads outside {folder}")
    if os.path.isdir(final):
        raise LocalError(f"{final} is a directory")
    sink = PartFile(final, path, progress())
    try:
        result: Download = await client.get(path, sink)
    except (BrokenReply, LocalError, ServerError):
        sink.discard()
        raise
    except BaseException:
        sink.keep()
        raise
    sink.commit()
    return final, result
