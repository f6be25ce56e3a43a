"""
Running many transfers over a few connections: each lane is one connection;
small files share a lane, pipelined, and a large file has a lane to itself.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.python.failure import Failure

from filecache.client.download import Session

PIPELINE_DEPTH = 32
"""The most transfers one lane has under way at once (requests sent ahead)."""

PIPELINE_BYTES = 2 * 1024 * 1024
"""A lane takes more small files only while the files it has under way
add up to at most this; a larger file (or one of unknown size) has a lane
to itself, so that small files do not wait behind it."""


@dataclass(eq=False)
class Job:
    """One shared file to bring over.  C{size} is the listing's, or None for a bare NAME."""

    path: str
    size: int | None = None

    @property
    def large(self) -> bool:
        return self.size is None or self.size > PIPELINE_BYTES


@dataclass(eq=False)
class Lane:
    """One connection and the jobs under way on it."""

    number: int
    session: Session
    jobs: dict[Job, tuple[int, bool]] = field(default_factory=dict)
    """Under way: each job's size and largeness when it started (a bare NAME's size comes later)."""
    _bytes: int = 0
    _large: int = 0

    def add(self, job: Job) -> None:
        self.jobs[job] = (job.size or 0, job.large)
        self._bytes += job.size or 0
        self._large += job.large

    def remove(self, job: Job) -> None:
        size, large = self.jobs.pop(job)
        self._bytes -= size
        self._large -= large

    def fits(self, job: Job) -> bool:
        """Whether C{job} may start on this lane now."""
        if not self.jobs:
            return True
        if job.large or self._large:
            return False
        return len(self.jobs) < PIPELINE_DEPTH and self._bytes + (job.size or 0) <= PIPELINE_BYTES


def schedule_order(jobs: Iterable[Job]) -> list[Job]:
    """
    Large files first, the largest first (so that the longest transfers
    start at once, each on a lane of its own), then the rest in the order
    given.  Bare NAMEs (size unknown) keep their order.
    """
    jobs = list(jobs)
    known_large = sorted((j for j in jobs if j.large and j.size is not None), key=lambda j: -(j.size or 0))
    return known_large + [j for j in jobs if not (j.large and j.size is not None)]


Work = Callable[[Job, Lane], Coroutine[Any, Any, None]]


class Lanes:
    """
    Runs C{work(job, lane)} for every job, as many at once as the lanes
    take (L{Lane.fits}).  C{work} handles its job's errors itself; one it
    lets through stops the run and fails it.  L{halt} starts no more
    jobs; cancelling L{run}'s Deferred cancels every job under way.
    """

    def __init__(self, lanes: list[Lane], work: Work) -> None:
        self.lanes = lanes
        self._work = work
        self._pending: deque[Job] = deque()
        self._running: dict[Deferred[None], tuple[Job, Lane]] = {}
        self._done: Deferred[None] | None = None
        self._dispatching = False
        self._cancelling = False
        self._stopped: list[Job] = []
        self.halted = False

    @property
    def not_started(self) -> list[Job]:
        return list(self._pending)

    @property
    def under_way(self) -> list[Job]:
        """The jobs under way now, or, once the run was cancelled, those it stopped."""
        return self._stopped + [job for job, _ in self._running.values()]

    def run(self, jobs: Iterable[Job]) -> Deferred[None]:
        """Start C{jobs}; fire when every job has ended (or the run was halted and the rest ended)."""
        self._pending.extend(schedule_order(jobs))
        self._done = Deferred(lambda d: self._cancel_all())
        done = self._done
        self._dispatch()
        return done

    def halt(self) -> None:
        """Start no more jobs: those under way finish, the rest stay in L{not_started}."""
        self.halted = True

    def _cancel_all(self) -> None:
        # Deferred.cancel fails the run with CancelledError once this returns.
        self._cancelling = True
        self.halted = True
        self._stopped = self.under_way
        for running in list(self._running):
            running.cancel()

    def _dispatch(self) -> None:
        if self._dispatching:
            return  # a job ended while another was being started: the loop below goes on
        self._dispatching = True
        try:
            while self._pending and not self.halted:
                job = self._pending[0]
                lane = min(self.lanes, key=lambda lane: len(lane.jobs))
                if not lane.fits(job):
                    lane = next((other for other in self.lanes if other.fits(job)), lane)
                    if not lane.fits(job):
                        break
                self._pending.popleft()
                self._start(job, lane)
        finally:
            self._dispatching = False
        self._maybe_done()

    def _start(self, job: Job, lane: Lane) -> None:
        lane.add(job)
        running = Deferred.fromCoroutine(self._work(job, lane))
        if running.called:
            # Done already (a file found up to date): no need to track it.
            lane.remove(job)
            running.addErrback(self._failed)
            return
        self._running[running] = (job, lane)
        running.addBoth(self._ended, running)

    def _ended(self, result: object, running: Deferred[None]) -> None:
        job, lane = self._running.pop(running)
        lane.remove(job)
        if isinstance(result, Failure):
            self._failed(result)
        self._dispatch()

    def _failed(self, failure: Failure) -> None:
        done = self._done
        if failure.check(CancelledError) or done is None or done.called:
            return
        self.halted = True
        done.errback(failure)

    def _maybe_done(self) -> None:
        done = self._done
        if done is None or done.called or self._running or self._cancelling:
            return
        if self._pending and not self.halted:
            return
        done.callback(None)
