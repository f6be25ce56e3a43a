"""
HTTP folder listings of a 100,000-file folder under load, against a real
daemon (issue 10): clients that ask for a listing and never read cost what
unread LISTs cost, and a client that reads gets the whole listing.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    Daemon,
    DaemonFactory,
    RawClient,
    make_empty_files,
    ram_folder,
    rss_kib,
    stats,
    wait_for,
)
from httpkit import HttpConnection, fetch

FILES = 100_000

SNAPSHOT_KIB = 4 * 1024
"""What the names of the folder may cost once, whatever the number of clients."""

PER_CONNECTION_KIB = 256
"""What an unread connection may cost (the bound docs/security.md states)."""


@pytest.fixture(scope="module")
def big_share(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A shared folder holding C{big/}, 100,000 empty files, made once (in tmpfs when there is one)."""
    with ram_folder(tmp_path_factory) as root:
        (root / "big").mkdir()
        make_empty_files(root / "big", (f"file-{n:06d}.dat" for n in range(FILES)))
        yield root


def unread_listings(port: int, count: int) -> list[socket.socket]:
    """C{count} connections that each ask for the listing of C{big/} and never read."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(sock)
            # Before connecting, so the window the peer sees is small from the start.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", port))
            sock.sendall(b"GET /big/ HTTP/1.1\r\nHost: x\r\n\r\n")
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def enough_descriptors(count: int) -> None:
    """Room for C{count} sockets here and in the daemon, which inherits the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 2 * count + 256
    if soft < want:
        if hard != resource.RLIM_INFINITY and hard < want:
            pytest.skip(f"needs {want} descriptors, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def cpu_ticks(pid: int) -> int:
    """The CPU time process C{pid} has used, user and system, in clock ticks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])


def wait_until_idle(pid: int, at_least: float, at_most: float) -> float:
    """
    Wait until process C{pid} has used less than a tenth of a CPU for half
    a second (every unread listing has paused; those waiting for the
    kernel's queue still look at it now and then), from C{at_least} to
    C{at_most} seconds; return how long it took.
    """
    started = time.monotonic()
    time.sleep(at_least)
    hz = os.sysconf("SC_CLK_TCK")
    ticks = cpu_ticks(pid)
    while time.monotonic() - started < at_most:
        time.sleep(0.5)
        now = cpu_ticks(pid)
        if now - ticks < 0.05 * hz:
            break
        ticks = now
    return time.monotonic() - started


def full_listing(port: int) -> tuple[float, list[dict[str, object]]]:
    """The JSON listing of C{big/}, read to its end by one client: seconds, entries."""
    with HttpConnection(port, timeout=60) as conn:
        started = time.monotonic()
        response = conn.get("/big/?format=json")
        took = time.monotonic() - started
    assert response.status == 200, response
    entries: list[dict[str, object]] = json.loads(response.body)
    return took, entries


def native_list(port: int) -> tuple[float, int]:
    """A native LIST of the shared folder (which holds only C{big/}): seconds, rows."""
    client = RawClient(port, timeout=60)
    try:
        started = time.monotonic()
        status, rows = client.rows(b"LIST")
        took = time.monotonic() - started
    finally:
        client.close()
    assert status.startswith(b"OK"), status
    return took, len(rows)


@pytest.mark.parametrize("count", [12, 1000])
def test_unread_http_listings_share_one_snapshot_of_the_names(
    big_share: Path, daemon_factory: DaemonFactory, count: int
) -> None:
    """
    C{count} clients ask for the HTML listing of a 100,000-file folder and
    never read: the daemon grows by at most one copy of the folder's names
    plus what an unread LIST costs per connection (it held every name per
    connection before).  A client that reads gets all 100,000 entries in
    JSON; its time is printed beside a native LIST's.
    """
    enough_descriptors(count)
    daemon: Daemon = daemon_factory(
        big_share, "--max-per-ip", "2000", "--max-connections", "2000", "--no-access-log"
    )
    assert fetch(daemon.port, "/?format=json").status == 200  # everything a listing loads, loaded
    before = rss_kib(daemon.pid)
    socks = unread_listings(daemon.port, count)
    try:
        wait_for(lambda: stats(daemon.port)["http_requests"] >= count + 1, 20, "every request read")
        waited = wait_until_idle(daemon.pid, 3, 15)
        grown = rss_kib(daemon.pid) - before
        bound = SNAPSHOT_KIB + PER_CONNECTION_KIB * count
        print(
            f"\n{count} unread HTTP listings of {FILES:,} files: RSS +{grown} KiB after {waited:.1f} s"
            f" ({grown / count:.0f} KiB each; bound {bound} KiB)"
        )
        if count > 100:
            # As in the LIST test: closed first, so that the reader only
            # waits for the one step each of them takes to find its client
            # gone, not for them all to be paused again.
            for sock in socks:
                sock.close()
        took, entries = full_listing(daemon.port)
    finally:
        for sock in socks:
            sock.close()
    list_took, rows = native_list(daemon.port)
    print(f"a full JSON listing took {took:.2f} s, a native LIST of the same files {list_took:.2f} s")
    assert len(entries) == FILES
    assert entries[0]["path"] == "big/file-000000.dat" and entries[-1]["path"] == f"big/file-{FILES - 1:06d}.dat"
    assert rows == FILES
    assert grown <= bound, f"RSS grew {grown} KiB, more than {bound} KiB"
