"""
A LIST reply's body: rows produced a bounded step at a time in the disk
threads, as fast as the client takes them, and never more than that.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IConsumer, IDelayedCall, IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from filecache import wire
from filecache.daemon.diskwork import BlockingRunner
from filecache.daemon.walk import FolderWalk, WalkTooLarge


@dataclass(frozen=True)
class ListResult:
    """
    How a LIST body ended.

    @ivar rows: rows sent.
    @ivar sent: bytes written, the closing line included.
    @ivar error: what went wrong if the listing ended with an C{ERR} line.
    """

    rows: int
    sent: int
    error: str | None = None


def _nothing() -> None:
    pass


def _unknown() -> int | None:
    return None


KERNEL_QUEUE = 64 * 1024
"""No next step while more than this waits unsent in the kernel's send queue:
a socket's send buffer can grow to megabytes, and an unread listing would
otherwise walk that much of the folder before Twisted pushed back."""

_POLL_FIRST = 0.01
_POLL_MOST = 1.0

S = TypeVar("S")


@implementer(IPushProducer)
class SteppedBody(Generic[S]):
    """
    A body made a bounded step at a time in the disk threads and written as
    fast as the consumer takes it.  Registered as the consumer's push
    producer: while the consumer is paused, or the kernel's send queue holds
    more than L{KERNEL_QUEUE}, no step is asked for, so an unread body holds
    one step's bytes and whatever descriptors it reads from.

    A subclass says what a step is (L{_produce}, in a disk thread), what to
    do with its result (L{_took}, on the reactor thread: L{_write} and go on,
    or L{_finish}), how a failed body ends (L{_finish_error}) and what to
    release (L{_release}, which must be safe while a step runs in a thread).
    """

    _log = Logger()

    def __init__(self, run_blocking: BlockingRunner) -> None:
        self._run_blocking = run_blocking
        self._consumer: IConsumer | None = None
        self._on_progress: Callable[[], object] = _nothing
        self._done: Deferred[ListResult] | None = None
        self._step: Deferred[S] | None = None
        self._paused = False
        self._closed = False
        self._rows = 0
        self._sent = 0
        self._unsent: Callable[[], int | None] = _unknown
        self._call_later: Callable[[float, Callable[[], None]], IDelayedCall] | None = None
        self._poll: IDelayedCall | None = None
        self._poll_delay = _POLL_FIRST

    def send(
        self,
        consumer: IConsumer,
        on_progress: Callable[[], object] = _nothing,
        *,
        unsent: Callable[[], int | None] = _unknown,
        call_later: Callable[[float, Callable[[], None]], IDelayedCall] | None = None,
    ) -> Deferred[ListResult]:
        """
        Write the body to C{consumer}.  Fires with a L{ListResult}; fails
        with L{filecache.daemon.transfer.TransferFailed} if the consumer stops
        us (the connection was lost).

        @param unsent: the bytes waiting in the kernel's send queue (or
            C{None} if unknown); with C{call_later}, production waits while
            more than L{KERNEL_QUEUE} wait there, looking again a little
            later each time (up to once a second).
        """
        self._consumer = consumer
        self._on_progress = on_progress
        self._unsent = unsent
        self._call_later = call_later
        done: Deferred[ListResult] = Deferred()
        self._done = done
        consumer.registerProducer(self, True)
        self._next()
        return done

    # What a subclass says

    def _produce(self) -> S:
        """One step's work, in a disk thread."""
        raise NotImplementedError

    def _took(self, result: S) -> None:
        """A step's result, on the reactor thread: L{_write} it, or L{_finish}."""
        raise NotImplementedError

    def _finish_error(self, text: str) -> None:
        """End the body because of C{text}, with L{_finish}."""
        raise NotImplementedError

    def _release(self) -> None:
        """Close what the body reads from; called once, maybe while a step runs."""
        raise NotImplementedError

    # The steps

    def _next(self) -> None:
        if self._paused or self._step is not None or self._done is None or self._closed:
            return
        if self._call_later is not None:
            queued = self._unsent()
            if queued is not None and queued > KERNEL_QUEUE:
                if self._poll is None:
                    self._poll = self._call_later(self._poll_delay, self._look_again)
                    self._poll_delay = min(self._poll_delay * 2, _POLL_MOST)
                return
            self._poll_delay = _POLL_FIRST
        step = self._run_blocking(self._produce)
        self._step = step
        step.addCallbacks(self._got, self._failed)

    def _got(self, result: S) -> None:
        self._step = None
        if self._done is None:
            self._close()
            return
        self._took(result)
        self._next()

    def _failed(self, reason: Failure) -> None:
        self._step = None
        if self._done is None or reason.check(CancelledError):
            self._close()
            return
        if reason.check(WalkTooLarge):
            self._finish_error(str(reason.value))
            return
        if not reason.check(OSError):
            self._log.failure("listing the shared folder", reason)
        self._finish_error("cannot list the shared folder")

    def _write(self, data: bytes) -> None:
        """Write C{data} (not empty) and count it."""
        self._sent += len(data)
        assert self._consumer is not None
        self._consumer.write(data)

    def _finish(self, last: bytes, error: str | None) -> None:
        """Write C{last} (maybe empty), release everything and fire."""
        self._close()
        done, self._done = self._done, None
        consumer = self._consumer
        assert done is not None and consumer is not None
        consumer.unregisterProducer()
        if last:
            self._write(last)
        done.callback(ListResult(self._rows, self._sent, error))

    def discard(self) -> None:
        """The body will never be sent (its client has gone): release what it holds."""
        self._close()

    def _look_again(self) -> None:
        self._poll = None
        self._next()

    def _close(self) -> None:
        if self._poll is not None:
            self._poll.cancel()
            self._poll = None
        if not self._closed:
            self._closed = True
            self._release()

    # IPushProducer

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._on_progress()
        self._next()

    def stopProducing(self) -> None:
        from filecache.daemon.transfer import TransferFailed

        done, self._done = self._done, None
        if self._step is not None:
            # A step not yet started is dropped unrun; one under way closes
            # its descriptors itself when it returns.
            self._step.cancel()
        self._close()
        if done is not None:
            done.errback(Failure(TransferFailed("connection lost", self._sent)))


class ListBody(SteppedBody[list[bytes] | None]):
    """
    Streams the rows of a walk of the shared folder, then C{END <n>}; or,
    if the walk fails or passes its bounds, C{ERR unavailable ...} in place
    of C{END}.  An unread listing holds one step of rows and the walk's
    descriptors, whatever the folder's size (see L{SteppedBody}).

    @param marked: whether a file (UTF-8 path, stat) is in the cache now;
        called in a disk thread.
    """

    def __init__(
        self,
        walk: FolderWalk,
        marked: Callable[[bytes, os.stat_result], bool],
        run_blocking: BlockingRunner,
        max_rows: int = wire.MAX_LIST_ROWS,
    ) -> None:
        super().__init__(run_blocking)
        self._walk = walk
        self._marked = marked
        self._max_rows = max_rows

    def _row(self, path: bytes, st: os.stat_result) -> bytes:
        return wire.format_list_row(path, st.st_size, st.st_mtime_ns // 1_000_000_000, self._marked(path, st))

    def _produce(self) -> list[bytes] | None:
        return self._walk.next_rows(self._row)

    def _took(self, rows: list[bytes] | None) -> None:
        if rows is None:
            self._finish(wire.format_list_end(self._rows), None)
            return
        self._rows += len(rows)
        if self._rows > self._max_rows:
            self._finish_error(f"more than {self._max_rows} files")
            return
        if rows:
            self._write(b"".join(rows))

    def _finish_error(self, text: str) -> None:
        self._finish(wire.format_error(wire.UNAVAILABLE, f"listing stopped: {text}"), text)

    def _release(self) -> None:
        self._walk.close()
