"""
Saving downloads: a shared path becomes a file inside the destination folder,
written under a C{.part} name (with a sidecar that lets a later attempt
resume it) and renamed into place only once its SHA-256 is verified.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import IO, Any

from twisted.internet.error import ConnectError

from filecache.client import (
    BrokenReply,
    ConnectionLostEarly,
    Download,
    FileCacheClientProtocol,
    HandshakeFailed,
    ServerError,
)
from filecache.wire import PathError, split_path

PART_SUFFIX = ".part"
META_SUFFIX = ".part.json"


class LocalError(Exception):
    """The download cannot be saved: unsafe name, existing file, disk error."""


class VersionChanged(Exception):
    """The file changed on the server between two parts of one download."""


class Progress:
    """What a download reports progress to (a tqdm bar, or nothing)."""

    def start(self, name: str, total: int, done: int) -> None:
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


def _inside(root: str, path: str) -> bool:
    real = os.path.realpath(path)
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def make_parents(folder: str, path: str) -> None:
    """
    Create the sub-folders of C{path} inside C{folder} one level at a time,
    refusing any level that leads outside (a symlink), before creating the
    next.

    @raise LocalError: if a level leads outside or cannot be made.
    """
    root = os.path.realpath(folder)
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as e:
        raise LocalError(f"cannot create {folder}: {e.strerror}") from None
    current = folder
    for part in split_path(path)[:-1]:
        current = os.path.join(current, part)
        if not _inside(root, current):
            raise LocalError(f"refusing to save {path!r}: {current} leads outside {folder}")
        try:
            os.mkdir(current)
        except FileExistsError:
            if not os.path.isdir(current):
                raise LocalError(f"cannot save {path!r}: {current} is not a folder") from None
        except OSError as e:
            raise LocalError(f"cannot create {current}: {e.strerror}") from None
        if not _inside(root, current):
            raise LocalError(f"refusing to save {path!r}: {current} leads outside {folder}")


@dataclass(frozen=True)
class PartInfo:
    """What the sidecar of a C{.part} file records: enough to resume it."""

    path: str
    version: str
    size: int


class PartFile:
    """
    A L{BodySink} writing into C{<final>.part}, from the start or appending
    to what an earlier attempt left; L{commit} renames it to the final name.
    """

    def __init__(self, final: str, name: str, progress: Progress) -> None:
        self.final = final
        self.part = final + PART_SUFFIX
        self.meta = final + META_SUFFIX
        self._name = name
        self._progress = progress
        self._file: IO[bytes] | None = None
        self._offset = 0
        self._expect_version: str | None = None

    # What an earlier attempt left

    def resumable(self) -> PartInfo | None:
        """The sidecar's record, if the C{.part} file belongs to this download."""
        try:
            with open(self.meta, encoding="utf-8") as f:
                data = json.load(f)
            info = PartInfo(str(data["path"]), str(data["version"]), int(data["size"]))
            have = os.lstat(self.part)
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if info.path != self._name or not os.path.isfile(self.part) or os.path.islink(self.part):
            return None
        if have.st_size > info.size:
            return None
        return info

    def have(self) -> int:
        try:
            return os.lstat(self.part).st_size
        except OSError:
            return 0

    def prepare(self, offset: int, version: str | None) -> None:
        """The next body starts at C{offset}, and must be of C{version} if given."""
        self._offset = offset
        self._expect_version = version

    # BodySink

    def begin(self, size: int, version: str) -> None:
        if self._expect_version is not None and version != self._expect_version:
            raise VersionChanged(f"{self._name} changed on the server")
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        if not self._offset:
            flags |= os.O_TRUNC
        try:
            fd = os.open(self.part, flags, 0o644)
        except OSError as e:
            raise LocalError(f"cannot write {self.part}: {e.strerror}") from None
        self._file = os.fdopen(fd, "wb")
        if self._offset:
            self._file.seek(self._offset)
            self._file.truncate()
        else:
            self._write_meta(PartInfo(self._name, version, size))
        self._progress.start(self._name, self._offset + size, self._offset)

    def _write_meta(self, info: PartInfo) -> None:
        temporary = self.meta + ".tmp"
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"path": info.path, "version": info.version, "size": info.size}, f)
            os.replace(temporary, self.meta)
        except OSError as e:
            raise LocalError(f"cannot write {self.meta}: {e.strerror}") from None

    def write(self, data: bytes) -> None:
        assert self._file is not None
        try:
            self._file.write(data)
        except OSError as e:
            raise LocalError(f"cannot write {self.part}: {e.strerror}") from None
        self._progress.advance(len(data))

    # Endings

    def _close(self) -> None:
        self._progress.close()
        if self._file is not None:
            f, self._file = self._file, None
            try:
                f.close()
            except OSError:
                pass

    def digest(self) -> str:
        """SHA-256 of the whole C{.part} file as it is on disk."""
        hasher = hashlib.sha256()
        with open(self.part, "rb") as f:
            while chunk := f.read(1 << 20):
                hasher.update(chunk)
        return hasher.hexdigest()

    def commit(self) -> None:
        """The whole file was verified: move it to its final name."""
        self._close()
        try:
            os.replace(self.part, self.final)
        except OSError as e:
            raise LocalError(f"cannot rename {self.part}: {e.strerror}") from None
        self._remove(self.meta)

    def keep(self) -> None:
        """The transfer broke off: close, leaving the C{.part} and its sidecar."""
        self._close()

    def discard(self) -> None:
        """The bytes are bad or the file is gone: remove what we wrote."""
        created = self._file is not None or os.path.exists(self.meta)
        self._close()
        if created:
            self._remove(self.part)
        self._remove(self.meta)

    @staticmethod
    def _remove(path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError:
            pass


Connect = Callable[[], Awaitable[FileCacheClientProtocol]]
Sleep = Callable[[float], Awaitable[Any]]


class Session:
    """
    The connection downloads go over: made on first use and made again
    after it is lost (through a load balancer, maybe to another server).
    """

    def __init__(self, connect: Connect) -> None:
        self._connect = connect
        self._client: FileCacheClientProtocol | None = None

    async def client(self) -> FileCacheClientProtocol:
        if self._client is None or not self._client.usable:
            self._client = await self._connect()
        return self._client

    async def close(self) -> None:
        if self._client is not None and self._client.usable:
            await self._client.quit()


RETRYABLE = (ConnectionLostEarly, ConnectError, VersionChanged)


def backoff(attempt: int) -> float:
    """Seconds to wait before retry number C{attempt} (1, 2, ...)."""
    return float(min(0.25 * 2 ** (attempt - 1), 5.0))


async def fetch(
    session: Session,
    path: str,
    folder: str,
    *,
    force: bool = False,
    progress: Callable[[], Progress] = Progress,
    retries: int = 0,
    sleep: Sleep | None = None,
    on_retry: Callable[[str, BaseException, float], None] = lambda *a: None,
) -> tuple[str, Download]:
    """
    Download shared C{path} into C{folder}; return the saved file's name and
    what was received last.

    A lost connection is retried up to C{retries} times, resuming from the
    C{.part} file when the server still has the same version; a resumed file
    is checked against the server's whole-file SHA-256 before it is renamed.

    @raise LocalError: unsafe name, existing destination without C{force},
        or a local write error.
    @raise ServerError: the server answered an error.
    @raise BrokenReply: the bytes failed the size or digest check.
    @raise ConnectionLostEarly: the connection was lost past the retries.
    """
    final = destination(folder, path)
    if os.path.lexists(final) and not force:
        raise LocalError(f"{final} exists (use --force to overwrite)")
    make_parents(folder, path)
    if os.path.isdir(final):
        raise LocalError(f"{final} is a folder")
    sink = PartFile(final, path, progress())
    attempt = 0
    restarted = False
    while True:
        try:
            client = await session.client()
            result = await _fetch_once(client, path, sink, fresh=restarted)
        except RETRYABLE as e:
            sink.keep()
            attempt += 1
            if attempt > retries or isinstance(e, HandshakeFailed):
                if isinstance(e, VersionChanged):
                    raise ConnectionLostEarly(str(e)) from None
                raise
            delay = backoff(attempt)
            on_retry(path, e, delay)
            if sleep is not None:
                await sleep(delay)
            continue
        except BrokenReply:
            if not restarted and sink.have() and attempt < retries:
                # What an earlier attempt left may be bad: start over once.
                sink.discard()
                restarted = True
                attempt += 1
                continue
            sink.discard()
            raise
        except (LocalError, ServerError):
            sink.discard()
            raise
        except BaseException:
            sink.keep()
            raise
        sink.commit()
        return final, result


async def _fetch_once(
    client: FileCacheClientProtocol, path: str, sink: PartFile, fresh: bool
) -> Download:
    info = None if fresh else sink.resumable()
    have = sink.have() if info is not None else 0
    if info is None or have == 0:
        sink.prepare(0, None)
        return await client.get(path, sink)
    current = await client.hash(path)
    if current.version != info.version or have > current.size:
        # The file changed since the .part was written: start over.
        sink.prepare(0, None)
        return await client.get(path, sink)
    sink.prepare(have, current.version)
    await client.get(path, sink, have)
    sink.keep()
    if sink.digest() != current.digest:
        raise BrokenReply("SHA-256 of the resumed file does not match the server's")
    return Download(current.size, current.version, current.digest)
