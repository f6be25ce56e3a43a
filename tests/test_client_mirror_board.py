"""
The progress display of a multi-file get, in memory on a fake clock: one
overall line and one per lane, never wider than the terminal, redrawn in
place; messages above it; the tally and its summary line.
"""

from __future__ import annotations

import io
import os
import re

from twisted.internet.task import Clock

from filecache.client.board import REDRAW_EVERY, Board, fit
from filecache.client.display import FETCHED, SKIPPED, Tally
from filecache.client.download import Session
from filecache.client.lanes import Job, Lane
from filecache.client.progress import Progress

UP = re.compile(r"\x1b\[(\d+)A")


def board(lanes: int = 3, columns: int = 60) -> tuple[Board, io.StringIO, Tally, Clock]:
    stream = io.StringIO()
    tally = Tally(files=10, size=10 * 4096)
    clock = Clock()
    return Board(stream, lanes, tally, clock, columns=lambda: columns), stream, tally, clock


def lane(number: int) -> Lane:
    return Lane(number, Session(lambda: None))  # type: ignore[arg-type, return-value]


def start(b: Board, path: str, number: int, total: int = 4096) -> Progress:
    progress = b.progress(Job(path, total), lane(number))
    progress.start(path, total, 0)
    return progress


def test_the_board_is_one_line_and_one_per_lane_each_cut_to_the_width() -> None:
    """
    Three lanes busy with long and wide names: four lines, none wider than
    the terminal less one column (a full line would wrap on some terminals).
    """
    b, _, _, _ = board(lanes=3, columns=60)
    start(b, "a/" + "very-long-name-" * 10 + ".bin", 0)
    start(b, "宽字符/" * 20 + "x.bin", 1)
    start(b, "short.bin", 2)
    lines = b.lines()
    assert len(lines) == 4
    for line in lines:
        cells = sum(2 if "\u4e00" <= ch <= "\u9fff" else 1 for ch in line)
        assert cells <= 59, line
    assert lines[0].startswith("total: ")
    assert "0/10 files" in lines[0]


def test_fit_counts_wide_characters_as_two_cells() -> None:
    """fit() cuts by terminal cells: 'ab宽' is four cells."""
    assert fit("ab宽cd", 4) == "ab宽"
    assert fit("ab宽cd", 3) == "ab"
    assert fit("plain", 10) == "plain"


def test_each_redraw_goes_back_up_exactly_the_lines_drawn() -> None:
    """
    Every frame after the first starts by moving the cursor up the board's
    height less one, and no frame holds more newlines than that: nothing scrolls.
    """
    b, stream, tally, clock = board(lanes=3)
    b.start()
    transfers = [start(b, f"f{n}.bin", n) for n in range(3)]
    for _ in range(20):
        for t in transfers:
            t.advance(100)
        tally.received += 300
        clock.advance(REDRAW_EVERY)
    text = stream.getvalue()
    assert {int(n) for n in UP.findall(text)} == {3}
    frames = UP.split(text)[::2]  # the text between two moves up
    assert len(frames) >= 20
    assert all(frame.count("\n") <= 3 for frame in frames)


def test_a_message_goes_above_the_board_which_is_drawn_again_below() -> None:
    """message(): the board is cleared, the line said, the board drawn again under it."""
    b, stream, _, _ = board(lanes=2)
    start(b, "f.bin", 0)
    b.draw()
    b.message("f.bin: connection lost; retrying in 0.25 s")
    text = stream.getvalue()
    said = text.index("filecache-client: f.bin: connection lost")
    assert text.index("total: ", said) > said
    assert "\x1b[J" in text[:said]


def test_closing_leaves_the_overall_line_alone() -> None:
    """close(): one last frame of the overall line only, then a newline; nothing drawn after."""
    b, stream, tally, clock = board(lanes=2)
    b.start()
    job = Job("f.bin", 4096)
    t = b.progress(job, lane(0))
    t.start("f.bin", 4096, 0)
    clock.advance(REDRAW_EVERY)
    t.advance(4096)
    t.close()
    tally.end(FETCHED, 4096)
    b.finished(job, FETCHED, 4096)
    b.close()
    tail = UP.split(stream.getvalue())[-1]
    assert tail.count("\n") == 1 and tail.endswith("\n")
    assert "1/10 files, 4.0 KiB/40.0 KiB" in tail
    before = stream.getvalue()
    clock.advance(10)
    assert stream.getvalue() == before and clock.getDelayedCalls() == []


def test_the_overall_line_counts_files_bytes_and_a_binary_rate() -> None:
    """Files ended of all, bytes in place of all, and the rate of the last seconds in KiB/s or MiB/s."""
    b, _, tally, clock = board(lanes=1, columns=120)
    clock.advance(1)
    tally.received = 2 * 1024 * 1024
    tally.end(FETCHED, 2 * 1024 * 1024)
    tally.end(SKIPPED, 1024)
    line = b.lines()[0]
    assert "2/10 files" in line
    assert "2.0 MiB/40.0 KiB" not in line  # done is capped at the total
    assert re.search(r"\d+\.\d (KiB|MiB)/s\]", line), line


def test_the_summary_says_fetched_skipped_failed_bytes_and_time() -> None:
    """The summary line of a get, and of a dry run."""
    tally = Tally(files=3)
    tally.end(FETCHED, 2048)
    tally.end(SKIPPED, 10)
    tally.end("failed", 0)
    tally.received = 2048
    assert tally.summary(1.234) == (
        "3 files: 1 fetched, 1 skipped, 1 failed, 2.0 KiB in 1.23 s"
    )
    assert tally.summary(1, dry_run=True) == (
        "dry run: 3 files: 1 to fetch (2.0 KiB), 1 skipped, 1 failed"
    )


def test_a_transfer_stopped_part_way_still_counts_its_bytes() -> None:
    """
    A transfer that stops part-way (its partial file kept, as on Ctrl-C)
    keeps its bytes in the overall line until its file is done; a retry
    of it takes over from them, so nothing is counted twice.
    """
    b, _, _, _ = board(lanes=1, columns=120)
    job = Job("big.bin", 40 * 1024)
    first = b.progress(job, lane(0))
    first.start("big.bin", 40 * 1024, 0)
    first.advance(10 * 1024)
    first.close()
    assert "10.0 KiB/40.0 KiB" in b.lines()[0]
    retry = b.progress(job, lane(0))
    retry.start("big.bin", 40 * 1024, 10 * 1024)
    retry.advance(1024)
    assert "11.0 KiB/40.0 KiB" in b.lines()[0]



class OnTty(io.StringIO):
    """A text stream that records what is written and says it is terminal C{fd}."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._fd = fd

    def isatty(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd


def names_printed(*argv: str, same_terminal: bool = True) -> str:
    """What a multi-file get prints on stdout for one saved file, stderr on a terminal."""
    from filecache.client.arguments import Invocation, build_parser
    from filecache.client.reporter import Reporter

    first, first_peer = os.openpty()
    second, second_peer = os.openpty()
    try:
        inv = Invocation(build_parser().parse_intermixed_args(["h", "1", "get", "d/", *argv]))
        err = OnTty(first_peer)
        out = OnTty(first_peer if same_terminal else second_peer)
        report = Reporter(inv, out, err, Clock())
        report.show(multi=True)
        report.end(Job("d/x", 10), FETCHED, 10, "out/d/x")
        report.close()
        return out.getvalue()
    finally:
        for fd in (first, first_peer, second, second_peer):
            os.close(fd)


def test_names_go_to_stdout_unless_it_is_the_terminal_the_bars_are_on() -> None:
    """
    Bars on stderr's terminal and stdout the same terminal: no names (they
    would scroll the bars) unless --print; stdout another terminal, or no
    bars (--quiet, --progress=plain): the names.
    """
    assert names_printed() == ""
    assert names_printed("--print") == "out/d/x\n"
    assert names_printed(same_terminal=False) == "out/d/x\n"
    assert names_printed("--quiet") == "out/d/x\n"
    assert names_printed("--progress", "plain") == "out/d/x\n"
