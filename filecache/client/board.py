"""
The progress display of a multi-file get on a terminal: one overall bar and
a bar per lane, redrawn in place, so the screen never scrolls.
"""

from __future__ import annotations

import functools
import os
import unicodedata
from collections import deque
from collections.abc import Callable
from typing import IO, Any

from filecache import wire
from filecache.client.display import Display, Tally
from filecache.client.lanes import Job, Lane
from filecache.client.output import human_size
from filecache.client.progress import Progress

OVERALL_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {files} files, {done}/{size} [{elapsed}<{remaining}, {speed}]"
LANE_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {done}/{size}"
REDRAW_EVERY = 0.1
RATE_WINDOW = 5.0
"""The overall rate is that of the last few seconds, not of the whole run."""

_UP = "\x1b[{}A"
_CLEAR_LINE = "\x1b[2K"
_CLEAR_BELOW = "\x1b[J"


@functools.cache
def _format_meter() -> Callable[..., str]:
    from tqdm import tqdm

    meter: Callable[..., str] = tqdm.format_meter
    return meter


def fit(text: str, columns: int) -> str:
    """C{text} cut to at most C{columns} terminal cells (wide characters take two)."""
    used = 0
    for i, ch in enumerate(text):
        width = 0 if unicodedata.combining(ch) else 2 if unicodedata.east_asian_width(ch) in "WF" else 1
        if used + width > columns:
            return text[:i]
        used += width
    return text


def terminal_columns(stream: IO[str]) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, AttributeError):
        return 80


class _Transfer(Progress):
    """One job's body on the board."""

    def __init__(self, board: Board, lane: Lane, job: Job) -> None:
        self.board, self.lane, self.job = board, lane, job
        self.name = wire.printable(job.path)
        self.total = 0
        self.done = 0
        self.counted = False

    def start(self, name: str, total: int, done: int) -> None:
        self.total, self.done = total, done
        self.board.begun(self)

    def advance(self, count: int) -> None:
        self.done += count
        self.board.dirty = True

    def close(self) -> None:
        self.board.ended(self)


class Board(Display):
    """
    The overall bar (files, bytes, rate, ETA) and under it one line per
    lane: at most 1 + lanes lines, rewritten in place every
    L{REDRAW_EVERY} seconds.  Messages go above it; on close only the
    overall line stays.  Every line is cut to the terminal's width, so
    none wraps.
    """

    def __init__(
        self,
        err: IO[str],
        lanes: int,
        tally: Tally,
        clock: Any,
        columns: Callable[[], int] | None = None,
    ) -> None:
        super().__init__(err)
        self._lanes = lanes
        self._tally = tally
        self._clock = clock
        self._columns = columns or (lambda: terminal_columns(err))
        self._started = clock.seconds()
        self._active: dict[int, list[_Transfer]] = {}
        self._stopped: dict[Job, _Transfer] = {}
        self._samples: deque[tuple[float, int]] = deque([(self._started, 0)])
        self._drawn = 0
        self._timer: Any = None
        self._closed = False
        self.dirty = True

    # What the transfers report

    def progress(self, job: Job, lane: Lane) -> Progress:
        return _Transfer(self, lane, job)

    def begun(self, transfer: _Transfer) -> None:
        self._stopped.pop(transfer.job, None)  # a retry takes over from its last attempt
        self._active.setdefault(transfer.lane.number, []).append(transfer)
        self.dirty = True

    def ended(self, transfer: _Transfer) -> None:
        active = self._active.get(transfer.lane.number, [])
        if transfer in active:
            active.remove(transfer)
            # Its bytes count until its file is counted as done (or for good:
            # a partial file kept).
            self._stopped[transfer.job] = transfer
        self.dirty = True

    def in_flight_bytes(self) -> int:
        """The bytes of the files not counted as done yet: under way, or stopped part-way."""
        active = sum(t.done for transfers in self._active.values() for t in transfers)
        return active + sum(t.done for t in self._stopped.values())

    # Drawing

    def finished(self, job: Job, verb: str, size: int) -> None:
        self._stopped.pop(job, None)
        self.dirty = True

    def start(self) -> None:
        """
        Draw the board in L{REDRAW_EVERY} seconds (by then the files are
        counted; a get done sooner shows only its last line), and again
        every L{REDRAW_EVERY} seconds while anything changed.
        """
        self._schedule()

    def _schedule(self) -> None:
        if self._timer is None and not self._closed:
            self._timer = self._clock.callLater(REDRAW_EVERY, self._tick)

    def _tick(self) -> None:
        self._timer = None
        if self.dirty:
            self.draw()
        self._schedule()

    def lines(self) -> list[str]:
        """What the board shows now, each line cut to the terminal's width."""
        columns = max(self._columns() - 1, 10)
        now = self._clock.seconds()
        lines = [self._overall(now, columns)]
        height = min(self._lanes, max(self._tally.files, 1))
        for number in range(height):
            active = self._active.get(number)
            lines.append(self._lane_line(active[-1], now, columns) if active else "")
        return [fit(line, columns) for line in lines]

    def _rate(self, now: float) -> float | None:
        received = self._tally.received
        samples = self._samples
        if now - samples[-1][0] >= REDRAW_EVERY / 2:
            samples.append((now, received))
        while len(samples) > 2 and now - samples[1][0] > RATE_WINDOW:
            samples.popleft()
        then, before = samples[0]
        if now - then <= 0:
            return None
        return (received - before) / (now - then)

    def _overall(self, now: float, columns: int) -> str:
        tally = self._tally
        done = min(tally.ended_size + self.in_flight_bytes(), tally.size)
        rate = self._rate(now)
        # With nothing to fetch (all up to date) there is no byte bar to show.
        shape = OVERALL_FORMAT if tally.size else OVERALL_FORMAT.replace("{percentage:3.0f}%|{bar}| ", "")
        return _format_meter()(
            n=done,
            total=tally.size or None,
            elapsed=now - self._started,
            ncols=columns,
            prefix="total",
            bar_format=shape,
            rate=rate or None,
            files=f"{tally.ended:,}/{tally.files:,}",
            done=human_size(done),
            size=human_size(tally.size),
            speed="?" if rate is None else human_size(int(rate)) + "/s",
        )

    def _lane_line(self, transfer: _Transfer, now: float, columns: int) -> str:
        return _format_meter()(
            n=transfer.done,
            total=max(transfer.total, 1),
            elapsed=0,
            ncols=columns,
            prefix=transfer.name,
            bar_format=LANE_FORMAT,
            done=human_size(transfer.done),
            size=human_size(transfer.total),
        )

    def draw(self, lines: list[str] | None = None) -> None:
        """Rewrite the board in place (cursor back to its first line, each line cleared)."""
        self.dirty = False
        lines = self.lines() if lines is None else lines
        text = self._home() + "\n".join(_CLEAR_LINE + line for line in lines) + _CLEAR_BELOW
        self._write(text)
        self._drawn = len(lines)

    def _home(self) -> str:
        """From the end of the board's last line back to the start of its first."""
        if not self._drawn:
            return "\r"
        return "\r" + (_UP.format(self._drawn - 1) if self._drawn > 1 else "")

    def _write(self, text: str) -> None:
        try:
            self.err.write(text)
            self.err.flush()
        except OSError:
            pass  # the terminal went away; the get goes on

    def message(self, text: str) -> None:
        if self._drawn:
            self._write(self._home() + _CLEAR_BELOW)
            self._drawn = 0
        super().message(text)
        if not self._closed:
            self.draw()

    def close(self) -> None:
        """Leave the overall line with its last figures, the lanes' lines gone."""
        if self._closed:
            return
        self._closed = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.draw(self.lines()[:1])
        self._write("\n")
        self._drawn = 0
