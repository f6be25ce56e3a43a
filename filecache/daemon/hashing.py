"""
SHA-256 digests computed off the reactor thread, a bounded step at a time:
whole files (one read shared by every request for a version) and tails.
"""

from __future__ import annotations

import hashlib
import os

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from filecache.daemon.cache import DigestStore
from filecache.daemon.diskwork import BlockingRunner
from filecache.daemon.folder import OpenedFile, hash_range

HASH_STEP = 8 * 1024 * 1024
"""Bytes hashed per step in a disk thread: a step is a few milliseconds, so
the disk threads take the clients that wait on them in turn."""


class _SharedHash:
    """
    One whole-file hash in progress, shared by every request for the same
    version: the file is read once however many ask at once.
    """

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self.hasher = hashlib.sha256()
        self.position = 0
        self.waiters: list[Deferred[str]] = []

    def step(self) -> bool:
        """Hash the next piece (in a disk thread); C{True} when all is read."""
        size = self.size
        end = min(size, self.position + HASH_STEP)
        self.position = hash_range(self.fd, self.hasher, self.position, end)
        return self.position >= size


class Hashes:
    """Digests in progress, and where finished ones are remembered."""

    def __init__(self, run_blocking: BlockingRunner, digests: DigestStore) -> None:
        self._run_blocking = run_blocking
        self._digests = digests
        self._hashing: dict[str, _SharedHash] = {}

    def of_tail(self, data: bytes | bytearray, start: int) -> Deferred[str]:
        """The SHA-256 of C{data[start:]}, hashed a step at a time in the disk threads."""
        hasher = hashlib.sha256()
        view = memoryview(data)
        position = [start]

        def step() -> bool:
            end = min(len(view), position[0] + HASH_STEP)
            hasher.update(view[position[0] : end])
            position[0] = end
            return end >= len(view)

        def next_step(done: bool) -> str | Deferred[str]:
            if done:
                return hasher.hexdigest()
            return self._run_blocking(step).addCallback(next_step)

        return self._run_blocking(step).addCallback(next_step)

    def of_file(self, opened: OpenedFile) -> Deferred[str]:
        """
        The SHA-256 of the whole of C{opened}, read in steps in the disk
        threads; concurrent requests for the same version share one read.
        """
        version = opened.stat.version
        job = self._hashing.get(version)
        start = job is None
        if job is None:
            job = _SharedHash(os.dup(opened.fd), opened.stat.size)
            self._hashing[version] = job
        shared = job

        def cancel(d: Deferred[str]) -> None:
            if d in shared.waiters:
                shared.waiters.remove(d)

        waiter: Deferred[str] = Deferred(cancel)
        job.waiters.append(waiter)
        if start:
            self._run_job(version, job)
        return waiter

    def _run_job(self, version: str, job: _SharedHash) -> None:
        def finish(result: str | Failure) -> None:
            del self._hashing[version]
            os.close(job.fd)
            waiters, job.waiters = job.waiters, []
            if isinstance(result, str):
                self._digests.put(version, result)
            for waiter in waiters:
                if isinstance(result, str):
                    waiter.callback(result)
                else:
                    waiter.errback(result)

        def stepped(done: bool) -> None:
            if done:
                finish(job.hasher.hexdigest())
            elif not job.waiters:
                finish(Failure(OSError(0, "nobody waits for this hash")))
            else:
                self._run_blocking(job.step).addCallbacks(stepped, finish)

        self._run_blocking(job.step).addCallbacks(stepped, finish)
