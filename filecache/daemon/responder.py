"""
What the daemon answers: turns parsed requests into replies over the shared
folder and the cache, and decides what enters the cache.  No transport here.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from filecache import __version__, wire
from filecache.daemon.bodies import DiskBody, FileAnswer, MemoryBody, Stores
from filecache.daemon.cache import CacheEntry, DigestStore, ICache, policy_name
from filecache.daemon.diskwork import BlockingRunner, run_now
from filecache.daemon.folder import (
    SETTLE,
    NotShared,
    OpenedFile,
    SharedFolder,
    Unreadable,
    version_token,
)
from filecache.daemon.freshness import Freshness, StatFreshness
from filecache.daemon.hashing import Hashes
from filecache.daemon.listing import ListBody
from filecache.daemon.pages import FolderPage

__all__ = ["BlockingRunner", "run_now"]  # where they were before diskwork.py

R = TypeVar("R")

BUILT_BUDGET = 8 * 1024 * 1024
"""Bytes of whole small-file replies kept ready for the next hit."""

INLINE_LIMIT = 64 * 1024
"""Bodies up to this size are sent in one write together with their status
and END lines: one segment on the wire, no producer to set up."""

def sha256_hex(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


Body = MemoryBody | DiskBody | ListBody


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
    """The figures of answers that the cache does not keep."""

    bytes_sent: int = 0
    requests: int = 0
    http_requests: int = 0


class Responder:
    """
    Answers requests for one shared folder through one shared cache.

    @param run_blocking: runs a short blocking step off the reactor thread
        and returns a Deferred of its result (L{run_now} runs it in place).
    """

    def __init__(
        self,
        folder: SharedFolder,
        cache: ICache,
        run_blocking: BlockingRunner = run_now,
        *,
        reactor: IReactorTime | None = None,
        settle: float = SETTLE,
        worker: int = 0,
        freshness: Freshness | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = cast(IReactorTime, global_reactor)
        self.folder = folder
        self.cache = cache
        self.freshness: Freshness = freshness if freshness is not None else StatFreshness()
        cache.on_drop = self.freshness.forget
        self.counters = Counters()
        self.digests = DigestStore()
        self._run_blocking = run_blocking
        self._stores = Stores(folder, cache, self.digests, self.count_sent)
        self._more_figures: list[Callable[[], list[tuple[str, int]]]] = []
        self._built: OrderedDict[str, tuple[CacheEntry, bytes]] = OrderedDict()
        self._built_bytes = 0
        self._hashes = Hashes(run_blocking, self.digests)
        self._reactor = reactor
        self._settle = settle
        self._started = reactor.seconds()
        self._worker = worker

    def respond(self, request: wire.Request) -> Reply | Deferred[Reply] | None:
        """
        The reply to C{request}; C{None} for QUIT, whose answer is closing the
        connection (the protocol's business).  Every request counts.
        """
        self.counters.requests += 1
        if isinstance(request, wire.QuitRequest):
            return None
        if isinstance(request, wire.GetRequest):
            return self._get(request)
        if isinstance(request, wire.HashRequest):
            return self._hash(request.path)
        if isinstance(request, wire.ListRequest):
            return self._list(request.cached)
        return self._stats()

    # GET

    def _get(self, request: wire.GetRequest) -> Reply | Deferred[Reply]:
        path = request.path
        hit = self._cached(path)
        if hit is not None:
            entry, size = hit
            if request.offset > size:
                return error_reply(wire.BAD_REQUEST, "offset past the end of the file")
            if request.offset == 0:
                built = self._built.get(path)
                if built is not None and built[0] is entry:
                    return Reply(built[1], "OK", None, "hit", size)
            reply = self._from_memory(entry.data, request.offset, entry.digest, entry.version, "hit")
            if request.offset == 0 and isinstance(reply, Reply) and reply.body is None:
                self._keep_built(path, entry, reply.data)
            return reply
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
            return self._small(opened, request.offset)
        whole = request.offset == 0
        known_digest = self.digests.get(st.version) if whole else None
        fill = whole and self._stores.reserve_fill(path, st.size)
        length = st.size - request.offset
        body = DiskBody(opened, request.offset, length, known_digest, fill, self._stores)
        return Reply(
            wire.format_get_status(length, st.version), "OK", body, "miss", length
        )

    def _small(self, opened: OpenedFile, offset: int) -> Reply | Deferred[Reply]:
        """A small file read whole (L{_read_small}), answered from memory."""

        def answer(entry: CacheEntry) -> Reply:
            reply = self._from_memory(entry.data, offset, entry.digest, entry.version, "miss")
            assert isinstance(reply, Reply)  # a small body is never hashed in steps
            return reply

        return self._read_small(opened, answer)

    def _read_small(self, opened: OpenedFile, then: Callable[[CacheEntry], R]) -> R | Reply | Deferred[R | Reply]:
        """
        C{then} of the cache entry of a small file read whole on this
        thread, and closes it.  One that changed less than C{settle} seconds
        ago is read again once that time has passed, and both reads must
        agree: only then is it a whole version.
        """
        try:
            data = self.folder.read_whole(opened)
        except Unreadable as e:
            opened.close()
            return error_reply(wire.UNAVAILABLE, f"cannot read file: {e.error.strerror}")
        age = time.time_ns() - opened.stat.ctime_ns
        wait = min(self._settle, self._settle - age / 1e9)
        if wait <= 0:
            opened.close()
            return then(self._keep_small(opened, data))

        def again() -> R | Reply:
            try:
                if self.folder.read_whole(opened) != data:
                    raise Unreadable(opened.path, OSError(0, "file changed while being read; try again"))
            except Unreadable as e:
                return error_reply(wire.UNAVAILABLE, f"cannot read file: {e.error.strerror}")
            finally:
                opened.close()
            return then(self._keep_small(opened, data))

        def cancelled(reason: Failure) -> Failure:
            opened.close()  # the client left before the second read
            return reason

        return deferLater(self._reactor, wait, again).addErrback(cancelled)

    def _keep_small(self, opened: OpenedFile, data: bytes) -> CacheEntry:
        st = opened.stat
        entry = CacheEntry(data, st.version, sha256_hex(data), st.mtime, opened.source, st.state)
        self.cache.insert(opened.path, entry)
        return entry

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
        folder when it was read; the same inode, size and times mean the
        same file.
        """
        entry = self.cache.peek(path)
        if entry is None or not entry.source:
            return None
        if not self.freshness.holds(entry):
            return None
        if self.cache.lookup(path, entry.version) is None:  # counts the hit
            return None  # pragma: no cover - the entry was just seen
        return entry, len(entry.data)

    def _from_memory(
        self, data: bytes | bytearray, start: int, digest: str, version: str, cache: str
    ) -> Reply | Deferred[Reply]:
        length = len(data) - start
        status = wire.format_get_status(length, version)
        if start and length > INLINE_LIMIT:
            # The digest of a tail: hashed in the disk threads, a step at a
            # time, never on the reactor thread.
            def hashed(tail_digest: str) -> Reply:
                body = MemoryBody(data, start, tail_digest, self.count_sent)
                return Reply(status, "OK", body, cache, length)

            return self._hashes.of_tail(data, start).addCallback(hashed)
        if start:
            digest = sha256_hex(memoryview(data)[start:])
        if length <= INLINE_LIMIT:
            whole = b"".join((status, data[start:] if start else data, wire.format_end(digest)))
            return Reply(whole, "OK", None, cache, length)
        return Reply(status, "OK", MemoryBody(data, start, digest, self.count_sent), cache, length)

    def kept_hit(self, path: str) -> bytes | None:
        """
        The whole native reply to C{GET path 0} if it is kept and its
        entry is still current (a request and a hit counted, its body as
        sent); C{None} if not: the request must be answered the long way.
        """
        built = self._built.get(path)
        if built is None or not self.still_hit(path, built[0]):
            return None
        self.counters.requests += 1
        self.count_sent(len(built[0].data))
        return built[1]

    def _keep_built(self, path: str, entry: CacheEntry, data: bytes) -> None:
        # The whole reply to a hit, kept beside its entry (checked by
        # identity, so a new version never meets an old reply), oldest
        # dropped past BUILT_BUDGET bytes: it saves building the same
        # status line, body copy and END on every hit of a small file.
        old = self._built.pop(path, None)
        if old is not None:
            self._built_bytes -= len(old[1])
        self._built[path] = (entry, data)
        self._built_bytes += len(data)
        while self._built_bytes > BUILT_BUDGET:
            _, (_, dropped) = self._built.popitem(last=False)
            self._built_bytes -= len(dropped)

    # Files for protocols that pick their own ranges (HTTP)

    def lookup(self, path: str) -> FileAnswer | Reply | Deferred[FileAnswer | Reply]:
        """
        The shared file C{path} as a L{FileAnswer}, or the error reply that
        says why not (C{ERR not-found} or C{ERR unavailable}).  Small files
        and hits are answered from memory, as a native C{GET} is.
        """
        hit = self._cached(path)
        if hit is not None:
            return self._answer_from(path, hit[0], "hit")
        opened = self._open(path)
        if isinstance(opened, Reply):
            return opened
        st = opened.stat
        known = self.cache.lookup(path, st.version)
        if known is not None:
            opened.close()
            return self._answer_from(path, known, "hit")
        if st.size <= INLINE_LIMIT:
            return self._read_small(opened, lambda entry: self._answer_from(path, entry, "miss"))
        return FileAnswer(
            path, st.size, st.version, st.mtime, self.digests.get(st.version), "miss", self._stores, opened=opened
        )

    def _answer_from(self, path: str, entry: CacheEntry, cache: str) -> FileAnswer:
        return FileAnswer(
            path,
            len(entry.data),
            entry.version,
            entry.mtime,
            entry.digest,
            cache,
            self._stores,
            data=entry.data,
            entry=entry,
        )

    def still_hit(self, path: str, entry: CacheEntry) -> bool:
        """
        Whether C{entry} is still C{path}'s cache entry and its file on
        disk is still the one it was read from (counted as a hit if so): a
        response an adapter built from it may be sent again.
        """
        hit = self._cached(path)
        return hit is not None and hit[0] is entry

    def count_request(self, http: bool = False) -> None:
        """A request answered by an adapter that does not go through L{respond}."""
        self.counters.requests += 1
        if http:
            self.counters.http_requests += 1

    def count_sent(self, count: int) -> None:
        self.counters.bytes_sent += count

    def delivered(self, reply: Reply) -> None:
        """A reply without a body went out whole (its body bytes count as sent)."""
        self.count_sent(reply.size)

    def malformed(self, code: str, message: str) -> Reply:
        """The reply to a request line that could not be parsed (it counts as a request)."""
        self.counters.requests += 1
        return error_reply(code, message)

    # HASH

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
            return Reply(wire.format_hash_status(st.size, st.version, digest), "OK")

        def failed(reason: Failure) -> Reply | Failure:
            opened.close()
            if reason.check(Unreadable, OSError):
                return error_reply(wire.UNAVAILABLE, "cannot read file")
            return reason  # cancelled: the client has gone

        return self._hashes.of_file(opened).addCallbacks(hashed, failed)

    # LIST and STATS

    def _list(self, cached: bool) -> Reply:
        if cached:
            rows = [
                wire.ListRow(len(entry.data), entry.mtime, True, path)
                for path, entry in self.cache
            ]
            return Reply(wire.format_list(rows), "OK")
        return Reply(wire.LIST_STATUS, "OK", ListBody(self.folder.walk(), self._marked, self._run_blocking))

    def _marked(self, path: bytes, st: os.stat_result) -> bool:
        """Whether the file at C{path} (UTF-8), in the state C{st}, is in the cache now."""
        # Called in a disk thread: one dict lookup, atomic under the GIL.
        cache = self.cache
        if not len(cache):
            return False
        entry = cache.peek(path.decode("utf-8"))
        return entry is not None and entry.version == version_token(st)

    def folder_page(self, path: str, form: str, chunked: bool) -> FolderPage | Reply:
        """
        The listing of the shared folder C{path} (C{""}: the root) for HTTP,
        in C{form} (C{"html"} or C{"json"}); C{ERR not-found} if it is not
        a shared folder.
        """
        try:
            opened = self.folder.open_folder(path)
        except NotShared:
            return error_reply(wire.NOT_FOUND, "no such folder")
        except Unreadable as e:
            return error_reply(wire.UNAVAILABLE, f"cannot read folder: {e.error.strerror}")
        return FolderPage(opened, path, form, chunked=chunked, run_blocking=self._run_blocking, marked=self._marked)

    def add_figures(self, source: Callable[[], list[tuple[str, int]]]) -> None:
        """Report C{source()}'s rows in STATS too (the connection figures, say)."""
        self._more_figures.append(source)

    def stats(self) -> list[tuple[str, wire.StatValue]]:
        cache = self.cache
        c = self.counters
        more = [row for source in self._more_figures for row in source()]
        return [
            ("cache_bytes", cache.size),
            ("cache_capacity", cache.capacity),
            ("cache_policy", policy_name(cache)),
            ("cache_files", len(cache)),
            ("hits", cache.hits),
            ("misses", cache.misses),
            ("evictions", cache.evictions),
            *self.freshness.figures(),
            *more,
            ("bytes_sent", c.bytes_sent),
            ("requests", c.requests),
            ("http_requests", c.http_requests),
            ("uptime_seconds", int(self._reactor.seconds() - self._started)),
            ("version", __version__),
            ("worker", self._worker),
            ("pid", os.getpid()),
        ]

    def _stats(self) -> Reply:
        return Reply(wire.format_stats(self.stats()), "OK")

