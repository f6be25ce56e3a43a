"""
What a get tells the user: the progress display it picks, the names on
stdout, each failure and the exit status, retries, the summary line, and
what an interrupt leaves undone.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence
from typing import IO, Any

from filecache import wire
from filecache.client.arguments import COMMANDS, Invocation
from filecache.client.board import Board
from filecache.client.destination import destination
from filecache.client.display import (
    FAILED,
    Display,
    PlainLog,
    SingleBar,
    Tally,
    same_terminal,
)
from filecache.client.errors import LocalError, ServerError
from filecache.client.exits import EXIT_OK, describe, exit_status
from filecache.client.lanes import Job, Lane
from filecache.client.partfile import part_names
from filecache.client.progress import Progress
from filecache.client.selection import suggest_command

Key = tuple[int, int]
"""A failure's place in the plan: the first one's status is the exit status."""

FIRST = (-1, 0)
"""The place of the NAMEs' own failures (matching nothing): before every file's."""
LAST = (1 << 62, 0)
"""The place of --delete's failures: after every file's."""

MAX_KEPT_LISTED = 10
"""Interrupted: the partial files kept are named up to this many."""


class _Counted(Progress):
    """A download's progress, counted in the tally on its way to the display."""

    def __init__(self, inner: Progress, tally: Tally, job: Job) -> None:
        self._inner, self._tally, self._job = inner, tally, job

    def start(self, name: str, total: int, done: int) -> None:
        if self._job.size is None:
            # A bare NAME: its size is known now.
            self._job.size = total
            self._tally.size += total
        self._inner.start(name, total, done)

    def advance(self, count: int) -> None:
        self._tally.received += count
        self._inner.advance(count)

    def close(self) -> None:
        self._inner.close()


class Reporter:
    """Everything a get of C{inv} says, on C{out} (names) and C{err} (the rest)."""

    def __init__(self, inv: Invocation, out: IO[str], err: IO[str], clock: Any) -> None:
        self._inv = inv
        self._out = out
        self._err = err
        self._clock = clock
        self._started = clock.seconds()
        self.tally = Tally()
        self.display = Display(err)
        self.multi = False
        self._print_names = True
        self._failures: list[tuple[Key, BaseException]] = []
        self._said_retry: dict[int, tuple[float, float]] = {}

    def show(self, multi: bool) -> None:
        """Pick the display for a get of one file or of several, as the options say."""
        inv, err = self._inv, self._err
        self.display.close()
        self.multi = multi
        bars = not inv.quiet and (inv.progress == "bars" or (inv.progress == "auto" and err.isatty()))
        if inv.quiet or inv.progress == "none" or inv.dry_run:
            self.display, bars = Display(err), False
        elif inv.progress == "plain":
            self.display, bars = PlainLog(err), False
        elif not multi:
            self.display = SingleBar(err, bars)
        elif bars:
            board = Board(err, inv.parallel, self.tally, self._clock)
            board.start()
            self.display = board
        else:
            self.display = Display(err)
        # Names among the bars would scroll them: not on the bars' terminal.
        self._print_names = not inv.dry_run and (
            inv.print_names or not (bars and same_terminal(self._out, err))
        )

    def progress(self, job: Job, lane: Lane) -> Progress:
        return _Counted(self.display.progress(job, lane), self.tally, job)

    def end(self, job: Job, verb: str, size: int, final: str) -> None:
        """C{job} is in place as C{final}: fetched or up to date."""
        self.tally.end(verb, size)
        self.display.finished(job, verb, size)
        if self._print_names:
            self._out.write(f"{wire.printable(final)}\n")

    def would(self, job: Job, what: str, final: str, size: int) -> None:
        """--dry-run: what would be done to C{job}."""
        self._out.write(f"{what} {wire.printable(final)} ({size:,} bytes)\n")

    def fail(self, key: Key, error: BaseException, job: Job | None = None) -> None:
        """Say why C{job} (or a NAME, or --delete) failed; the first failure in plan order sets the status."""
        self._failures.append((key, error))
        text = describe(error)
        if job is not None:
            text = f"{job.path}: {text}"
            self.tally.end(FAILED, 0)
            self.display.finished(job, FAILED, 0)
            suggestion = self._suggestion(job, error)
            if suggestion:
                text += f'; did you mean "{suggestion}"?'
        self.display.message(text)

    def _suggestion(self, job: Job, error: BaseException) -> str | None:
        """For the seed form's NAME, not found: the command it may have meant (C{lst})."""
        inv = self._inv
        if not (inv.seed and isinstance(error, ServerError) and error.code == wire.NOT_FOUND):
            return None
        if job.path != inv.names[0] or "/" in job.path:
            return None
        return suggest_command(job.path, COMMANDS)

    def out_of_reach(self, jobs: Sequence[Job]) -> None:
        """The server went out of reach (past the retries) before C{jobs} were started."""
        self.tally.failed += len(jobs)
        self.display.message(f"not started: {len(jobs):,} files, the server being out of reach")

    def status(self) -> int:
        if not self._failures:
            return EXIT_OK
        return exit_status(min(self._failures, key=lambda failure: failure[0])[1])

    def retrying(self, lane: Lane | None, name: str, error: BaseException, delay: float) -> None:
        """A retry: said per file for one file, once per lane and round for many."""
        if lane is None or not self.multi:
            self.display.message(f"{name}: {describe(error)}; retrying in {delay:g} s")
            return
        # Every transfer on a lost connection retries at once.
        now = self._clock.seconds()
        said = self._said_retry.get(lane.number)
        if said is not None and said[1] == delay and now - said[0] < delay + 1:
            return
        self._said_retry[lane.number] = (now, delay)
        self.display.message(f"connection {lane.number + 1}: {describe(error)}; retrying in {delay:g} s")

    def _summary_text(self) -> str:
        return self.tally.summary(self._clock.seconds() - self._started, dry_run=self._inv.dry_run)

    def summary(self, deleted: int | None) -> None:
        """The one line a get of several files ends with (C{deleted}: with --delete)."""
        self.display.close()
        if not self.multi or self._inv.quiet or not self.tally.files:
            return
        text = self._summary_text()
        if deleted is not None:
            text += f", {deleted:,} {'to delete' if self._inv.dry_run else 'deleted'}"
        self.display.message(text)

    def deleted(self, rel: str) -> None:
        if self._inv.progress == "plain":
            self.display.message(f"deleted: {rel}")

    def would_delete(self, path: str) -> None:
        self._out.write(f"would delete {wire.printable(path)}\n")

    def unfinished(self, jobs: Sequence[Job], bare: bool) -> list[str]:
        """
        What an interrupted get leaves undone, for stderr: the partial files
        kept (C{jobs} under way first, then those not started), the rest.
        """
        lines: list[str] = []
        kept = 0
        rest: list[Job] = []
        for job in jobs:
            try:
                part, _ = part_names(destination(self._inv.folder, job.path))
            except LocalError:
                part = ""
            if part and os.path.isfile(part):
                kept += 1
                if kept <= MAX_KEPT_LISTED:
                    lines.append(f"{job.path}: not finished; {part} is kept: the same get resumes it")
            else:
                rest.append(job)
        if kept > MAX_KEPT_LISTED:
            lines.append(f"and {kept - MAX_KEPT_LISTED:,} more partial files kept")
        if rest and bare:
            lines.append(f"not started ({len(rest)}): {shlex.join(job.path for job in rest)}")
        elif rest:
            lines.append(f"not started: {len(rest):,} files (the same get fetches them)")
        if self.multi and not self._inv.quiet:
            lines.append(self._summary_text())
        return lines

    def close(self) -> None:
        self.display.close()
