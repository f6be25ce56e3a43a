"""
The HTTP/1.1 adapter: request heads in, the shared responder's answers out
(docs/http.md).  A connection becomes an HTTP session on its first line and
stays one; the connection itself (reading, timers, streaming, the access
log) is the native protocol's (L{filecache.daemon.native}).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from filecache import wire
from filecache.daemon.bodies import FileAnswer, Sent
from filecache.daemon.httphead import (
    MAX_HEADER_LINE,
    HeadReader,
    HttpError,
    RequestHead,
    Target,
    parse_request_line,
    parse_target,
    wants_json,
    with_request_line,
)
from filecache.daemon.httpkept import HEAD_MEMO_SIZE, KnownRequests
from filecache.daemon.httpreply import (
    UNSATISFIABLE,
    check_conditions,
    content_type,
    error_response,
    etag_for,
    format_head,
    http_date,
    if_range_allows,
    parse_range,
    repr_digest,
)
from filecache.daemon.listing import ListResult
from filecache.daemon.metrics import CONTENT_TYPE_LATEST, on_main_port
from filecache.daemon.responder import INLINE_LIMIT, Reply
from filecache.daemon.transfer import TransferFailed

if TYPE_CHECKING:
    from filecache.daemon.metrics import DaemonMetrics
    from filecache.daemon.native import FileCacheProtocol

_ALLOW = [("Allow", "GET, HEAD")]

HEALTH_PATH = b"/.filecache/health"
"""Where a load balancer asks whether this daemon serves (docs/http.md): a
dot path, so no shared file can ever have it."""
_UNREADABLE = "file cannot be read now; try again"


class _Exchange:
    """One request being answered: what the access log and the head need."""

    __slots__ = ("head", "head_only", "keep", "started")

    def __init__(self, head: RequestHead, keep: bool, started: float) -> None:
        self.head = head
        self.keep = keep
        self.head_only = head.method == b"HEAD"
        self.started = started

    @property
    def label(self) -> bytes:
        """The request as the access log shows it."""
        head = self.head
        return b"HTTP/1.%d %s %s" % (head.version[1], head.method, head.target[:200])


def _body_length(response: bytes) -> int:
    """The body bytes of a whole response written at once."""
    return len(response) - response.index(b"\r\n\r\n") - 4


def _plain(head: RequestHead) -> bool:
    """A GET that asks for no range and sets no condition."""
    for name, _ in head.fields:
        if name == b"range" or name[:3] == b"if-":
            return False
    return True


class HttpSession:
    """The HTTP side of one connection: reads heads, answers them one at a time."""

    _log = Logger()

    def __init__(self, connection: FileCacheProtocol, buffered: bytes = b"") -> None:
        self._conn = connection
        factory = connection.factory
        self._factory = factory
        self._responder = factory.responder
        self._reader = HeadReader()
        self._buffer = buffered
        self._busy = False
        self._asked_head = False
        self._plain: KnownRequests[bytes] = factory.http_plain
        self._replies = factory.replies

    @property
    def head_open(self) -> bool:
        """Whether part of a request head has arrived (the timer is not reset by it)."""
        return self._reader.started or bool(self._buffer)

    # Reading

    def data_received(self, data: bytes) -> None:
        """
        Bytes from the connection: heads are read a line at a time while
        the connection is not paused (a reply under way, or a full send
        buffer); the rest waits here.  A reply that ends while a line is
        being answered resumes the connection, which calls this again: that
        call only adds its bytes, and the loop already running goes on.
        """
        if self._busy:
            if data:
                self._buffer += data
            return
        if not self._buffer and self._plain.get(data) is not None and self._fast(data):
            return
        if data:
            self._buffer += data
        self._busy = True
        conn = self._conn
        try:
            while self._buffer and not conn.paused:
                transport = conn.transport
                if transport is None or getattr(transport, "disconnecting", False):
                    self._buffer = b""
                    return
                buffer = self._buffer
                if not self._reader.started:
                    end = buffer.find(b"\r\n\r\n", 0, HEAD_MEMO_SIZE)
                    if end >= 0:
                        # A whole head: parsed once, kept by its bytes.
                        self._buffer = buffer[end + 4 :]
                        self._whole_head(buffer[: end + 4])
                        continue
                end = buffer.find(b"\n")
                if end < 0:
                    if len(buffer) > MAX_HEADER_LINE + 1:
                        self._buffer = b""
                        self.line_too_long(buffer[:8])
                    return
                self._buffer = buffer[end + 1 :]
                if end > MAX_HEADER_LINE + 1:
                    self._buffer = b""
                    self.line_too_long(buffer[:8])
                    return
                self.line_received(buffer[:end])
        finally:
            self._busy = False

    def _whole_head(self, block: bytes) -> None:
        heads = self._factory.http_heads
        end = block.find(b"\n")
        line, fields = block[:end], block[end + 1 :]
        if line[-1:] == b"\r":
            line = line[:-1]
        self._asked_head = line.startswith(b"HEAD ")
        head = None
        if line:
            try:
                method, target, version = parse_request_line(line)
            except HttpError as e:
                self._refuse(e.status, e.message)
                return
            known = heads.get(version, fields)
            if known is not None:
                head = with_request_line(known, method, target)
        if head is None:
            try:
                for part in block.split(b"\n")[:-1]:
                    head = self._reader.feed(part)
            except HttpError as e:
                self._refuse(e.status, e.message)
                return
            if head is None:
                return  # only empty lines, which may come before a request
            if line:
                heads.keep(fields, head)
        if head.method == b"GET" and head.version == (1, 1) and head.keep_alive and _plain(head):
            self._plain.keep(block, head.target)
        self._conn.request_arrived()
        self._request(head)

    def _fast(self, block: bytes) -> bool:
        """
        Answer a read that is exactly one plain GET head seen before, from
        a kept response still current, with no parsing: what L{_request}
        and L{_ready} would do for it, the same bytes out.  C{False} (nothing
        done) when there is no such response or the connection cannot take
        it now; the caller then reads the head the long way.
        """
        conn = self._conn
        factory = self._factory
        target = self._plain.get(block)
        ready = factory.http_ready.get(target) if target is not None else None
        if ready is None or conn.paused or self._reader.started or factory.draining or factory.access_log:
            return False
        transport = conn.transport
        if transport is None or getattr(transport, "disconnecting", False):
            return False
        entry, path, head, body = ready
        responder = self._responder
        if not responder.still_hit(path, entry):
            return False
        conn.request_arrived()
        responder.count_request(http=True)
        responder.count_sent(len(body))
        self._replies.fast += 1
        conn.write_whole(b"".join((head, b"Date: ", factory.dates.now(), b"\r\n\r\n", body)))
        return True

    def line_received(self, line: bytes) -> None:
        if not self._reader.started:
            # A refusal of a HEAD request has no body either (RFC 9112 6.3).
            self._asked_head = line.startswith(b"HEAD ")
        try:
            head = self._reader.feed(line)
        except HttpError as e:
            self._refuse(e.status, e.message)
            return
        if head is not None:
            self._conn.request_arrived()
            self._request(head)

    def line_too_long(self, start: bytes = b"") -> None:
        """A line longer than the limit; C{start}: its first bytes, if it is a request line."""
        if self._reader.started:
            self._refuse(431, "header line too long")
        else:
            self._asked_head = start.startswith(b"HEAD ")
            self._refuse(414, "request line too long")

    def _refuse(self, status: int, message: str) -> None:
        """A head that cannot be read: answered, logged, and the connection closed."""
        conn = self._conn
        self._responder.count_request(http=True)
        data = error_response(
            status, message, date=self._factory.dates.now(), close=True, head_only=self._asked_head
        )
        conn.write_whole(data)
        conn.access(b"HTTP (malformed)", str(status), _body_length(data), self._factory.clock.seconds(), "-")
        conn.transport.loseConnection()

    # Answering

    def _request(self, head: RequestHead) -> None:
        factory = self._factory
        self._responder.count_request(http=True)
        ex = _Exchange(head, head.keep_alive and not factory.draining, factory.clock.seconds())
        if head.method == b"GET" and ex.keep and head.version == (1, 1) and self._ready(ex):
            return
        if factory.metrics is not None and on_main_port(head.target):
            # Before the file lookup: a shared file named "metrics" at the
            # folder's root is not served over HTTP while this is on.
            self._metrics(ex, factory.metrics)
            return
        if head.method != b"GET" and head.method != b"HEAD":
            self._simple(ex, 405, "only GET and HEAD are served", _ALLOW)
            return
        if head.target == HEALTH_PATH:
            self._health(ex)
            return
        try:
            target = parse_target(head.target)
        except HttpError as e:
            ex.keep = False
            self._simple(ex, e.status, e.message)
            return
        if target.folder:
            self._listing(ex, target)
            return
        found = self._responder.lookup(target.path)
        if isinstance(found, Deferred):
            self._conn.wait(
                found,
                lambda answer: self._file(ex, target, answer),
                lambda reason: self._internal_error(ex, reason),
            )
        else:
            self._file(ex, target, found)

    def _health(self, ex: _Exchange) -> None:
        """
        The load balancer's check: C{200 ok} while serving, C{503} once
        draining (so the balancer stops sending new requests while replies
        in flight finish).  No disk, no cache: it says the process answers.
        """
        if self._factory.draining:
            self._simple(ex, 503, "draining", [("Retry-After", "1"), ("Cache-Control", "no-store")])
        else:
            self._simple(ex, 200, "ok", [("Cache-Control", "no-store")])

    def _ready(self, ex: _Exchange) -> bool:
        """Send a kept response if there is one for this request, still current."""
        ready = self._factory.http_ready.get(ex.head.target)
        if ready is None or not _plain(ex.head):
            return False
        entry, path, head, body = ready
        if not self._responder.still_hit(path, entry):
            return False
        self._responder.count_sent(len(body))
        self._finish(ex, 200, b"".join((head, b"Date: ", self._factory.dates.now(), b"\r\n\r\n", body)), len(body), "hit")
        return True

    def _metrics(self, ex: _Exchange, metrics: DaemonMetrics) -> None:
        """The daemon's metrics in the Prometheus text format (docs/operations.md)."""
        if ex.head.method != b"GET" and ex.head.method != b"HEAD":
            self._simple(ex, 405, "only GET and HEAD are served", _ALLOW)
            return
        body = metrics.exposition()
        fields = [
            ("Content-Type", CONTENT_TYPE_LATEST),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
        ]
        if ex.head_only:
            self._finish(ex, 200, self._head(ex, 200, fields), 0, "-")
            return
        self._finish(ex, 200, self._head(ex, 200, fields) + body, len(body), "-")

    def _internal_error(self, ex: _Exchange, reason: Failure) -> None:
        self._log.failure("Error answering {request}", reason, request=wire.printable_bytes(ex.label))
        ex.keep = False
        self._simple(ex, 500, "internal error")

    def _file(self, ex: _Exchange, target: Target, found: FileAnswer | Reply) -> None:
        if isinstance(found, Reply):
            self._not_a_file(ex, target, found)
            return
        answer = found
        etag = etag_for(answer.version)
        condition = check_conditions(ex.head, etag, answer.mtime)
        if condition is not None:
            answer.close()
            if condition == 412:
                self._simple(ex, 412, "precondition failed")
            else:
                self._finish(ex, 304, self._head(ex, 304, [("ETag", etag), self._modified(answer)]), 0, "-")
            return
        size = answer.size
        start, end, status = 0, size, 200
        fields = []
        asked = ex.head.get(b"range")
        if asked is not None and if_range_allows(ex.head, etag, answer.mtime):
            chosen = parse_range(asked, size)
            if chosen is UNSATISFIABLE:
                answer.close()
                self._simple(ex, 416, "range not satisfiable", [("Content-Range", f"bytes */{size}")])
                return
            if isinstance(chosen, tuple):
                start, end, status = chosen[0], chosen[1] + 1, 206
                fields.append(("Content-Range", f"bytes {start}-{end - 1}/{size}"))
        fields += [
            ("Content-Length", str(end - start)),
            ("Content-Type", content_type(answer.path)),
            self._modified(answer),
            ("ETag", etag),
            ("Accept-Ranges", "bytes"),
        ]
        if answer.digest is not None:
            fields.append(("Repr-Digest", repr_digest(answer.digest)))
        if ex.head_only:
            answer.close()
            self._finish(ex, status, self._head(ex, status, fields), 0, answer.cache)
            return
        if answer.data is not None and end - start <= INLINE_LIMIT:
            answer.count_sent(end - start)
            body = bytes(answer.data[start:end])
            if status == 200 and ex.keep and ex.head.version == (1, 1) and answer.entry is not None:
                # Built once, kept beside the entry: the next plain GET of this
                # target sends it as it is, with a new Date.
                self._factory.http_ready.keep(
                    ex.head.target, answer.entry, answer.path, format_head(200, fields[:])[:-2], body
                )
            self._finish(ex, status, self._head(ex, status, fields) + body, end - start, answer.cache)
            return
        self._conn.stream(self._head(ex, status, fields), answer.body(start, end)).addCallbacks(
            self._body_sent,
            self._body_failed,
            callbackArgs=(ex, status, answer),
            errbackArgs=(ex, status, answer),
        )

    def _not_a_file(self, ex: _Exchange, target: Target, reply: Reply) -> None:
        if reply.status != "ERR " + wire.NOT_FOUND:
            self._simple(ex, 503, _UNREADABLE, [("Retry-After", "1")])
        elif self._responder.folder.is_folder(target.path):
            location = "/" + wire.quote_path(target.path).decode("ascii") + "/"
            if target.query:
                location += "?" + target.query
            self._simple(ex, 301, "moved to " + location, [("Location", location)])
        else:
            self._simple(ex, 404, "no such file")

    @staticmethod
    def _modified(answer: FileAnswer) -> tuple[str, str]:
        return ("Last-Modified", http_date(answer.mtime))

    def _head(self, ex: _Exchange, status: int, fields: list[tuple[str, str]]) -> bytes:
        """The response head, with Date and what the connection will do after it."""
        if self._factory.draining:
            ex.keep = False
        fields.append(("Date", self._factory.dates.now().decode("ascii")))
        if not ex.keep:
            fields.append(("Connection", "close"))
        elif ex.head.version == (1, 0):
            fields.append(("Connection", "keep-alive"))
        return format_head(status, fields)

    def _simple(self, ex: _Exchange, status: int, message: str, extra: list[tuple[str, str]] | None = None) -> None:
        """A short text answer (an error, a redirect), written whole."""
        if self._factory.draining:
            ex.keep = False
        data = error_response(
            status,
            message,
            date=self._factory.dates.now(),
            close=not ex.keep,
            head_only=ex.head_only,
            extra=(extra or []) + ([("Connection", "keep-alive")] if ex.keep and ex.head.version == (1, 0) else []),
        )
        self._finish(ex, status, data, _body_length(data), "-")

    def _finish(self, ex: _Exchange, status: int, data: bytes, sent: int, cache: str) -> None:
        conn = self._conn
        if conn.transport is None or not conn.connected:
            conn.gone()
            return
        conn.write_whole(data)
        self._access(ex, str(status), sent, ex.started, cache)
        if ex.keep:
            conn.finish_simple()
        else:
            conn.transport.loseConnection()

    def _access(self, ex: _Exchange, status: str, sent: int, started: float, cache: str) -> None:
        self._conn.access(ex.label, status, sent, started, cache)

    def _body_sent(self, sent: Sent, ex: _Exchange, status: int, answer: FileAnswer) -> None:
        conn = self._conn
        if sent.changed:
            self._log.warn(
                "{path} changed while being sent to {peer}; connection closed",
                path=wire.printable(answer.path),
                peer=conn.peer,
            )
            self._access(ex, f"{status}-changed", sent.sent, ex.started, answer.cache)
            conn.transport.loseConnection()
            return
        self._access(ex, str(status), sent.sent, ex.started, answer.cache)
        self._after_stream(ex)

    def _after_stream(self, ex: _Exchange) -> None:
        if ex.keep:
            self._conn.reply_done()
        else:
            self._conn.transport.loseConnection()

    def _body_failed(self, reason: Failure, ex: _Exchange, status: int, answer: Any) -> None:
        sent = reason.value.sent if isinstance(reason.value, TransferFailed) else 0
        conn = self._conn
        self._access(ex, f"{status}-cut", sent, ex.started, getattr(answer, "cache", "-"))
        if conn.transport is not None and conn.connected:
            conn.transport.abortConnection()

    # Folders

    def _listing(self, ex: _Exchange, target: Target) -> None:
        as_json = wants_json(ex.head, target)
        chunked = ex.head.version >= (1, 1)
        page = self._responder.folder_page(target.path.rstrip("/"), "json" if as_json else "html", chunked)
        if isinstance(page, Reply):
            self._simple(ex, 404, "no such folder")
            return
        if not chunked:
            ex.keep = False  # the end of the body is the end of the connection
        fields = [
            ("Content-Type", "application/json" if as_json else "text/html; charset=utf-8"),
            ("Vary", "Accept"),
            ("Cache-Control", "no-cache"),
        ]
        if chunked:
            fields.append(("Transfer-Encoding", "chunked"))
        head = self._head(ex, 200, fields)
        if ex.head_only:
            page.discard()
            self._finish(ex, 200, head, 0, "-")
            return
        self._conn.stream_steps(head, page).addCallbacks(
            self._page_sent, self._body_failed, callbackArgs=(ex,), errbackArgs=(ex, 200, None)
        )

    def _page_sent(self, result: ListResult, ex: _Exchange) -> None:
        conn = self._conn
        if result.error is not None:
            self._access(ex, "200-cut", result.sent, ex.started, "-")
            conn.transport.loseConnection()
            return
        self._access(ex, "200", result.sent, ex.started, "-")
        self._after_stream(ex)
