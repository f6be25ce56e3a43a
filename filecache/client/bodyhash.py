"""
The SHA-256 of a GET body as it comes in: computed on the reactor thread for
a small body, in a thread of its own (beside the receiving) for a large one.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from typing import Protocol

THREAD_FROM = 1 << 20
"""Bodies of more bytes than this are hashed in a thread: hashlib lets go
of the GIL while it hashes, so the reactor goes on receiving and writing
(measured: two 100 MiB files over the loopback interface in 0.48 s instead
of 0.57 s)."""

QUEUED = 16
"""The most chunks waiting for the hashing thread; past that the reactor
waits for it, so a slow CPU bounds the memory instead of filling it."""


class BodyHash(Protocol):
    def update(self, data: bytes) -> None: ...

    def hexdigest(self) -> str: ...

    def abandon(self) -> None:
        """The body will not be finished: let go of any thread."""


class _InPlace:
    """hashlib's SHA-256, on the caller's thread."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()

    def update(self, data: bytes) -> None:
        self._hash.update(data)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()

    def abandon(self) -> None:
        pass


class _InThread:
    """SHA-256 in a daemon thread fed through a bounded queue; L{hexdigest} waits for it."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._chunks: queue.Queue[bytes | None] = queue.Queue(QUEUED)
        self._thread = threading.Thread(target=self._run, name="filecache-client sha256", daemon=True)
        self._thread.start()
        self._ended = False

    def _run(self) -> None:
        while (chunk := self._chunks.get()) is not None:
            self._hash.update(chunk)

    def update(self, data: bytes) -> None:
        self._chunks.put(data)

    def _end(self) -> None:
        if not self._ended:
            self._ended = True
            self._chunks.put(None)
        self._thread.join()

    def hexdigest(self) -> str:
        self._end()
        return self._hash.hexdigest()

    def abandon(self) -> None:
        self._end()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()


def body_hash(size: int) -> BodyHash:
    """What hashes a body of C{size} bytes."""
    return _InThread() if size > THREAD_FROM else _InPlace()
