"""
Stopping on a signal: Stop records the first SIGINT or SIGTERM and cancels
the work under way; Interrupted says what was left undone.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred


class Interrupted(Exception):
    """
    A signal stopped the client before it was done.

    @ivar unfinished: lines saying what was left undone, for stderr.
    """

    def __init__(self, signum: int, unfinished: Sequence[str] = ()) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum
        self.unfinished = list(unfinished)


class Stop:
    """
    Whether a signal asked the client to stop, and the work it stops: the
    first SIGINT or SIGTERM cancels what the work is waiting on (no retry
    follows, partial files are kept); a second one ends the process at once.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._work: Deferred[Any] | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def watch(self, work: Deferred[Any]) -> None:
        self._work = work

    def request(self, signum: int) -> None:
        if self.signum is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        if self._work is not None and not self._work.called:
            self._work.cancel()
