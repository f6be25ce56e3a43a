"""
What the daemon answers: turns parsed requests into replies over the shared
folder and the cache, and decides what enters the cache.  No transport here.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from stat import S_ISREG
from typing import Protocol, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure

from filecache import wire
from filecache.cache import CacheEntry, ICache
from filecache.folder import (
    NotShared,
    OpenedFile,
    SharedFolder,
    Unreadable,
    version_token,
)
from filecache.transfer import TransferResult

T = TypeVar("T")

INLINE_LIMIT = 64 * 1024
"""Bodies up to this size are sent in one write together with their status
and END lines: one segment on the wire, no producer to set up."""


class BlockingRunner(Protocol):
    """Runs blocking work off the reactor thread; a Deferred of its result."""

    def __call__(self, work: Callable[[], T]) -> Deferred[T]: ...


def run_now(work: Callable[[], T]) -> Deferred[T]:
    """Run blocking C{work} right away, on this thread (for tests)."""
    try:
        return succeed(work())
    except BaseException:  # noqa: BLE001 - the Deferred carries it, as with maybeDeferred
        return fail(Failure())


def sha256_hex(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class MemoryBody:
    """A body sent from bytes in memory: C{data[start:]}."""

    data: bytes
    start: int
    digest: str


@dataclass(frozen=True)
class DiskBody:
    """
    A body sent from an open file.

    @ivar digest: SHA-256 of the whole file when already known (then the
        kernel may copy it without our reading it).
    @ivar fill: whether the bytes read are to be put in the cache.
    """

    opened: OpenedFile
    start: int
    length: int
    digest: str | None
    fill: bool


Body = MemoryBody | DiskBody


@dataclass(frozen=True)
class Reply:
    """
    One reply: C{data} (the whole reply, or the status line of a streamed
    one), an optional body to stream after it, and what the access log
    says of it.
    """

    data: bytes
    status: str
    body: Body | None = None
    cache: str = "-"
    size: int = 0


def error_reply(code: str, message: str) -> Reply:
    return Reply(wire.format_error(code, message), "ERR " + code)


@dataclass
class Counters:
    """Figures reported by STATS that the cache does not keep."""

    connections_active: int = 0
    connections_total: int = 0
    bytes_sent: int = 0
    requests: int = 0


class DigestStore:
    """
    SHA-256 digests of whole files by version token, so a file too big to
    cache is hashed once, not on every transfer.  Bounded, oldest dropped.
    """

    def __init__(self, limit: int = 65536) -> None:
        self._limit = limit
        self._digests: OrderedDict[str, str] = OrderedDict()

    def get(self, version: str) -> str | None:
        return self._digests.get(version)

    def put(self, version: str, digest: str) -> None:
        self._digests[version] = digest
        while len(self._digests) > self._limit:
            self._digests.popitem(last=False)


class FileCacheServer:
    """
    Answers requests for one shared folder through one shared cache.

    @param run_blocking: runs a blocking callable off the reactor thread and
        returns a Deferred of its result (L{run_now} runs it in place).
    """

    def __init__(
        self,
        folder: SharedFolder,
        cache: ICache,
        run_blocking: BlockingRunner = run_now,
    ) -> None:
        self.folder = folder
        self.cache = cache
        self.counters = Counters()
        self.digests = DigestStore()
        self._run_blocking = run_blocking
        self._filling: dict[str, int] = {}

    def respond(self, request: wire.Request) -> Reply | Deferred[Reply]:
        """The reply to C{request} (QUIT is the protocol's business)."""
        if isinstance(request, wire.GetRequest):
            return self._get(request)
        if isinstance(request, wire.HashRequest):
            return self._hash(request.path)
        if isinstance(request, wire.ListRequest):
            return self._list(request.cached)
        return self._stats()

    # GET

    def _get(self, request: wire.GetRequest) -> Reply:
        path = request.path
        hit = self._cached(path)
        if hit is not None:
            entry, size = hit
            if request.offset > size:
                return error_reply(wire.BAD_REQUEST, "offset past the end of the file")
            if request.offset == 0 and entry.reply is not None:
                return Reply(entry.reply, "OK", None, "hit", size)
            return self._from_memory(entry.data, request.offset, entry.digest, entry.version, "hit")
        opened = self._open(path)
        if isinstance(opened, Reply):
            return opened
        st = opened.stat
        if request.offset > st.size:
            opened.close()
            return error_reply(wire.BAD_REQUEST, "offset past the end of the file")
        known = self.cache.lookup(path, st.version)
        if known is not None:
            opened.close()
            return self._from_memory(known.data, request.offset, known.digest, st.version, "hit")
        if st.size <= INLINE_LIMIT:
            try:
                data = _read_whole(opened)
            except Unreadable as e:
                return error_reply(wire.UNAVAILABLE, f"cannot read file: {e.error.strerror}")
            finally:
                opened.close()
            digest = sha256_hex(data)
            reply = self._from_memory(data, 0, digest, st.version, "miss")
            entry = CacheEntry(data, st.version, digest, st.mtime, opened.source, reply.data)
            self.cache.insert(path, entry)
            if request.offset:
                return self._from_memory(data, request.offset, digest, st.version, "miss")
            return reply
        whole = request.offset == 0
        known_digest = self.digests.get(st.version) if whole else None
        fill = whole and self._reserve_fill(path, st.size)
        length = st.size - request.offset
        body = DiskBody(opened, request.offset, length, known_digest, fill)
        return Reply(
            wire.format_get_status(length, st.version), "OK", body, "miss", length
        )

    def _open(self, path: str) -> OpenedFile | Reply:
        """The shared file C{path} opened, or the error reply that says why not."""
        try:
            return self.folder.open(path)
        except NotShared:
            self.cache.discard(path)
            return error_reply(wire.NOT_FOUND, "no such file")
        except Unreadable as e:
            return error_reply(wire.UNAVAILABLE, f"cannot read file: {e.error.strerror}")

    def _cached(self, path: str) -> tuple[CacheEntry, int] | None:
        """
        The cache entry for C{path} if the file on disk is still the one it
        was read from: one C{stat}, no open.  The entry was confined to the
        folder when it was read; the same inode, size and time mean the same
        file.
        """
        entry = self.cache.peek(path)
        if entry is None or not entry.source:
            return None
        try:
            st = os.stat(entry.source)
        except OSError:
            return None
        if not S_ISREG(st.st_mode) or version_token(st.st_ino, st.st_size, st.st_mtime_ns) != entry.version:
            return None
        if self.cache.lookup(path, entry.version) is None:  # counts the hit
            return None  # pragma: no cover - the entry was just seen
        return entry, st.st_size

    def _hash(self, path: str) -> Reply | Deferred[Reply]:
        opened = self._open(path)
        if isinstance(opened, Reply):
            return opened
        st = opened.stat
        entry = self.cache.peek(path)
        known = entry.digest if entry is not None and entry.version == st.version else None
        known = known or self.digests.get(st.version)
        if known is not None:
            opened.close()
            return Reply(wire.format_hash_status(st.size, st.version, known), "OK")

        def hashed(digest: str) -> Reply:
            try:
                if not self.folder.is_current(opened):
                    return error_reply(wire.UNAVAILABLE, "file changed while being hashed; try again")
            finally:
                opened.close()
            self.digests.put(st.version, digest)
            return Reply(wire.format_hash_status(st.size, st.version, digest), "OK")

        def failed(reason: Failure) -> Reply:
            opened.close()
            return error_reply(wire.UNAVAILABLE, "cannot read file")

        # A whole read of a file that may be large: off the reactor thread.
        d = self._run_blocking(lambda: _hash_file(opened.fd, st.size))
        return d.addCallbacks(hashed, failed)

    def _from_memory(
        self, data: bytes, start: int, digest: str, version: str, cache: str
    ) -> Reply:
        length = len(data) - start
        if start:
            digest = sha256_hex(memoryview(data)[start:])
        status = wire.format_get_status(length, version)
        if length <= INLINE_LIMIT:
            whole = b"".join((status, data[start:] if start else data, wire.format_end(digest)))
            return Reply(whole, "OK", None, cache, length)
        return Reply(status, "OK", MemoryBody(data, start, digest), cache, length)

    def _reserve_fill(self, path: str, size: int) -> bool:
        # One reader fills the cache per file, and the bytes being gathered
        # for the cache at once stay within its capacity.
        if not self.cache.admits(size) or path in self._filling:
            return False
        if sum(self._filling.values()) + size > self.cache.capacity:
            return False
        self._filling[path] = size
        return True

    def body_sent(self, body: Body, result: TransferResult) -> str | None:
        """
        A body went out whole.  Return the digest for its END line, or
        C{None} if the file changed while it was sent (the reply must then be
        cut off).  Fills the cache and the digest store from a clean read.
        """
        if isinstance(body, MemoryBody):
            return body.digest
        opened = body.opened
        try:
            current = self.folder.is_current(opened)
        finally:
            self._release(body)
        if not current:
            self.cache.discard(opened.path)
            return None
        digest = body.digest or result.digest
        if digest is None:  # pragma: no cover - send_file always hashes without one
            return None
        if body.start == 0:
            self.digests.put(opened.stat.version, digest)
            if body.fill and result.data is not None:
                entry = CacheEntry(
                    result.data, opened.stat.version, digest, opened.stat.mtime, opened.source
                )
                self.cache.insert(opened.path, entry)
        return digest

    def body_failed(self, body: Body) -> None:
        """A body could not be sent whole: release what it held."""
        if isinstance(body, DiskBody):
            self._release(body)

    def _release(self, body: DiskBody) -> None:
        body.opened.close()
        if body.fill:
            self._filling.pop(body.opened.path, None)

    # LIST and STATS

    def _list(self, cached: bool) -> Reply | Deferred[Reply]:
        if cached:
            rows = [
                wire.ListRow(len(entry.data), entry.mtime, True, path)
                for path, entry in self.cache
            ]
            return Reply(wire.format_list(rows), "OK")

        # What the cache holds now, looked up by encoded path in the disk
        # thread: the cache is small next to a large folder.
        in_cache = {path.encode("utf-8"): entry.version for path, entry in self.cache}
        quote = wire.quote_bytes

        def row(path: bytes, st: os.stat_result) -> tuple[bytes, bytes]:
            size = st.st_size
            mtime_ns = st.st_mtime_ns
            mark = b"-"
            if path in in_cache and in_cache[path] == version_token(st.st_ino, size, mtime_ns):
                mark = b"C"
            return path, b"%d %d %s %s\r\n" % (size, mtime_ns // 1_000_000_000, mark, quote(path))

        def listing() -> bytes:
            lines = self.folder.scan(row)
            return b"OK %d\r\n" % (len(lines),) + b"".join([line for _, line in lines])

        def listed(data: bytes) -> Reply:
            return Reply(data, "OK")

        def failed(reason: Failure) -> Reply:
            return error_reply(wire.UNAVAILABLE, "cannot list the shared folder")

        d = self._run_blocking(listing)
        return d.addCallbacks(listed, failed)

    def stats(self) -> list[tuple[str, int]]:
        cache = self.cache
        c = self.counters
        return [
            ("cache_bytes", cache.size),
            ("cache_capacity", cache.capacity),
            ("cache_files", len(cache)),
            ("hits", cache.hits),
            ("misses", cache.misses),
            ("evictions", cache.evictions),
            ("connections_active", c.connections_active),
            ("connections_total", c.connections_total),
            ("bytes_sent", c.bytes_sent),
            ("requests", c.requests),
        ]

    def _stats(self) -> Reply:
        return Reply(wire.format_stats(self.stats()), "OK")


def _read_whole(opened: OpenedFile) -> bytes:
    """
    Read a small file whole and check it still matches its stat.

    @raise Unreadable: on a read error, or if the file changed meanwhile.
    """
    size = opened.stat.size
    try:
        data = os.pread(opened.fd, size + 1, 0)
    except OSError as e:
        raise Unreadable(opened.path, e) from None
    if len(data) != size:
        raise Unreadable(opened.path, OSError(0, "file changed while being read"))
    return data


def _hash_file(fd: int, size: int) -> str:
    """SHA-256 of the first C{size} bytes of C{fd}; raise if it is shorter."""
    hasher = hashlib.sha256()
    position = 0
    while position < size:
        chunk = os.pread(fd, min(1 << 20, size - position), position)
        if not chunk:
            raise OSError(0, "file ended early")
        hasher.update(chunk)
        position += len(chunk)
    return hasher.hexdigest()
