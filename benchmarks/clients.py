"""
The clients that take the measurements: the C load generator, built from loadgen.c
and run once per measurement, and two readers of a directory listing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.console import BenchError, say
from benchmarks.processes import LOOPBACK, Processes
from benchmarks.resources import cpu_seconds, process_tree
from benchmarks.servers import Server

HERE = Path(__file__).resolve().parent
BUILD = HERE / "build"
LOADGEN_SRC = HERE / "loadgen.c"
LOADGEN = BUILD / "loadgen"


def build_loadgen() -> None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise BenchError("no C compiler: apt-get install -y gcc")
    # Built from exactly this source (its SHA-256 beside the binary): a
    # binary newer than the source may still be another checkout's.
    source = hashlib.sha256(LOADGEN_SRC.read_bytes()).hexdigest()
    stamp = LOADGEN.with_suffix(".sha256")
    if LOADGEN.exists() and stamp.exists() and stamp.read_text() == source:
        return
    BUILD.mkdir(exist_ok=True)
    argv = [cc, "-O2", "-Wall", "-Wextra", "-pthread", "-o", str(LOADGEN), str(LOADGEN_SRC)]
    say("building: " + " ".join(argv))
    done = subprocess.run(argv, check=False, capture_output=True, text=True)
    if done.returncode != 0 or done.stderr.strip():
        sys.stderr.write(done.stderr)
    if done.returncode != 0:
        raise BenchError("the load generator did not build")
    stamp.write_text(source)


def loadgen(
    procs: Processes, server: Server, *opts: str, label: str = "", limit: float = 300
) -> dict[str, Any]:
    argv = [
        str(LOADGEN),
        "-a",
        LOOPBACK,
        "-p",
        str(server.port),
        "-P",
        server.proto,
        "-L",
        label,
        "-T",
        str(limit),
        *(["-X"] if server.proxy_header else []),
        *opts,
    ]
    server_tree = process_tree(server.pid)
    server_cpu = cpu_seconds(server_tree)
    proc = procs.start(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=limit + 60)
        server_cpu = cpu_seconds(server_tree) - server_cpu
    except subprocess.TimeoutExpired:
        raise BenchError(f"loadgen did not finish: {' '.join(argv)}") from None
    finally:
        procs.stop(proc)
    if proc.returncode != 0:
        raise BenchError(
            f"loadgen failed ({proc.returncode}): {err.decode(errors='replace').strip()}"
        )
    result: dict[str, Any] = json.loads(out)
    # Includes the load generator's connection setup, like client_cpu_s.
    result["server_cpu_s"] = round(server_cpu, 3)
    return result


def _closing_line(data: bytearray) -> bytes | None:
    """The END or ERR line that closes a LIST reply, once it is in C{data}."""
    if not data.endswith(b"\n"):
        return None
    start = data.rfind(b"\n", 0, len(data) - 1) + 1
    line = bytes(data[start:])
    return line if line.startswith((b"END ", b"ERR ")) else None


def fc_list(port: int, timeout: float = 120) -> tuple[float, int, int]:
    """Send LIST, read every row; (seconds, rows, bytes)."""
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t0 = time.perf_counter()
        s.sendall(b"LIST\r\n")
        head = b""
        while b"\n" not in head:
            chunk = s.recv(65536)
            if not chunk:
                raise BenchError("LIST: connection closed before the status line")
            head += chunk
        status, _, rest = head.partition(b"\n")
        if status.rstrip(b"\r") != b"OK":
            raise BenchError(f"LIST: {status.decode(errors='replace').strip()}")
        # Rows, then END <n> (or an ERR line in its place): read to that line.
        data = bytearray(rest)
        size = len(head)
        while True:
            closing = _closing_line(data)
            if closing is not None:
                break
            chunk = s.recv(1 << 20)
            if not chunk:
                raise BenchError("LIST: connection closed before its END line")
            data += chunk
            size += len(chunk)
        if not closing.startswith(b"END "):
            raise BenchError(f"LIST: {closing.decode(errors='replace').strip()}")
        rows = int(closing.split()[1])
        came = data.count(b"\n") - 1
        if came != rows:
            raise BenchError(f"LIST: END says {rows} rows, {came} came")
        seconds = time.perf_counter() - t0
        s.sendall(b"QUIT\r\n")
    return seconds, rows, size


def http_get_all(port: int, path: str, timeout: float = 120) -> tuple[float, int, int]:
    """HTTP/1.0 GET read to the end (directory listings are not length-framed); (seconds, links, bytes)."""
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as s:
        t0 = time.perf_counter()
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: {LOOPBACK}:{port}\r\n\r\n".encode())
        parts = []
        while True:
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            parts.append(chunk)
        seconds = time.perf_counter() - t0
    body = b"".join(parts)
    status = body.split(b"\r\n", 1)[0]
    if b" 200 " not in status + b" ":
        raise BenchError(f"GET {path}: {status.decode(errors='replace')}")
    return seconds, body.count(b"<a href"), len(body)
