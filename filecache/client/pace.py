"""
The pace a reply must keep under C{--timeout}: its status line within one
window of the request, then at least MIN_PROGRESS bytes in every window.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall

MIN_PROGRESS = 16 * 1024
"""Once a reply's status line is in, every C{timeout} window must bring at
least this many bytes of it, or its end."""


class Pace:
    """
    What C{--timeout} bounds beyond silence: a reply's status line must be
    whole within C{period} of its request, and from then on every C{period}
    must bring at least L{MIN_PROGRESS} bytes of the reply, or its end.  A
    server that sends a byte now and then resets a silence timer for ever;
    this one it cannot.
    """

    def __init__(
        self,
        call_later: Callable[[float, Callable[[], object]], IDelayedCall],
        period: float | None,
        give_up: Callable[[str], None],
    ) -> None:
        self._call_later = call_later
        self._period = period
        self._give_up = give_up
        self._call: IDelayedCall | None = None
        self._then: Callable[[], None] = self._no_status
        self._bytes = 0

    def request_sent(self) -> None:
        self._start(self._no_status)

    def status_received(self) -> None:
        self._start(self._window_ended)

    def received(self, count: int) -> None:
        self._bytes += count

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _start(self, then: Callable[[], None]) -> None:
        self._bytes = 0
        self._then = then
        if self._period is None:
            return
        if self._call is not None and self._call.active():
            # Moved, not cancelled and made again: a pipelined lane starts a
            # window several times per small file, and a later time is only
            # noted by the reactor, where a new call is pushed on its heap.
            self._call.reset(self._period)
        else:
            self._call = self._call_later(self._period, self._fire)

    def _fire(self) -> None:
        self._call = None
        self._then()

    def _no_status(self) -> None:
        self._give_up("timed out waiting for the server")

    def _window_ended(self) -> None:
        if self._bytes < MIN_PROGRESS:
            self._give_up(
                f"the server is too slow: under {MIN_PROGRESS // 1024} KiB "
                f"in {self._period:g} s"
            )
            return
        self._start(self._window_ended)
