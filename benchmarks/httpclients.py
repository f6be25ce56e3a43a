"""
The clients of the HTTP workloads: wrk, which measures (with the Lua script
wrk.lua beside this file), and curl, which checks the bytes beforehand.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import resource
import selectors
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from benchmarks.console import BenchError
from benchmarks.processes import LOOPBACK, Processes
from benchmarks.resources import cpu_seconds, process_tree
from benchmarks.servers import Server

HERE = Path(__file__).resolve().parent
WRK_SCRIPT = HERE / "wrk.lua"
WRK_TIMEOUT_S = 10  # per request; wrk's default (2 s) would count slow servers' replies as errors
THREAD_DONE = b"wrk-thread-done\n"  # wrk.lua's "once" mode: a thread has all its replies


def find_tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if not path:
        raise BenchError(f"{name} not found: apt-get install -y {package}")
    return path


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wrk(
    procs: Processes,
    server: Server,
    url_path: str,
    *script_args: str,
    connections: int,
    threads: int,
    seconds: int,
    until_threads_done: bool = False,
) -> dict[str, Any]:
    """
    One timed wrk run against C{server}; the figures of wrk.lua's closing
    line, plus wrk's text report, its CPU time and the server's.  With
    C{until_threads_done} (wrk.lua's "once" mode) C{seconds} is only an
    upper bound: the run ends when every thread says it has its replies.
    """
    threads = min(threads, connections)
    if until_threads_done and script_args[-1:] != (str(threads),):
        raise BenchError(f"wrk: once mode for {threads} thread(s) given {script_args}")
    argv = [
        find_tool("wrk", "wrk"),
        "-t",
        str(threads),
        "-c",
        str(connections),
        "-d",
        f"{seconds}s",
        "--timeout",
        f"{WRK_TIMEOUT_S}s",
        "--latency",
        "-s",
        str(WRK_SCRIPT),
        f"http://{LOOPBACK}:{server.port}/{url_path}",
        "--",
        *script_args,
    ]
    server_tree = process_tree(server.pid)
    server_cpu = cpu_seconds(server_tree)
    # wrk is the only child reaped in between: the difference is its CPU time.
    client_cpu = _children_cpu()
    proc = procs.start(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    early, stop_lag = b"", None
    try:
        if until_threads_done:
            early, stop_lag = _interrupt_when_threads_done(proc, threads, seconds + 60)
        out, err = proc.communicate(timeout=seconds + 60)
        server_cpu = cpu_seconds(server_tree) - server_cpu
    except subprocess.TimeoutExpired:
        raise BenchError(f"wrk did not finish: {' '.join(argv)}") from None
    finally:
        procs.stop(proc)
    client_cpu = _children_cpu() - client_cpu
    text = (early + out).decode(errors="replace")
    line = next((x for x in text.splitlines() if x.startswith("wrk-json ")), None)
    if proc.returncode != 0 or line is None:
        raise BenchError(
            f"wrk failed ({proc.returncode}): {err.decode(errors='replace').strip() or text}"
        )
    result: dict[str, Any] = json.loads(line.removeprefix("wrk-json "))
    result.update(
        seconds=result["duration_us"] / 1e6,
        connections=connections,
        threads=threads,
        server_cpu_s=round(server_cpu, 3),
        client_cpu_s=round(client_cpu, 3),
        text=text.replace(line, "").rstrip(),
        argv=argv[1:],
    )
    if until_threads_done:
        result["threads_done"] = text.count(THREAD_DONE.decode().strip())
        # From reading the last thread's line to wrk's exit: at most this
        # much of wrk's duration came after the last reply.
        result["stop_lag_s"] = stop_lag
    return result


def _interrupt_when_threads_done(
    proc: subprocess.Popen[bytes], threads: int, timeout: float
) -> tuple[bytes, float | None]:
    """
    Read wrk's output until C{threads} lines of THREAD_DONE, then SIGINT it
    (our child, by its pid, not yet reaped): only that cuts short the sleep
    of wrk's main thread.  Returns what was read and the seconds from the
    last line to wrk's exit (None if it never said all were done, e.g. a
    reply lost to a connection error: then wrk runs its whole -d).
    """
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    read = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while read.count(THREAD_DONE) < threads and time.monotonic() < deadline:
            if not sel.select(timeout=1):
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                return read, None  # wrk ended by itself
            read += chunk
    if read.count(THREAD_DONE) < threads:
        return read, None
    done_at = time.monotonic()
    # SIGINT again if the first came before wrk set its handler (it would be ignored).
    while proc.returncode is None and time.monotonic() < done_at + 10:
        os.kill(proc.pid, signal.SIGINT)
        try:
            proc.wait(1)
        except subprocess.TimeoutExpired:
            continue
    return read, time.monotonic() - done_at


def wrk_problem(result: dict[str, Any], body: int, head_max: int = 4096) -> str:
    """
    Why a wrk run's figures cannot stand, or "": any error wrk counted
    (status 400 and up among them), no reply at all, or a byte count that
    does not fit C{body} bytes per reply (a 200 where a 206 was due, a 304).
    """
    errors = {k: v for k, v in result["errors"].items() if v}
    if errors:
        return "wrk counted errors: " + ", ".join(f"{k} {v:,}" for k, v in errors.items())
    done, got = result["requests"], result["bytes"]
    if done == 0:
        return "no complete reply"
    # At most one reply per connection is still in flight when time is up.
    most = (done + result["connections"]) * (body + head_max)
    if not done * body <= got <= most:
        return f"{got:,} bytes for {done:,} replies of {body:,} bytes each: not those replies"
    return ""


@functools.cache
def expected_sha256(files: tuple[Path, ...], start: int = 0, length: int = -1) -> str:
    """SHA-256 of the files' bytes one after the other (or of one range of one file)."""
    digest = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            f.seek(start)
            left = length if length >= 0 else None
            while left is None or left > 0:
                chunk = f.read(1 << 20 if left is None else min(left, 1 << 20))
                if not chunk:
                    break
                digest.update(chunk)
                if left is not None:
                    left -= len(chunk)
    return digest.hexdigest()


def curl_sha256(
    procs: Processes, port: int, paths: list[str], byte_range: str = ""
) -> tuple[str, list[int]]:
    """
    One curl fetching every path in turn (keep-alive, as a client would):
    the SHA-256 of all the bodies one after the other, and each status.
    """
    argv = [find_tool("curl", "curl"), "-sS", "--globoff", "-w", "%{stderr}%{http_code}\\n"]
    if byte_range:
        argv += ["-r", byte_range]
    argv += [f"http://{LOOPBACK}:{port}/{p}" for p in paths]
    proc = procs.start(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        digest = hashlib.sha256()
        while chunk := proc.stdout.read(1 << 20):
            digest.update(chunk)
        err = proc.stderr.read().decode(errors="replace")
        proc.wait(60)
    finally:
        procs.stop(proc)
    statuses = [int(x) for x in err.split() if x.isdigit()]
    if proc.returncode != 0 or len(statuses) != len(paths):
        raise BenchError(f"curl failed ({proc.returncode}): {err.strip()[-500:]}")
    return digest.hexdigest(), statuses


def check_bytes(
    procs: Processes,
    server: Server,
    root: Path,
    paths: list[str],
    byte_range: tuple[int, int] | None = None,
) -> str:
    """
    "" when curl gets exactly the files' bytes from C{server} (or the bytes of
    one range, as a 206), else what was wrong.
    """
    want_status = 200
    curl_range = ""
    start, length = 0, -1
    if byte_range is not None:
        start, length = byte_range
        curl_range = f"{start}-{start + length - 1}"
        want_status = 206
    got, statuses = curl_sha256(procs, server.port, paths, curl_range)
    wrong = sorted({s for s in statuses if s != want_status})
    if byte_range is not None and wrong == [200]:
        return "no Range support: curl got 200 and the whole file where 206 was due"
    if wrong:
        return f"curl: status {', '.join(map(str, wrong))} where {want_status} was due"
    want = expected_sha256(tuple(root / p for p in paths), start, length)
    if got != want:
        what = f"{len(paths)} file(s)" + (f", range {curl_range}" if curl_range else "")
        return f"curl: SHA-256 of {what} is {got[:16]}..., the files' is {want[:16]}..."
    return ""
