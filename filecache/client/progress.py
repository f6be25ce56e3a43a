"""
What a download reports its progress to: nothing by default, or a tqdm bar
per file on stderr, in the binary units the listing uses.
"""

from __future__ import annotations

import functools
from collections.abc import MutableMapping
from typing import IO, Any

from filecache import wire
from filecache.client.output import human_size


class Progress:
    """What a download reports progress to (a tqdm bar, or nothing)."""

    def start(self, name: str, total: int, done: int) -> None:
        pass

    def advance(self, count: int) -> None:
        pass

    def close(self) -> None:
        pass


BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {done}/{size} [{elapsed}<{remaining}, {speed}]"
"""The progress bar: sizes and rate in the binary units `list` uses (KiB, MiB)."""


@functools.cache
def _bar_class() -> Any:
    # tqdm is imported once a download begins, not when the client starts.
    from tqdm import tqdm

    class BinaryBar(tqdm):  # type: ignore[type-arg]
        """A tqdm bar whose figures are human_size()s: 1 KiB is 1024 bytes, and says so."""

        @property
        def format_dict(self) -> MutableMapping[str, Any]:
            figures = super().format_dict
            rate = figures["rate"]
            elapsed = figures["elapsed"]
            if rate is None and elapsed:
                rate = (figures["n"] - figures["initial"]) / elapsed
            figures["done"] = human_size(int(figures["n"]))
            total = figures["total"]
            figures["size"] = "?" if total is None else human_size(int(total))
            figures["speed"] = "?" if rate is None else human_size(int(rate)) + "/s"
            return figures

    return BinaryBar


class TqdmProgress(Progress):
    """
    A tqdm bar per file on C{stream}.  C{disable} is tqdm's: C{None} shows
    the bar only if C{stream} is a terminal, C{True} never (C{--quiet}).
    """

    def __init__(self, stream: IO[str], disable: bool | None = None) -> None:
        self._stream = stream
        self._disable = disable
        self._bar: Any = None

    def start(self, name: str, total: int, done: int) -> None:
        self._bar = _bar_class()(
            disable=self._disable,
            total=total,
            initial=done,
            desc=wire.printable(name),
            unit="B",
            bar_format=BAR_FORMAT,
            file=self._stream,
            leave=True,
            dynamic_ncols=True,
        )

    def advance(self, count: int) -> None:
        if self._bar is not None:
            self._bar.update(count)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
