"""
Graceful drain: on SIGTERM the daemon stops accepting at once, lets replies in
flight finish within --drain-timeout, then exits 0.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import threading
import time
from pathlib import Path

from conftest import DaemonFactory, RawClient, stats, wait_for
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from filecache.daemon.cache import FifoCache
from filecache.daemon.folder import SharedFolder
from filecache.daemon.native import FileCacheFactory, FileCacheProtocol
from filecache.daemon.responder import Responder

MiB = 1024 * 1024


def slow_get(
    port: int, name: bytes, rate: int, result: dict[str, object], started: threading.Event
) -> None:
    """Download C{name} reading about C{rate} bytes a second; record what came."""
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)
    s.sendall(b"GET " + name + b"\r\n")
    data = bytearray()
    s.settimeout(30)
    try:
        while True:
            chunk = s.recv(64 * 1024)
            if not chunk:
                break
            started.set()
            data += chunk  # a bytearray grows in place: no copy per chunk
            time.sleep(len(chunk) / rate)
    except OSError as e:
        result["error"] = e
    s.close()
    result["data"] = bytes(data)


def test_sigterm_lets_a_slow_download_finish(shared: Path, daemon_factory: DaemonFactory) -> None:
    """SIGTERM mid-download: new connections are refused, the download completes intact, exit status 0."""
    # 1.5 s of reading; the daemon has written all but its send buffer and
    # the reader's 256 KiB (4.25 MiB at most) after 1.3 s.  SIGTERM comes as
    # soon as the first bytes are in, and the checks below 0.3 s later: a
    # margin of about a second, as before (SIGTERM at 0.5 s of 2 s).
    content = os.urandom(36 * MiB)
    (shared / "big.bin").write_bytes(content)
    daemon = daemon_factory(shared, "--drain-timeout", "30")
    result: dict[str, object] = {}
    started = threading.Event()
    reader = threading.Thread(
        target=slow_get, args=(daemon.port, b"big.bin", 24 * MiB, result, started)
    )
    reader.start()
    assert started.wait(10), "the download did not start"
    daemon.process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    refused = False
    try:
        socket.create_connection(("127.0.0.1", daemon.port), timeout=2).close()
    except ConnectionRefusedError:
        refused = True
    assert refused, "the daemon still accepted a connection while draining"
    assert daemon.process.poll() is None, "the daemon exited before the download finished"
    reader.join(60)
    assert daemon.process.wait(30) == 0
    daemon.stopped = True
    data = result["data"]
    assert isinstance(data, bytes)
    head, _, rest = data.partition(b"\r\n")
    assert head.startswith(b"OK %d " % len(content))
    assert rest[: len(content)] == content
    assert rest[len(content):] == b"END " + hashlib.sha256(content).hexdigest().encode() + b"\r\n"
    log = daemon.log_text()
    assert "draining: 1 replies in flight" in log
    assert "Traceback" not in log


def test_drain_timeout_aborts_what_is_left(shared: Path, daemon_factory: DaemonFactory) -> None:
    """A reply still unfinished at --drain-timeout is aborted and the daemon exits 0 on time."""
    (shared / "big.bin").write_bytes(os.urandom(64 * MiB + 1))
    daemon = daemon_factory(shared, "--drain-timeout", "1")
    stuck = socket.create_connection(("127.0.0.1", daemon.port))
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.sendall(b"GET big.bin\r\n")
    idle = RawClient(daemon.port)
    probes = 0

    def both_in() -> bool:
        # Both connected (the STATS probe is the third) and the GET read:
        # STATS counts every request, itself and each earlier probe included.
        nonlocal probes
        probes += 1
        figures = stats(daemon.port)
        return figures["connections_active"] == 3 and figures["requests"] > probes

    wait_for(both_in, 10, "both connections and the stuck GET")
    t0 = time.monotonic()
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.process.wait(20) == 0
    daemon.stopped = True
    assert 0.8 < time.monotonic() - t0 < 10
    assert idle.closed_by_peer()
    assert "drain timeout: aborting 1 connections" in daemon.log_text()
    stuck.close()


def test_drain_in_memory(tmp_path: Path) -> None:
    """drain(): idle connections close at once; the Deferred fires when the last one is gone."""
    clock = Clock()
    factory = FileCacheFactory(Responder(SharedFolder(str(tmp_path)), FifoCache(1024)), clock=clock)
    protocols: list[tuple[FileCacheProtocol, StringTransport]] = []
    for port in (1, 2):
        proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", port))
        assert isinstance(proto, FileCacheProtocol)
        transport = StringTransport()
        # StringTransport declares no protocol attribute; real transports have one.
        transport.protocol = proto  # type: ignore[attr-defined]
        proto.makeConnection(transport)
        protocols.append((proto, transport))
    fired: list[None] = []
    factory.drain(5).addCallback(fired.append)
    assert all(t.disconnecting for _, t in protocols)
    assert fired == []
    for proto, _transport in protocols:
        # FileCacheProtocol.connectionLost defaults its reason to None, but
        # declares it a Failure, as Protocol does.
        proto.connectionLost(None)  # type: ignore[arg-type]
    assert fired == [None]
    assert clock.getDelayedCalls() == []
