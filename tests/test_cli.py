"""
The command line: argument forms, human sizes, and the progress bar, which
shows on a terminal (a real pseudo-terminal here) and nowhere else.
"""

from __future__ import annotations

import io
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import Daemon, DaemonFactory, ram_folder, run_client, tool

from filecache.client.arguments import Invocation, build_parser
from filecache.client.errors import UsageError
from filecache.client.output import human_size
from filecache.client.progress import TqdmProgress


def parse(*argv: str) -> Invocation:
    return Invocation(build_parser().parse_intermixed_args(list(argv)))


def test_human_sizes() -> None:
    """Sizes print in bytes below 1 KiB and in binary units with one decimal above."""
    assert human_size(0) == "0 B"
    assert human_size(1023) == "1023 B"
    assert human_size(1536) == "1.5 KiB"
    assert human_size(64 * 1024 * 1024) == "64.0 MiB"
    assert human_size(3 * 1024**4) == "3.0 TiB"


def test_progress_bar_uses_the_units_list_uses() -> None:
    """
    The bar's sizes and rate are human_size()s (1 KiB = 1024 bytes, labelled
    KiB), not tqdm's 1024-divided figures labelled k and MB/s.
    """
    stream = io.StringIO()
    bar = TqdmProgress(stream, disable=False)
    bar.start("f.bin", 5 * 1024 * 1024, 1024 * 1024)
    bar.advance(2 * 1024 * 1024)
    bar.close()
    shown = stream.getvalue()
    assert "f.bin:  60%|" in shown
    assert "3.0 MiB/5.0 MiB [" in shown
    assert re.search(r"\d+\.\d (KiB|MiB|GiB)/s\]", shown)
    assert "MB/s" not in shown and "kB/s" not in shown


class Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    "stream, disable, shown",
    [
        (Terminal(), None, True),
        (io.StringIO(), None, False),
        (Terminal(), True, False),
    ],
    ids=["terminal", "not-a-terminal", "quiet-on-a-terminal"],
)
def test_the_bar_shows_only_on_a_terminal_and_not_when_quiet(
    stream: io.StringIO, disable: bool | None, shown: bool
) -> None:
    """
    TqdmProgress leaves the choice to tqdm's disable: None (the default)
    draws on a terminal only, True (--quiet) never; a bar left out writes
    nothing at all.
    """
    bar = TqdmProgress(stream, disable=disable)
    bar.start("f.bin", 1000, 0)
    bar.advance(1000)
    bar.close()
    assert ("f.bin: 100%|" in stream.getvalue()) is shown
    if not shown:
        assert stream.getvalue() == ""


def test_command_forms() -> None:
    """list/get/stats are commands; anything else is the seed form NAME [DIR]; options go anywhere."""
    inv = parse("h", "5000", "get", "a", "b/c", "-o", "out", "--quiet")
    assert (inv.command, inv.names, inv.folder, inv.quiet) == ("get", ["a", "b/c"], "out", True)
    inv = parse("h", "5000", "file.txt", "dest")
    assert (inv.command, inv.names, inv.folder) == ("get", ["file.txt"], "dest")
    inv = parse("h", "5000", "--cached", "list", "--json")
    assert (inv.command, inv.cached, inv.json) == ("list", True, True)
    assert parse("h", "5000", "stats").command == "stats"
    assert parse("h", "5000", "get", "x").retries == 3
    assert parse("h", "5000", "get", "x", "--timeout", "0").timeout is None
    assert parse("h", "5000", "list", "--cafile", "ca.pem").tls is True


@pytest.mark.parametrize(
    "argv, message",
    [
        (("h", "port", "list"), "port must be a number"),
        (("h", "70000", "list"), "port out of range"),
        (("h", "1", "get"), "get needs at least one NAME"),
        (("h", "1", "stats", "x"), "stats takes no names"),
        (("h", "1", "a", "b", "c"), "expected NAME [DIR]"),
        (("h", "1", "a", "b", "-o", "c"), "give DIR or -o DIR, not both"),
        (("h", "1", "get", "a", "--retries", "-1"), "--retries must not be negative"),
        (("h", "1", "list", "--insecure", "--cafile", "x"), "not both"),
    ],
)
def test_usage_errors(argv: tuple[str, ...], message: str) -> None:
    """Command lines that cannot work are refused with a message saying why."""
    with pytest.raises(UsageError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse(*argv)


def test_progress_bar_on_a_terminal(shared: Path, daemon: Daemon, tmp_path: Path) -> None:
    """On a terminal, each download shows a tqdm bar on stderr (name, percentage, size, rate); --quiet hides it."""
    if shutil.which("script") is None:
        pytest.fail("`script` (util-linux) is needed to give the client a terminal")
    (shared / "bar.bin").write_bytes(b"x" * 300_000)
    out = tmp_path / "out"
    command = " ".join(
        shlex.quote(word)
        for word in [tool("filecache-client"), "127.0.0.1", str(daemon.port), "get", "bar.bin", "-o", str(out)]
    )
    typescript = tmp_path / "typescript"
    result = subprocess.run(
        ["script", "-qec", f"stty cols 100 rows 20; {command}", str(typescript)],
        check=False, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    screen = typescript.read_text(errors="replace").replace("\r", "\n")
    assert "bar.bin: 100%|" in screen
    # The same binary units as `list`: 300,000 bytes are 293.0 KiB, the rate in KiB/s or MiB/s.
    assert "293.0 KiB/293.0 KiB" in screen
    assert re.search(r"\d+\.\d (KiB|MiB|GiB)/s\]", screen)
    assert not re.search(r"\d(k|M|G)B/s", screen)
    assert (out / "bar.bin").read_bytes() == b"x" * 300_000
    quiet = subprocess.run(
        ["script", "-qec", f"stty cols 100 rows 20; {command} --force --quiet", str(typescript)],
        check=False, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
    )
    assert quiet.returncode == 0
    assert "%|" not in typescript.read_text(errors="replace")


def test_no_progress_bar_off_a_terminal_or_quiet(shared: Path, daemon: Daemon, tmp_path: Path) -> None:
    """Without a terminal (or with --quiet) stderr stays empty on success; stdout names the file."""
    (shared / "bar.bin").write_bytes(b"x" * 300_000)
    result = run_client("127.0.0.1", str(daemon.port), "get", "bar.bin", "-o", str(tmp_path / "out"))
    assert result.returncode == 0
    assert result.stderr == ""
    assert result.stdout == f"{tmp_path / 'out' / 'bar.bin'}\n"


# Ctrl-C and SIGTERM during get (issue 8, item 17)

MiB = 1024 * 1024

ROWS, COLUMNS = 20, 100

_TAKE_TERMINAL = (
    "import fcntl, os, sys, termios\n"
    "os.setsid()\n"
    "fcntl.ioctl(0, termios.TIOCSCTTY, 0)\n"
    "os.execv(sys.argv[1], sys.argv[1:])\n"
)


class OnTerminal:
    """
    The real client with a pseudo-terminal as its controlling terminal (its
    stdin and stderr), stdout on a pipe (or on the terminal too): keys
    written to the terminal reach it as a user's would, Ctrl-C included.
    """

    def __init__(self, *args: str, stdout_on_terminal: bool = False) -> None:
        import fcntl
        import struct
        import termios
        import threading

        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, 0, 0))
        self.process = subprocess.Popen(
            [sys.executable, "-c", _TAKE_TERMINAL, tool("filecache-client"), *args],
            stdin=slave,
            stdout=slave if stdout_on_terminal else subprocess.PIPE,
            stderr=slave,
            text=True,
        )
        os.close(slave)
        self._screen = bytearray()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO once the client and its terminal are gone
                return
            if not chunk:
                return
            self._screen += chunk

    def press(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def finish(self, timeout: float) -> tuple[int, str, str]:
        """Wait for the client; return (status, stdout, what the terminal showed)."""
        try:
            stdout, _ = self.process.communicate(timeout=timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait(5)
            self._reader.join(5)
            os.close(self.master)
        return self.process.returncode, stdout or "", self._screen.decode(errors="replace").replace("\r", "")

    @property
    def raw(self) -> str:
        """Everything the terminal was sent, control sequences and carriage returns included."""
        return self._screen.decode(errors="replace")


def part_of(out: Path, name: str) -> Path:
    return out / f".{name}.filecache-part"


def stop_mid_file(process: subprocess.Popen[str], part: Path, final: Path, size: int) -> None:
    """SIGSTOP the client as soon as C{part} holds C{size} bytes, checking the file is unfinished then."""
    deadline = time.monotonic() + 30
    while not (part.exists() and part.stat().st_size >= size):
        assert process.poll() is None, "the client ended before the test could interrupt it"
        assert time.monotonic() < deadline, f"timed out waiting for {part}"
        time.sleep(0.002)
    process.send_signal(signal.SIGSTOP)
    assert not final.exists(), "the download finished before it could be interrupted"


@pytest.mark.system
def test_ctrl_c_on_a_terminal_stops_at_once_and_keeps_the_partial_file(
    shared: Path, daemon: Daemon, tmp_path: Path
) -> None:
    """
    Ctrl-C on a real terminal during `get big.bin small.bin c.bin` (each on
    a connection of its own, so the small ones are in by then): exit 130 at
    once, no "retrying", stderr says big.bin is not finished (its partial
    file kept) and ends with the summary of what was done; the partial file
    and its sidecar stay, and the same get then resumes from them.
    """
    # 64 MiB: more than the 8 MiB the client has when it is stopped plus all
    # the loopback socket buffers can hold (32 MiB to receive, 4 MiB to send).
    data = os.urandom(64 * MiB)
    (shared / "big.bin").write_bytes(data)
    (shared / "small.bin").write_bytes(b"s" * 100)
    (shared / "c.bin").write_bytes(b"c" * 100)
    out = tmp_path / "out"
    client = OnTerminal("127.0.0.1", str(daemon.port), "get", "big.bin", "small.bin", "c.bin", "-o", str(out))
    stop_mid_file(client.process, part_of(out, "big.bin"), out / "big.bin", 8 * MiB)
    client.press(b"\x03")
    started = time.monotonic()
    client.process.send_signal(signal.SIGCONT)
    status, stdout, screen = client.finish(timeout=30)
    assert time.monotonic() - started < 5
    assert status == 130, screen
    # stdout is a pipe, not the bars' terminal: the files saved are named there.
    assert sorted(stdout.splitlines()) == [str(out / "c.bin"), str(out / "small.bin")]
    assert "retrying" not in screen and "Traceback" not in screen
    lines = [line for line in screen.splitlines() if line.startswith("filecache-client: ")]
    assert lines[:2] == [
        "filecache-client: interrupted by SIGINT",
        f"filecache-client: big.bin: not finished; {part_of(out, 'big.bin')} is kept: the same get resumes it",
    ]
    assert re.fullmatch(
        r"filecache-client: 2 files: 2 fetched, 0 skipped, 0 failed, .* in [\d.]+ s",
        lines[2],
    ), lines
    assert len(lines) == 3
    assert sorted(p.name for p in out.iterdir()) == [
        ".big.bin.filecache-part", ".big.bin.filecache-part.json", "c.bin", "small.bin"
    ]
    have = part_of(out, "big.bin").stat().st_size
    assert 8 * MiB <= have < len(data)

    again = run_client("127.0.0.1", str(daemon.port), "get", "big.bin", "small.bin", "c.bin", "-o", str(out))
    assert again.returncode == 0, again.stderr
    assert (out / "big.bin").read_bytes() == data
    assert sorted(p.name for p in out.iterdir()) == ["big.bin", "c.bin", "small.bin"]
    assert f"GET big.bin {have} OK" in daemon.log_text()


@pytest.mark.system
def test_sigterm_during_get_exits_143_and_keeps_the_partial_file(
    shared: Path, daemon: Daemon, tmp_path: Path
) -> None:
    """`kill -TERM` mid-file (no terminal): exit 143, the same report, the partial file and sidecar kept."""
    (shared / "big.bin").write_bytes(os.urandom(64 * MiB))
    out = tmp_path / "out"
    process = subprocess.Popen(
        [tool("filecache-client"), "127.0.0.1", str(daemon.port), "get", "big.bin", "-o", str(out)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stop_mid_file(process, part_of(out, "big.bin"), out / "big.bin", 8 * MiB)
    process.send_signal(signal.SIGTERM)
    process.send_signal(signal.SIGCONT)
    stdout, stderr = process.communicate(timeout=30)
    assert process.returncode == 143, stderr
    assert stdout == ""
    assert stderr.splitlines() == [
        "filecache-client: interrupted by SIGTERM",
        f"filecache-client: big.bin: not finished; {part_of(out, 'big.bin')} is kept: the same get resumes it",
    ]
    assert sorted(p.name for p in out.iterdir()) == [".big.bin.filecache-part", ".big.bin.filecache-part.json"]


@pytest.mark.system
def test_ctrl_c_among_many_small_files_reports_the_rest(shared: Path, daemon: Daemon, tmp_path: Path) -> None:
    """
    SIGINT part-way through 300 small files named one by one: exit 130
    (not 0), every file on stdout is whole, and every other name is said
    on stderr, as not started or as not finished with its partial file
    kept, before the summary line.
    """
    names = [f"f{i:03d}.txt" for i in range(300)]
    for name in names:
        (shared / name).write_bytes(name.encode() * 100)
    out = tmp_path / "out"
    process = subprocess.Popen(
        [tool("filecache-client"), "127.0.0.1", str(daemon.port), "get", *names, "-o", str(out)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while not (out.exists() and len([n for n in os.listdir(out) if not n.startswith(".")]) >= 20):
        assert process.poll() is None, "the client ended before the test could interrupt it"
        assert time.monotonic() < deadline
        time.sleep(0.002)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=30)
    assert process.returncode == 130, stderr
    saved = [Path(line).name for line in stdout.splitlines()]
    assert 20 <= len(saved) < 300
    for name in saved:
        assert (out / name).read_bytes() == name.encode() * 100
    lines = stderr.splitlines()
    assert lines[0] == "filecache-client: interrupted by SIGINT"
    assert re.fullmatch(rf"filecache-client: {len(saved)} files: {len(saved)} fetched, .*", lines[-1]), lines[-1]
    kept = re.compile(r"filecache-client: (f\d{3}\.txt): not finished; .* is kept: the same get resumes it")
    unfinished = [kept.fullmatch(line)[1] for line in lines[1:-1] if kept.fullmatch(line)]  # type: ignore[index]
    rest = [line for line in lines[1:-1] if not kept.fullmatch(line)]
    not_started = rest[0].partition("): ")[2].split() if rest else []
    assert rest == ([f"filecache-client: not started ({len(not_started)}): {' '.join(not_started)}"] if rest else [])
    assert sorted(saved + unfinished + not_started) == names
    for name in unfinished:
        assert (out / f".{name}.filecache-part").is_file()


# The progress display of a mirror (issue 11)

_CSI = re.compile(r"\x1b\[([0-9;?]*)([A-Za-z])")


class Screen:
    """
    A terminal, COLUMNS wide and endless downwards, fed what the client
    wrote: text (wrapping at the edge, as terminals do), CR, LF, and the
    cursor-up and erase sequences.  L{used} is how many lines the output
    ever reached, scrolled-away ones included.
    """

    def __init__(self, columns: int = COLUMNS) -> None:
        self.columns = columns
        self.lines: dict[int, str] = {}
        self.row = self.col = 0
        self.deepest = 0

    def feed(self, text: str) -> None:
        at = 0
        while at < len(text):
            match = _CSI.match(text, at)
            if match:
                self._control(match[1], match[2])
                at = match.end()
                continue
            ch = text[at]
            at += 1
            if ch == "\r":
                self.col = 0
            elif ch == "\n":
                self.row += 1
            elif ch.isprintable():
                if self.col >= self.columns:
                    self.row, self.col = self.row + 1, 0
                line = self.lines.get(self.row, "").ljust(self.col)
                self.lines[self.row] = line[: self.col] + ch + line[self.col + 1 :]
                self.col += 1
                self.deepest = max(self.deepest, self.row)

    def _control(self, params: str, final: str) -> None:
        count = int(params) if params.isdigit() else None
        if final == "A":
            self.row = max(self.row - (count or 1), 0)
        elif final == "K":
            line = self.lines.get(self.row, "")
            self.lines[self.row] = "" if count == 2 else line[: self.col]
        elif final == "J":
            self.lines[self.row] = self.lines.get(self.row, "")[: self.col]
            for row in [r for r in self.lines if r > self.row]:
                del self.lines[row]

    @property
    def used(self) -> int:
        return self.deepest + 1

    def shown(self) -> list[str]:
        return [self.lines[r].rstrip() for r in sorted(self.lines) if self.lines[r].strip()]


def test_the_screen_model_follows_the_board_sequences() -> None:
    """The emulator the next test relies on: up, erase line and erase below, as a terminal does."""
    screen = Screen(columns=10)
    screen.feed("one\r\ntwo\r\nthree\r\x1b[2A\x1b[2Kuno\x1b[J")
    assert screen.shown() == ["uno"] and screen.used == 3
    screen.feed("\r\n" + "x" * 12)  # wraps onto a second line
    assert screen.shown() == ["uno", "x" * 10, "xx"] and screen.used == 3


def in_bursts(process: subprocess.Popen[str], run: float = 0.02, pause: float = 0.08) -> None:
    """Let C{process} run C{run} seconds at a time, stopped C{pause} seconds in between, until it ends."""
    while process.poll() is None:
        try:
            process.send_signal(signal.SIGSTOP)
            time.sleep(pause)
            process.send_signal(signal.SIGCONT)
        except ProcessLookupError:
            return
        time.sleep(run)


@pytest.mark.system
def test_mirroring_1000_files_never_takes_more_than_n_plus_3_lines(
    daemon_factory: DaemonFactory, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """
    `get -j 4` of 1,000 small files and two of 8 MiB on a terminal, stdout
    there too, run in short bursts: redrawn many times, the output never reaches more than
    4 + 3 lines of the screen (the overall bar, a bar per connection, the
    summary), and no saved name is printed among the bars.
    """
    with ram_folder(tmp_path_factory) as root:
        files = {f"tree/d{n % 10}/f{n:04d}.txt": os.urandom(1024 + n) for n in range(1000)}
        files.update({f"tree/big{n}.bin": os.urandom(8 * MiB) for n in range(2)})
        for rel, data in files.items():
            (root / "share" / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / "share" / rel).write_bytes(data)
        daemon = daemon_factory(root / "share")
        out = root / "out"
        client = OnTerminal(
            "127.0.0.1", str(daemon.port), "get", "tree/", "-o", str(out), "-j", "4", stdout_on_terminal=True
        )
        # Run it in bursts of 20 ms: the board is redrawn after each, many times over.
        slowed = threading.Thread(target=in_bursts, args=(client.process,), daemon=True)
        slowed.start()
        status, _, shown = client.finish(timeout=60)
        slowed.join(5)
        assert status == 0, shown
        screen = Screen()
        screen.feed(client.raw)
        assert screen.used <= 4 + 3, screen.shown()
        assert client.raw.count("total: ") >= 5 and "\x1b[2Ktree/" in client.raw, "the board was hardly drawn"
        assert re.fullmatch(r"filecache-client: 1,002 files: 1,002 fetched, .*", screen.shown()[-1])
        assert str(out) not in shown
        assert sum(1 for _ in out.rglob("*.txt")) == 1000


@pytest.mark.system
def test_ctrl_c_mid_mirror_then_the_same_get_resumes_and_finishes_identical(
    shared: Path, daemon: Daemon, tmp_path: Path
) -> None:
    """
    Ctrl-C on a terminal while a folder of one large and 300 small files
    comes in: exit 130, the large file's partial file kept and said; the
    same get again resumes it at its offset and leaves a copy identical to
    the share, with nothing else beside it.
    """
    files = {f"tree/s/{n:03d}.txt": os.urandom(200 + n) for n in range(300)}
    files["tree/big.bin"] = os.urandom(48 * MiB)
    for rel, data in files.items():
        (shared / rel).parent.mkdir(parents=True, exist_ok=True)
        (shared / rel).write_bytes(data)
    out = tmp_path / "out"
    client = OnTerminal("127.0.0.1", str(daemon.port), "get", "tree/", "-o", str(out))
    stop_mid_file(client.process, part_of(out / "tree", "big.bin"), out / "tree" / "big.bin", 4 * MiB)
    client.press(b"\x03")
    client.process.send_signal(signal.SIGCONT)
    status, _, screen = client.finish(timeout=30)
    assert status == 130, screen
    assert "filecache-client: interrupted by SIGINT" in screen
    assert f"tree/big.bin: not finished; {part_of(out / 'tree', 'big.bin')} is kept" in screen
    have = part_of(out / "tree", "big.bin").stat().st_size
    assert 4 * MiB <= have < 48 * MiB

    again = run_client("127.0.0.1", str(daemon.port), "get", "tree/", "-o", str(out))
    assert again.returncode == 0, again.stderr
    assert f"GET tree/big.bin {have} OK" in daemon.log_text()
    copied = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert copied.pop(".filecache-client-state.json")
    assert copied == files



_IMPORTS = """
import sys
from filecache.client.cli import load_reactor
load_reactor({tls})
from twisted.internet import endpoints
print("OpenSSL" in sys.modules, endpoints.TLSMemoryBIOFactory is not None)
"""


@pytest.mark.system
@pytest.mark.parametrize(("tls", "expected"), [(False, "False False"), (True, "True True")])
def test_the_reactor_is_loaded_without_pyopenssl_unless_tls_is_asked_for(tls: bool, expected: str) -> None:
    """
    Without --tls the client's start does not import pyOpenSSL (nor the TLS
    endpoints that need it); with --tls both are there.  A fresh interpreter
    each, since a process imports the reactor once.
    """
    done = subprocess.run(
        [sys.executable, "-c", _IMPORTS.format(tls=tls)], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.split() == expected.split()
