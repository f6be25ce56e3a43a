"""
The bodies of GET replies: each owns its whole transfer, from the first
byte to releasing its file, checking for change and filling the cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from filecache.daemon.cache import CacheEntry, DigestStore, ICache
from filecache.daemon.folder import OpenedFile, SharedFolder
from filecache.daemon.transfer import (
    CAN_SENDFILE,
    TransferFailed,
    TransferResult,
    send_file,
    send_memory,
    sendfile_now,
)


def _nothing() -> None:
    pass


@dataclass(frozen=True)
class Sent:
    """
    How a body's transfer ended, when every byte went out.

    @ivar digest: SHA-256 of the body, for the line that closes the reply;
        C{None} if the file changed while it was sent, or if the body was
        sent without hashing it (L{DiskBody} with C{hashed=False}).
    @ivar sent: the body bytes handed to the kernel.
    @ivar changed: the file changed while it was sent: the reply must be
        cut off rather than closed.
    """

    digest: str | None
    sent: int
    changed: bool = False


class Body(Protocol):
    """What a protocol adapter needs of a body: send it, or let it go."""

    length: int

    def send(self, consumer: Any, on_progress: Callable[[], object] = _nothing) -> Deferred[Sent]:
        """
        Write the body to C{consumer} (a transport).  Fires with L{Sent}, or
        fails with L{TransferFailed} carrying the bytes that went out.
        """

    def discard(self) -> None:
        """The body will never be sent (its client has gone): release what it holds."""


@dataclass
class Stores:
    """
    What disk bodies report to once sent: the cache and its fill
    reservations, the digests of whole files, and the bytes-sent figure.
    """

    folder: SharedFolder
    cache: ICache
    digests: DigestStore
    count_sent: Callable[[int], None]
    filling: set[str] = field(default_factory=set)

    def reserve_fill(self, path: str, size: int) -> bool:
        """Room in the cache for C{path}'s bytes, one reader per file, made before they are read."""
        if path in self.filling or not self.cache.admits(size):
            return False
        if not self.cache.reserve(size):
            return False
        self.filling.add(path)
        return True


class MemoryBody:
    """
    C{data[start:end]}, sent from memory; C{digest} is that of those bytes
    (or C{None} for a range whose digest nobody asked for).
    """

    def __init__(
        self,
        data: bytes | bytearray,
        start: int,
        digest: str | None,
        count_sent: Callable[[int], None],
        end: int | None = None,
    ) -> None:
        self.data = data
        self.start = start
        self.end = len(data) if end is None else end
        self.digest = digest
        self.length = self.end - start
        self._count_sent = count_sent

    def send(self, consumer: Any, on_progress: Callable[[], object] = _nothing) -> Deferred[Sent]:
        def sent(count: int) -> Sent:
            self._count_sent(count)
            return Sent(self.digest, count)

        return send_memory(
            consumer, self.data, self.start, end=self.end, on_progress=on_progress
        ).addCallbacks(sent, self._failed)

    def _failed(self, reason: Failure) -> Failure:
        if isinstance(reason.value, TransferFailed):
            self._count_sent(reason.value.sent)
        return reason

    def discard(self) -> None:
        pass


class DiskBody:
    """
    C{length} bytes of an open file from C{start}.  With the whole file's
    digest known, or with C{hashed} false (nobody needs the digest of these
    bytes: an HTTP range), the kernel may copy it (C{sendfile}); otherwise
    its bytes are read, hashed and, with C{fill}, kept for the cache, whose
    room was reserved for them.
    """

    def __init__(
        self,
        opened: OpenedFile,
        start: int,
        length: int,
        digest: str | None,
        fill: bool,
        stores: Stores,
        *,
        hashed: bool = True,
    ) -> None:
        self.opened = opened
        self.start = start
        self.length = length
        self.digest = digest
        self.fill = fill
        self.hashed = hashed
        self._stores = stores
        self._released = False
        # Bytes of the body already sent by send_now: send sends the rest.
        self._before = 0

    @property
    def _digest_known(self) -> bool:
        # Nobody needs these bytes hashed: the digest is known, or not wanted.
        return self.digest is not None or not self.hashed

    @property
    def by_kernel(self) -> bool:
        """Whether the kernel copies this body (C{sendfile}) on a plain socket: none of its bytes are read here."""
        return self._digest_known and not self.fill and CAN_SENDFILE

    def send_now(self, out: int, most: int) -> Sent | None:
        """
        Send as much of a body the kernel copies (L{by_kernel}) as the
        socket C{out} takes at once, up to C{most} bytes: no producer, no
        Deferred, no reactor turn, for a body that fits in the send buffer
        (an HTTP range, a file of a few MiB).  The L{Sent} if that was all
        of it; else C{None}, and L{send} sends the rest (an error or an
        early end of the file is met, and reported, there).
        """
        self._before = sendfile_now(out, self.opened.fd, self.start, self.length, most)
        if self._before == self.length:
            return self._sent(TransferResult(0))
        return None

    def send(self, consumer: Any, on_progress: Callable[[], object] = _nothing) -> Deferred[Sent]:
        d = send_file(
            consumer,
            self.opened.fd,
            self.start + self._before,
            self.length - self._before,
            digest_known=self._digest_known,
            collect=self.fill,
            on_progress=on_progress,
        )
        return d.addCallbacks(self._sent, self._failed)

    def _sent(self, result: TransferResult) -> Sent:
        stores = self._stores
        opened = self.opened
        sent = self._before + result.sent
        stores.count_sent(sent)
        try:
            current = stores.folder.is_current(opened)
        finally:
            self.discard()
        if not current:
            stores.cache.discard(opened.path)
            return Sent(None, sent, changed=True)
        digest = self.digest or result.digest
        if self.start == 0 and digest is not None:
            stores.digests.put(opened.stat.version, digest)
            if self.fill and result.data is not None:
                entry = CacheEntry(
                    result.data, opened.stat.version, digest, opened.stat.mtime, opened.source, opened.stat.state
                )
                stores.cache.insert(opened.path, entry)
        return Sent(digest, sent)

    def _failed(self, reason: Failure) -> Failure:
        if isinstance(reason.value, TransferFailed):
            reason.value.sent += self._before
            self._stores.count_sent(reason.value.sent)
        self.discard()
        return reason

    def discard(self) -> None:
        if self._released:
            return
        self._released = True
        self.opened.close()
        if self.fill:
            self._stores.filling.discard(self.opened.path)
            self._stores.cache.release(self.opened.stat.size)


@dataclass
class FileAnswer:
    """
    A shared file found for a protocol that chooses its own byte range (the
    HTTP adapter): what is known of it, and the bodies it can be sent as.
    Exactly one of C{data} (the whole content, in memory) and C{opened} (an
    open file, which the owner must hand to a body or L{close}) is set.

    @ivar digest: SHA-256 of the whole file if known now, else C{None}.
    @ivar cache: C{"hit"} or C{"miss"}, for the access log.
    @ivar entry: the cache entry the content came from (its identity tells
        a kept response built from it whether it is still this version).
    """

    path: str
    size: int
    version: str
    mtime: int
    digest: str | None
    cache: str
    stores: Stores
    data: bytes | bytearray | None = None
    opened: OpenedFile | None = None
    entry: CacheEntry | None = None

    def body(self, start: int, end: int) -> MemoryBody | DiskBody:
        """
        The body of bytes C{start} to C{end} (exclusive).  A whole file not
        in memory is kept for the cache as it is sent, if there is room;
        every other body from disk goes out by C{sendfile}, unhashed.
        """
        whole = start == 0 and end == self.size
        if self.data is not None:
            return MemoryBody(self.data, start, self.digest if whole else None, self.stores.count_sent, end)
        opened, self.opened = self.opened, None
        assert opened is not None, "a body was already made of this file"
        fill = whole and self.stores.reserve_fill(self.path, self.size)
        digest = self.digest if whole else None
        return DiskBody(opened, start, end - start, digest, fill, self.stores, hashed=fill)

    def count_sent(self, count: int) -> None:
        """C{count} body bytes went out without a body object (written whole with the head)."""
        self.stores.count_sent(count)

    def close(self) -> None:
        """No body will be sent (C{HEAD}, C{304}, an error): release the file."""
        opened, self.opened = self.opened, None
        if opened is not None:
            opened.close()
