"""
Blocking disk work off the reactor thread: a pool of threads fed one short
step at a time, where a step whose requester has gone is dropped unrun.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

T = TypeVar("T")


class BlockingRunner(Protocol):
    """
    Runs one blocking step off the reactor thread; a Deferred of its
    result.  Cancelling the Deferred before the step starts drops it.
    """

    def __call__(self, work: Callable[[], T]) -> Deferred[T]: ...


def run_now(work: Callable[[], T]) -> Deferred[T]:
    """Run blocking C{work} right away, on this thread (for tests)."""
    try:
        return succeed(work())
    except BaseException:  # noqa: BLE001 - the Deferred carries it, as with maybeDeferred
        return fail(Failure())


class _Step:
    """One queued step: run unless it was cancelled first."""

    __slots__ = ("cancelled", "work")

    def __init__(self, work: Callable[[], Any]) -> None:
        self.work = work
        self.cancelled = False


class DiskWork:
    """
    A thread pool for disk steps.  Every caller keeps each step short (a
    bounded number of directory entries, a bounded number of bytes), and a
    connection waits for its step before it asks for the next one, so the
    pool's first-in first-out queue takes the connections in turn: no
    client's long job holds the others back, and a step of a client who has
    left (its Deferred cancelled) is skipped when its turn comes.
    """

    def __init__(self, reactor: Any, threads: int = 4) -> None:
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=0, maxthreads=threads, name="filecache-disk")
        self._queued: set[_Step] = set()

    def start(self) -> None:
        self._pool.start()

    def stop(self) -> None:
        """Drop every step not yet started; wait for the running ones (each is short)."""
        for step in self._queued:
            step.cancelled = True
        self._pool.stop()

    def __call__(self, work: Callable[[], T]) -> Deferred[T]:
        step = _Step(work)

        def cancel(d: Deferred[T]) -> None:
            step.cancelled = True

        d: Deferred[T] = Deferred(cancel)
        reactor = self._reactor
        queued = self._queued
        queued.add(step)

        def deliver(ok: bool, result: Any) -> None:
            queued.discard(step)
            if d.called:  # cancelled meanwhile: its errback has run
                return
            if ok:
                d.callback(result)
            else:
                d.errback(result)

        def run() -> None:
            if step.cancelled:
                reactor.callFromThread(deliver, False, Failure(CancelledError()))
                return
            try:
                result = work()
            except BaseException:  # noqa: BLE001 - carried back to the reactor thread
                reactor.callFromThread(deliver, False, Failure())
            else:
                reactor.callFromThread(deliver, True, result)

        self._pool.callInThread(run)
        return d
