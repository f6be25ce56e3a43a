"""
The real filecache-client against hostile servers on loopback: a LIST that
never ends, replies dripped a byte at a time, a listing that fails part-way.
Each must end in a clear exit status, in bounded time and memory.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import pytest
from conftest import LoopbackServer, tool

from filecache import wire

pytestmark = pytest.mark.system

PROG = "filecache-client: "
VERSION = b"2a-64-18ea3fdc92c71808"

Handler = Callable[[socket.socket, bytes, threading.Event], None]


class HostileServer(LoopbackServer):
    """
    A loopback server in a thread: for each connection it reads the first
    request line and hands the socket to C{handler(conn, line, stopping)},
    which sends whatever it likes.  As a context manager it always stops its
    thread; the thread also ends by itself after C{lifetime} seconds.
    """

    def __init__(self, handler: Handler, lifetime: float = 60.0) -> None:
        self._handler = handler
        self._lifetime = lifetime
        super().__init__("hostile-filecache")

    def _run(self) -> None:
        deadline = time.monotonic() + self._lifetime
        # A daemon thread, cancelled when the server stops: a pending timer
        # kept the test process from exiting for up to a minute.
        timer = threading.Timer(self._lifetime, self.stopping.set)
        timer.daemon = True
        timer.start()
        try:
            self._accept_until(deadline)
        finally:
            timer.cancel()

    def _accept_until(self, deadline: float) -> None:
        while not self.stopping.is_set() and time.monotonic() < deadline:
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(0.5)
                line = b""
                try:
                    while b"\n" not in line and not self.stopping.is_set():
                        try:
                            chunk = conn.recv(4096)
                        except TimeoutError:
                            continue
                        if not chunk:
                            break
                        line += chunk
                    if b"\n" in line:
                        self._handler(conn, line.partition(b"\n")[0].rstrip(b"\r"), self.stopping)
                except OSError:
                    pass


def send(conn: socket.socket, data: bytes, stopping: threading.Event) -> bool:
    """Send C{data}, giving up when the client is gone or the server stops."""
    view = memoryview(data)
    while view and not stopping.is_set():
        try:
            sent = conn.send(view)
        except TimeoutError:
            continue
        except OSError:
            return False
        view = view[sent:]
    return not view


def drip(data: bytes, every: float = 0.5) -> Handler:
    """A handler that sends C{data} one byte every C{every} seconds."""

    def handler(conn: socket.socket, line: bytes, stopping: threading.Event) -> None:
        for byte in data:
            if stopping.wait(every) or not send(conn, bytes([byte]), stopping):
                return

    return handler


def run(
    port: int, *args: str, timeout: float = 60
) -> tuple[int, str, str, float, int]:
    """Run filecache-client; return (status, stdout, stderr, seconds, peak RSS in KiB)."""
    started = time.monotonic()
    process = subprocess.Popen(
        [tool("filecache-client"), "127.0.0.1", str(port), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    result: dict[str, bytes] = {}

    def read(name: str, stream: IO[bytes]) -> None:
        result[name] = stream.read()

    readers = [
        threading.Thread(target=read, args=("out", process.stdout)),
        threading.Thread(target=read, args=("err", process.stderr)),
    ]
    for reader in readers:
        reader.start()
    deadline = started + timeout
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            process.kill()
            os.wait4(process.pid, 0)
            pytest.fail(f"the client was still running after {timeout} s")
        time.sleep(0.05)
    process.returncode = os.waitstatus_to_exitcode(status)
    for reader in readers:
        reader.join(10)
    elapsed = time.monotonic() - started
    return (
        process.returncode,
        result["out"].decode(errors="replace"),
        result["err"].decode(errors="replace"),
        elapsed,
        usage.ru_maxrss,
    )


# Unbounded replies


def endless_list(conn: socket.socket, line: bytes, stopping: threading.Event) -> None:
    """OK, then rows for ever (never END)."""
    rows = b"".join(b"1 1700000000 - f%07d\r\n" % i for i in range(10_000))
    if not send(conn, b"OK\r\n", stopping):
        return
    while send(conn, rows, stopping):
        pass


def test_an_endless_list_is_cut_at_max_list_rows() -> None:
    """
    A server that sends LIST rows for ever: the client stops at
    wire.MAX_LIST_ROWS rows with a clear error (exit 4) and no listing,
    in bounded time and memory (the issue saw 291 to 413 MiB in 6 s, and
    growing).
    """
    with HostileServer(endless_list) as server:
        status, out, err, seconds, rss_kib = run(server.port, "list", timeout=120)
    assert status == 4, err
    assert err.splitlines() == [
        PROG + f"integrity check failed: the LIST reply holds more than {wire.MAX_LIST_ROWS:,} rows"
    ]
    assert out == ""
    assert rss_kib < 512 * 1024, f"peak RSS {rss_kib} KiB"
    print(f"endless LIST: cut after {seconds:.1f} s, peak RSS {rss_kib / 1024:.0f} MiB")


# Dripped replies


# The drips below take 15 s or more to send a status line, and a minute for
# the whole reply: a client whose timer any byte resets would take that long,
# far past the bound of each test, at --timeout 1 (one window) as at 2.


def test_a_dripped_status_line_is_bounded_by_the_timeout(tmp_path: Path) -> None:
    """
    A GET status line sent one byte every 0.5 s, each byte resetting a
    silence timer: with --timeout 1 the client gives up about 1 s after
    its request (exit 3), not when the server is done.
    """
    handler = drip(b"OK 100 " + VERSION + b"\r\n" + b"x" * 100)
    out = tmp_path / "out"
    with HostileServer(handler) as server:
        status, _, err, seconds, _ = run(
            server.port, "get", "f.bin", "-o", str(out), "--timeout", "1", "--retries", "0", timeout=30
        )
    assert status == 3, err
    assert err.splitlines() == [PROG + "f.bin: timed out waiting for the server"]
    assert 1 <= seconds < 8


def test_a_dripped_body_is_cut_as_too_slow_and_its_part_kept(tmp_path: Path) -> None:
    """
    A prompt status line, then the body a byte every 0.5 s: with --timeout 1
    the client gives up after one window (exit 3, "too slow"), keeping what
    came for a later resume.
    """

    def handler(conn: socket.socket, line: bytes, stopping: threading.Event) -> None:
        if send(conn, b"OK 100 " + VERSION + b"\r\n", stopping):
            drip(b"x" * 100)(conn, line, stopping)

    out = tmp_path / "out"
    with HostileServer(handler) as server:
        status, _, err, seconds, _ = run(
            server.port, "get", "f.bin", "-o", str(out), "--timeout", "1", "--retries", "0", timeout=30
        )
    names = sorted(os.listdir(out))
    assert status == 3, err
    assert err.splitlines() == [PROG + "f.bin: the server is too slow: under 16 KiB in 1 s"]
    assert 1 <= seconds < 8
    assert names == [".f.bin.filecache-part", ".f.bin.filecache-part.json"]


def test_dripped_list_rows_are_cut_as_too_slow() -> None:
    """LIST rows dripped (20 bytes a second): exit 3 within a few --timeout windows, no listing."""
    handler = drip(b"OK\r\n" + b"1 1700000000 - a.txt\r\n" * 100 + b"END 100\r\n", every=0.05)
    with HostileServer(handler) as server:
        status, out, err, seconds, _ = run(server.port, "list", "--timeout", "1", timeout=30)
    assert status == 3, err
    assert err.splitlines() == [PROG + "the server is too slow: under 16 KiB in 1 s"]
    assert out == ""
    assert seconds < 8


# A file that appears under the final name meanwhile (issue 8, item 18)


def test_a_file_that_appears_under_the_final_name_is_not_replaced(tmp_path: Path) -> None:
    """
    While f.bin downloads, someone else creates DIR/f.bin: without --force
    the verified download does not replace it (exit 5); the partial file is
    kept, so `get --force` can finish without fetching again.
    """
    import hashlib

    out = tmp_path / "out"
    out.mkdir()
    body = b"z" * 1000

    def handler(conn: socket.socket, line: bytes, stopping: threading.Event) -> None:
        if not send(conn, b"OK 1000 " + VERSION + b"\r\n" + body[:500], stopping):
            return
        stopping.wait(0.5)
        (out / "f.bin").write_bytes(b"someone else's")
        tail = body[500:] + b"END " + hashlib.sha256(body).hexdigest().encode() + b"\r\n"
        send(conn, tail, stopping)
        stopping.wait(1)

    with HostileServer(handler) as server:
        status, out_text, err, _, _ = run(
            server.port, "get", "f.bin", "-o", str(out), "--retries", "0", timeout=30
        )
    assert status == 5, err
    assert err.splitlines() == [PROG + f"f.bin: {out / 'f.bin'} exists (use --force to overwrite)"]
    assert out_text == ""
    assert (out / "f.bin").read_bytes() == b"someone else's"
    assert (out / ".f.bin.filecache-part").read_bytes() == body


# A listing that fails part-way


def test_a_listing_that_fails_part_way_prints_no_rows() -> None:
    """Rows, then ERR unavailable instead of END: exit 1 with the server's error, nothing on stdout."""

    def handler(conn: socket.socket, line: bytes, stopping: threading.Event) -> None:
        send(conn, b"OK\r\n1 1700000000 - a.txt\r\nERR unavailable scan limit reached\r\n", stopping)
        stopping.wait(1)

    with HostileServer(handler) as server:
        status, out, err, _, _ = run(server.port, "list", timeout=30)
    assert status == 1, err
    assert err.splitlines() == [PROG + "server error unavailable: scan limit reached"]
    assert out == ""
