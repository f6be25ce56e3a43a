"""
What a get shows while it runs: the tally of files and bytes, and the
displays that show it (nothing, one line per file, a bar per file).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import IO

from filecache.client.lanes import Job, Lane
from filecache.client.output import human_size, say
from filecache.client.progress import Progress, TqdmProgress

FETCHED = "fetched"
SKIPPED = "up to date"
FAILED = "failed"


@dataclass
class Tally:
    """
    The figures of a get: the summary line's, and the overall bar's.
    Skipped files are those found up to date.
    """

    files: int = 0
    """Files to bring over, as far as known."""
    size: int = 0
    """Their bytes, as far as known (a bare NAME's once its reply starts)."""
    fetched: int = 0
    skipped: int = 0
    failed: int = 0
    received: int = 0
    """Body bytes received."""
    fetched_size: int = 0
    skipped_size: int = 0

    @property
    def ended(self) -> int:
        return self.fetched + self.skipped + self.failed

    @property
    def ended_size(self) -> int:
        """The bytes of the files fetched or found up to date."""
        return self.fetched_size + self.skipped_size

    def end(self, verb: str, size: int) -> None:
        if verb == FETCHED:
            self.fetched += 1
            self.fetched_size += size
        elif verb == SKIPPED:
            self.skipped += 1
            self.skipped_size += size
        else:
            self.failed += 1

    def summary(self, seconds: float, dry_run: bool = False) -> str:
        """The one line a multi-file get ends with."""
        if dry_run:
            return (
                f"dry run: {self.ended:,} files: {self.fetched:,} to fetch "
                f"({human_size(self.fetched_size)}), {self.skipped:,} skipped, {self.failed:,} failed"
            )
        return (
            f"{self.ended:,} files: {self.fetched:,} fetched, {self.skipped:,} skipped, "
            f"{self.failed:,} failed, {human_size(self.received)} in {seconds:.2f} s"
        )


class Display:
    """Shows nothing but the messages (off a terminal, or --quiet)."""

    def __init__(self, err: IO[str]) -> None:
        self.err = err

    def progress(self, job: Job, lane: Lane) -> Progress:
        """What C{job}'s download reports its bytes to."""
        return Progress()

    def finished(self, job: Job, verb: str, size: int) -> None:
        """C{job} ended: L{FETCHED}, L{SKIPPED} or L{FAILED} (already said why)."""

    def message(self, text: str) -> None:
        """A line on stderr, escaped (L{say})."""
        say(self.err, text)

    def close(self) -> None:
        """The get is over."""


class PlainLog(Display):
    """C{--progress=plain}: one line per file as it ends, for logs."""

    def finished(self, job: Job, verb: str, size: int) -> None:
        if verb != FAILED:
            self.message(f"{verb}: {job.path} ({human_size(size)})")


class SingleBar(Display):
    """One file alone: its own tqdm bar, as the client always showed it."""

    def __init__(self, err: IO[str], bars: bool) -> None:
        super().__init__(err)
        self._bars = bars

    def progress(self, job: Job, lane: Lane) -> Progress:
        return TqdmProgress(self.err, disable=not self._bars)

    def finished(self, job: Job, verb: str, size: int) -> None:
        if verb == SKIPPED and self._bars:
            # On a terminal something must say why no bar came.
            self.message(f"{job.path}: up to date")


def same_terminal(a: IO[str], b: IO[str]) -> bool:
    """Whether C{a} and C{b} are the same terminal (so names printed on one land among the other's bars)."""
    try:
        if not (a.isatty() and b.isatty()):
            return False
        return os.fstat(a.fileno()).st_rdev == os.fstat(b.fileno()).st_rdev
    except (OSError, ValueError, AttributeError):
        return False
