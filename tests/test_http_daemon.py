"""
HTTP against a real twistd, for what the daemon's options decide: TLS
(https://), several --port listeners, --no-http, and --workers.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import DaemonFactory, RawClient, make_tls_files, wait_for
from httpkit import HttpConnection, request_bytes

CURL = ["curl", "--silent", "--show-error", "--max-time", "20"]

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*CURL, *args], capture_output=True, timeout=30, check=False)


def headers_of(raw: bytes) -> dict[str, str]:
    lines = raw.decode("latin-1").split("\r\n")
    return {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if ":" in line)}


def test_https_on_an_ssl_port(shared: Path, tmp_path: Path, daemon_factory: DaemonFactory) -> None:
    """An ssl: listener serves https://, bodies streamed and cached alike, with Repr-Digest."""
    data = os.urandom(3 * 1024 * 1024 + 7)
    (shared / "big.bin").write_bytes(data)
    (shared / "small.txt").write_bytes(b"small\n")
    tls = make_tls_files(tmp_path)
    daemon = daemon_factory(shared, port=f"ssl:0:interface=127.0.0.1:privateKey={tls.key}:certKey={tls.cert}")
    base = f"https://localhost:{daemon.port}"
    for _ in range(2):  # a miss, then a hit
        out = tmp_path / "big.out"
        result = curl("--cacert", str(tls.ca), "-o", str(out), "-D", str(tmp_path / "head"), f"{base}/big.bin")
        assert result.returncode == 0, result.stderr
        assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(data).digest()
    digest = base64.b64encode(hashlib.sha256(data).digest()).decode()
    assert headers_of((tmp_path / "head").read_bytes())["repr-digest"] == f"sha-256=:{digest}:"
    small = curl("--cacert", str(tls.ca), f"{base}/small.txt")
    assert small.returncode == 0 and small.stdout == b"small\n"
    ranged = curl("--cacert", str(tls.ca), "-r", "100-199", f"{base}/big.bin")
    assert ranged.stdout == data[100:200]
    # Plain HTTP on a TLS port is not served.
    plain = curl(f"http://127.0.0.1:{daemon.port}/small.txt")
    assert plain.returncode != 0 and b"small" not in plain.stdout


def listening_ports(log: str) -> list[int]:
    return [int(port) for port in re.findall(r"starting on (\d+)", log)]


def test_every_port_speaks_both_protocols(shared: Path, daemon_factory: DaemonFactory) -> None:
    """--port given twice: two listeners, each answering native and HTTP requests."""
    (shared / "a.txt").write_bytes(b"A")
    daemon = daemon_factory(shared, "--port", "tcp:0:interface=127.0.0.1")
    wait_for(lambda: len(listening_ports(daemon.log_text())) == 2, 10, "two listeners")
    for port in listening_ports(daemon.log_text()):
        assert curl(f"http://127.0.0.1:{port}/a.txt").stdout == b"A"
        client = RawClient(port)
        try:
            assert client.get(b"a.txt")[1] == b"A"
        finally:
            client.close()


def test_no_http_answers_natively(shared: Path, daemon_factory: DaemonFactory) -> None:
    """--no-http: an HTTP request line is a native bad request; native requests are served."""
    (shared / "a.txt").write_bytes(b"A")
    daemon = daemon_factory(shared, "--no-http")
    client = RawClient(daemon.port)
    try:
        client.send(b"GET /a.txt HTTP/1.1\r\n")
        assert client.line().startswith(b"ERR bad-request ")
        assert client.get(b"a.txt")[1] == b"A"
    finally:
        client.close()
    # The native protocol keeps the connection open after an error: curl
    # gives up after its --max-time with what it read.
    result = curl("--http0.9", "--max-time", "1", f"http://127.0.0.1:{daemon.port}/a.txt")
    assert b"ERR bad-request" in result.stdout
    assert "native protocol only" in daemon.log_text()


def test_workers_serve_http_on_every_port(shared: Path, daemon_factory: DaemonFactory) -> None:
    """--workers 2 with two ports: both processes answer HTTP on both (STATS tells which answered)."""
    (shared / "a.txt").write_bytes(b"A")
    daemon = daemon_factory(shared, "--workers", "2", "--port", "tcp:0:interface=127.0.0.1")
    wait_for(lambda: "worker 1" in daemon.log_text() and "starting on" in daemon.log_text(), 20, "worker 1")
    ports = listening_ports(daemon.log_text())
    assert len(ports) == 2
    seen: set[str] = set()
    deadline = time.monotonic() + 20
    while len(seen) < 2 and time.monotonic() < deadline:
        for port in ports:
            assert curl(f"http://127.0.0.1:{port}/a.txt").stdout == b"A"
        log = daemon.log_text()
        seen = {"parent"} if re.search(r"^\S+ \[filecache[^\]]*\] \S+ HTTP/1.1 GET /a.txt 200", log, re.MULTILINE) else set()
        if re.search(r"worker 1: \[filecache[^\]]*\] \S+ HTTP/1.1 GET /a.txt 200", log):
            seen.add("worker 1")
    assert seen == {"parent", "worker 1"}, daemon.log_text()[-2000:]


def _small_receive_buffer(sock: socket.socket) -> None:
    # Set before anything is read, so that the window the daemon sees stays small.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)


def test_bodies_sent_at_once_or_left_to_the_producer(shared: Path, daemon_factory: DaemonFactory) -> None:
    """
    A body the kernel copies goes to the socket from the read of its
    request, and whatever the socket does not take then is left to the
    producer: pipelined ranges and a whole uncached file, to a client with
    a small receive buffer who waits before reading, come back whole and in
    order on a connection that stays open; so do two native GETs of the
    file once its digest is known, each closed by its END line.
    """
    data = os.urandom(6 * 1024 * 1024 + 5)
    (shared / "big.bin").write_bytes(data)
    daemon = daemon_factory(shared, "--cache-size", "1M")
    asked = [(0, 99), (1000, 4 * 1024 * 1024), (len(data) - 10, len(data) - 1), (None, None), (7, 7)]
    with HttpConnection(daemon.port) as conn:
        _small_receive_buffer(conn.sock)
        requests = [
            ("GET", "/big.bin", [] if first is None else [("Range", f"bytes={first}-{last}")])
            for first, last in asked
        ]
        conn.send(b"".join(request_bytes(m, t, h, host=conn.host) for m, t, h in requests))
        for method, _target, _headers in requests:
            conn.expect(method)
        time.sleep(0.5)  # the send buffer fills: the big bodies are sent in parts
        for first, last in asked:
            response = conn.read_response()
            if first is None or last is None:
                assert response.status == 200 and response.body == data
            else:
                assert response.status == 206 and response.body == data[first : last + 1]
        conn.assert_open()
    raw = RawClient(daemon.port)
    try:
        _small_receive_buffer(raw.sock)
        assert raw.get(b"big.bin")[1] == data  # read and hashed: its digest is known from now on
        raw.send(b"GET big.bin 0\r\nGET big.bin 3\r\n")
        time.sleep(0.5)
        for offset in (0, 3):
            status, body, end = raw.read_get()
            assert status.startswith(b"OK "), status
            assert body == data[offset:]
            assert end == b"END " + hashlib.sha256(body).hexdigest().encode() + b"\r\n"
    finally:
        raw.sock.close()
