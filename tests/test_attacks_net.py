"""
Attacks on a real daemon over loopback sockets (issue 8, items 9, 11, 12
and 13): a herd of HASHes, IPv4-mapped allow entries, slow readers and cut
transfers, each scaled to finish in seconds.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import struct
import time
from pathlib import Path

import pytest
from conftest import Daemon, DaemonFactory, RawClient, stats, wait_for

MIB = 1 << 20

# Bound to the IPv4-mapped loopback address: an AF_INET6 socket that a
# client reaching 127.0.0.1 connects to, its peer seen as ::ffff:127.0.0.1.
MAPPED_LISTENER = r"tcp6:0:interface=\:\:ffff\:127.0.0.1"

# Linux's tcp_states.h: the first byte of struct tcp_info.
TCP_ESTABLISHED = 1



def write_random(path: Path, size: int) -> str:
    """Fill C{path} with C{size} random bytes; return their SHA-256 hex."""
    hasher = hashlib.sha256()
    with path.open("wb") as f:
        for _ in range(size // MIB):
            chunk = os.urandom(MIB)
            hasher.update(chunk)
            f.write(chunk)
    return hasher.hexdigest()


def rchar(pid: int) -> int:
    """Bytes process C{pid} has read through read-like system calls."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == "rchar":
            return int(value)
    raise AssertionError(f"no rchar in /proc/{pid}/io")


def tcp_state(sock: socket.socket) -> int:
    """The kernel's TCP state of C{sock} (C{TCP_ESTABLISHED} while open both ways)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    state: int = struct.unpack("B", info[:1])[0]
    return state


def full_get(port: int, path: bytes, digest: str) -> None:
    """GET C{path} whole over a connection of its own and check its END."""
    client = RawClient(port, timeout=30)
    try:
        status, body, end = client.get(path)
    finally:
        client.close()
    assert status.startswith(b"OK "), status
    assert end == b"END %s\r\n" % digest.encode(), end
    assert hashlib.sha256(body).hexdigest() == digest


# Item 9


def test_concurrent_hashes_of_one_file_read_it_once(
    shared: Path, daemon_factory: DaemonFactory
) -> None:
    """
    Item 9: 64 HASHes of one uncached 32 MiB file sent at once on 64
    connections all get C{OK <size> <version> <sha256>} with the right
    digest, and the daemon reads the file about once for all of them (its
    C{rchar} grows by less than twice the file's size), not once each.
    """
    size = 32 * MIB
    digest = write_random(shared / "big.bin", size)
    daemon = daemon_factory(shared, "--cache-size", "1M", "--max-per-ip", "128", "--no-access-log")
    clients = [RawClient(daemon.port, timeout=15) for _ in range(64)]
    try:
        before = rchar(daemon.pid)
        for client in clients:
            client.send(b"HASH big.bin\r\n")
        replies = [client.line() for client in clients]
        grown = rchar(daemon.pid) - before
    finally:
        for client in clients:
            client.close()
    print(
        f"rchar grew by {grown} bytes for 64 HASHes of {size} bytes ({grown / size:.2f} file reads)"
    )
    for reply in replies:
        words = reply.split()
        assert len(words) == 4 and words[0] == b"OK", reply
        assert int(words[1]) == size, reply
        assert words[3].decode() == digest, reply
    assert len({reply.split()[2] for reply in replies}) == 1, "one version for all"
    assert grown < 2 * size, f"the file was read {grown / size:.1f} times for 64 concurrent HASHes"


# Item 11


def refused_unread(port: int) -> bool:
    """Whether a client from 127.0.0.1 is closed without a byte of reply."""
    client = RawClient(port, timeout=5)
    try:
        try:
            client.send(b"GET a.txt\r\n")
        except (BrokenPipeError, ConnectionResetError):
            return True
        return client.closed_by_peer() and client.buffer == b""
    finally:
        client.close()


@pytest.mark.parametrize("allow", ["::ffff:127.0.0.1", "::ffff:0:0/96"])
def test_mapped_allow_entry_serves_the_host_it_names(
    shared: Path, daemon_factory: DaemonFactory, allow: str
) -> None:
    """
    Item 11: on a C{tcp6:} listener, where a client from 127.0.0.1 shows
    as C{::ffff:127.0.0.1}, C{--allow} given that address (or all of
    C{::ffff:0:0/96}) in its IPv4-mapped form serves that client; and
    C{--allow 10.0.0.0/8} on the same kind of listener still closes it
    before any byte, so the allow-list is really applied there.
    """
    (shared / "a.txt").write_bytes(b"mapped\n")
    daemon = daemon_factory(shared, "--allow", allow, port=MAPPED_LISTENER)
    client = RawClient(daemon.port, timeout=5)
    try:
        status, body, end = client.get(b"a.txt")
    except (EOFError, ConnectionResetError) as e:
        raise AssertionError(
            f"--allow {allow} refused 127.0.0.1 on a tcp6 listener: {e!r}"
        ) from None
    finally:
        client.close()
    assert status.startswith(b"OK 7 "), status
    assert body == b"mapped\n"
    assert end.startswith(b"END ")
    wait_for(lambda: "GET a.txt OK" in daemon.log_text(), 5, "the access log line")
    assert "[::ffff:127.0.0.1]:" in daemon.log_text(), "the peer shows as IPv4-mapped"

    outside = daemon_factory(shared, "--allow", "10.0.0.0/8", port=MAPPED_LISTENER)
    assert refused_unread(outside.port)
    wait_for(
        lambda: "refused connection from ::ffff:127.0.0.1" in outside.log_text(),
        5,
        "the refusal in the log",
    )


# Item 12


class TrickleReader:
    """A connection that sent C{GET} and takes 4 KiB a tick, no faster."""

    def __init__(self, port: int, path: bytes) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.sendall(b"GET " + path + b"\r\n")
        self.sock.setblocking(False)
        self.received = 0
        self.late = 0
        self.failure = ""

    def take(self, late: bool) -> None:
        if self.failure:
            return
        try:
            chunk = self.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError as e:
            self.failure = repr(e)
            return
        if not chunk:
            self.failure = "EOF"
            return
        self.received += len(chunk)
        if late:
            self.late += len(chunk)


def read_status_line(sock: socket.socket) -> bytes:
    """The status line, one byte at a time, so that no body byte is taken."""
    line = b""
    while not line.endswith(b"\n"):
        byte = sock.recv(1)
        if not byte:
            raise EOFError(line)
        line += byte
    return line


# A reader taking 4 KiB every 0.1 s frees the two 64 KiB segments after
# which a loopback receiver opens its window again only every 3.2 s or so;
# the sender's unsent-byte count, all the daemon can see, changes no more
# often than that.  So the idle timeout here is 4 s: docs/protocol.md states
# the rule (about 3 KiB per timeout on Ethernet, 128 KiB on loopback).
@pytest.mark.parametrize("idle", [4])
def test_slow_readers_that_keep_reading_are_not_aborted(
    shared: Path, daemon_factory: DaemonFactory, idle: int
) -> None:
    """
    Item 12: with C{--idle-timeout} 4 s, 40 clients each taking 4 KiB
    of a cached 48 MiB file every 0.1 s for 10 s (far slower than the
    kernel's send buffer drains, so the socket stays unwritable for longer
    than the timeout) are never reset nor closed, and each still receives
    tens of KiB in the last 4 s; while a client that reads nothing after
    the status line is still aborted within a few idle timeouts.
    """
    size = 48 * MIB
    run = 10.0
    digest = write_random(shared / "big.bin", size)
    daemon = daemon_factory(shared, "--idle-timeout", str(idle), "--max-per-ip", "128")
    full_get(daemon.port, b"big.bin", digest)
    assert stats(daemon.port)["cache_files"] == 1, "the file is served from memory"

    staller = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
    readers = [TrickleReader(daemon.port, b"big.bin") for _ in range(40)]
    try:
        staller.sendall(b"GET big.bin\r\n")
        assert read_status_line(staller).startswith(b"OK %d " % size)
        started = time.monotonic()
        stall_closed_after: float | None = None
        tick = 0
        while True:
            now = time.monotonic() - started
            if now >= run:
                break
            for reader in readers:
                reader.take(late=now >= run - 4)
            if stall_closed_after is None and tcp_state(staller) != TCP_ESTABLISHED:
                stall_closed_after = now
            tick += 1
            time.sleep(max(0.0, started + tick * 0.1 - time.monotonic()))
        states = [tcp_state(reader.sock) for reader in readers]
    finally:
        staller.close()
        for reader in readers:
            reader.sock.close()
    failures = [r.failure for r in readers if r.failure]
    closed = sum(state != TCP_ESTABLISHED for state in states)
    late = sorted(r.late for r in readers)
    print(
        f"idle {idle} s: {len(failures)} of 40 slow readers failed {failures[:1]}, "
        f"{closed} closed by the server; bytes in the last 4 s: min {late[0]}, max {late[-1]}; "
        f"the non-reader was closed after {stall_closed_after} s"
    )
    assert not failures, f"{len(failures)} of 40 slow readers were cut: {failures[:3]}"
    assert closed == 0, f"{closed} of 40 slow readers were closed by the server"
    assert late[0] >= 32 * 1024, f"a slow reader got only {late[0]} bytes in the last 4 s"
    assert stall_closed_after is not None, f"a client reading nothing was not aborted in {run} s"
    assert stall_closed_after < 4 * idle, stall_closed_after
    assert daemon.log_text().count(f"reply not read for {idle:.1f} s; closing") == 1


# Item 13

_CUT_LINE = re.compile(r"(\S+) GET big\.bin cut (\d+) (\S+) (\S+)\s*$", re.MULTILINE)


def cut_after(daemon: Daemon, size: int, fraction: float) -> tuple[int, int, str]:
    """
    GET big.bin, read C{fraction} of its body, hang up; return (body bytes
    received, the byte count the access log gives the cut reply, its cache
    column).
    """
    want = int(size * fraction)
    client = RawClient(daemon.port, timeout=15)
    client.send(b"GET big.bin\r\n")
    status = client.line()
    assert status.startswith(b"OK %d " % size), status
    received = len(client.exactly(want))
    client.close()
    wait_for(
        lambda: _CUT_LINE.search(daemon.log_text()), 10, "the access log line of the cut reply"
    )
    match = _CUT_LINE.search(daemon.log_text())
    assert match is not None
    return received, int(match.group(2)), match.group(4)


def test_cut_disk_transfer_logs_and_counts_the_bytes_sent(
    shared: Path, daemon_factory: DaemonFactory
) -> None:
    """
    Item 13, from disk: a client that takes 30% of an uncached 64 MiB file
    and hangs up is logged C{cut <n>} with n at least what it received and
    less than the file, and STATS C{bytes_sent} grows by exactly that n.
    """
    size = 64 * MIB
    write_random(shared / "big.bin", size)
    daemon = daemon_factory(shared, "--cache-size", "1M")
    before = stats(daemon.port)["bytes_sent"]
    received, logged, cache = cut_after(daemon, size, 0.3)
    grown = stats(daemon.port)["bytes_sent"] - before
    print(
        f"received {received}, logged cut {logged} ({cache}), bytes_sent grew by {grown} of {size}"
    )
    assert cache == "miss"
    assert received <= logged < size, f"logged cut {logged} for {received} received of {size}"
    assert grown == logged, f"bytes_sent grew by {grown}, the log says {logged}"


def test_cut_memory_transfer_logs_and_counts_the_bytes_sent(
    shared: Path, daemon_factory: DaemonFactory
) -> None:
    """
    Item 13, from the cache: a client that takes 30% of a cached 48 MiB
    file (default 64M cache, sent from memory) and hangs up is logged
    C{cut <n>} with n at least what it received and less than the file,
    and STATS C{bytes_sent} grows by exactly that n.
    """
    size = 48 * MIB
    digest = write_random(shared / "big.bin", size)
    daemon = daemon_factory(shared)
    full_get(daemon.port, b"big.bin", digest)
    warm = stats(daemon.port)
    assert warm["cache_files"] == 1, "the file is served from memory"
    received, logged, cache = cut_after(daemon, size, 0.3)
    grown = stats(daemon.port)["bytes_sent"] - warm["bytes_sent"]
    print(
        f"received {received}, logged cut {logged} ({cache}), bytes_sent grew by {grown} of {size}"
    )
    assert cache == "hit"
    assert received <= logged < size, f"logged cut {logged} for {received} received of {size}"
    assert grown == logged, f"bytes_sent grew by {grown}, the log says {logged}"
