#!/usr/bin/env python3
"""
The filecache benchmark: one command that builds the load generator, makes the
data set, starts nginx, twistd web and filecache on the same folder, runs every
workload against each of them in turn and prints a markdown table with the
filecache/nginx and filecache/twistd-web ratios.  See benchmarks/README.md.

    python3 benchmarks/run.py [--quick] [--workers N] [--only 1,4] [--write]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, final

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BUILD = HERE / "build"
WORK = HERE / "work"
LOADGEN_SRC = HERE / "loadgen.c"
LOADGEN = BUILD / "loadgen"

LOOPBACK = "127.0.0.1"
CACHE_SIZE = "64M"
CACHE_BYTES = 64 << 20
MAX_PER_IP = 1024

SMALL_FILES = 1_000
SMALL_SIZE = 4096
COLD_FILES = 10_000
LIST_FILES = 100_000
BIG = "big48.bin"
BIG_SIZE = 48 << 20
HUGE = "big200.bin"
HUGE_SIZE = 200 << 20
DATASET_VERSION = "filecache-bench-data v1"

FILECACHE = "filecache"
NGINX = "nginx"
TWISTD_WEB = "twistd-web"
SERVER_NAMES = (FILECACHE, NGINX, TWISTD_WEB)


def say(message: str) -> None:
    """Progress goes to stderr; stdout carries only the report."""
    print(message, file=sys.stderr, flush=True)


class BenchError(Exception):
    """A setup step failed; the message says what to do."""


# --- processes ---------------------------------------------------------------


class Processes:
    """
    Every process this script starts, each the leader of its own process
    group (start_new_session), so that stopping one stops its children too.
    Only these groups are ever signalled: never anything found by name.
    """

    def __init__(self) -> None:
        self._live: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], log: Path | None = None, **kw: Any) -> subprocess.Popen[bytes]:
        if log is None:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True, **kw)
        else:
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "ab") as out:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    **kw,
                )
        self._live.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
        """
        SIGTERM to the process group, SIGKILL after C{grace} seconds, then
        SIGKILL to whatever is left of the group, and only then reap the
        leader: until it is reaped its pid (the group id) cannot be reused,
        so no other process can be signalled by mistake.
        """
        if proc not in self._live:
            return
        try:
            if proc.returncode is None:  # not reaped: the group id is still ours
                _signal_group(proc.pid, signal.SIGTERM)
                if not wait_exit(proc, grace):
                    say(f"  pid {proc.pid} ignored SIGTERM for {grace:.0f} s: SIGKILL")
                    _signal_group(proc.pid, signal.SIGKILL)
                    wait_exit(proc, 5)
                _signal_group(proc.pid, signal.SIGKILL)  # children that outlived it
                proc.wait(5)
        finally:
            self._live.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self._live)):
            try:
                self.stop(proc, grace=5.0)
            except Exception as e:  # noqa: BLE001 -- keep stopping the others
                say(f"  could not stop pid {proc.pid}: {e}")


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def exit_status(proc: subprocess.Popen[bytes]) -> int | None:
    """
    The exit status if the process has ended, else None, without reaping it
    (Popen.poll would reap it and free its pid for reuse).
    """
    if proc.returncode is not None:
        return proc.returncode
    try:
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return -1
    if info is None or info.si_pid == 0:
        return None
    return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status


def wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Wait up to C{timeout} seconds for the process to end, without reaping it."""
    deadline = time.monotonic() + timeout
    while exit_status(proc) is None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def wait_listening(
    proc: subprocess.Popen[bytes], port: int, name: str, log: Path, timeout: float = 30
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = exit_status(proc)
        if status is not None:
            raise BenchError(f"{name} exited with status {status} at start:\n{tail(log)}")
        try:
            with socket.create_connection((LOOPBACK, port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise BenchError(
        f"{name} did not listen on {LOOPBACK}:{port} within {timeout:.0f} s:\n{tail(log)}"
    )


def tail(log: Path, lines: int = 8) -> str:
    try:
        text = log.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("    " + line for line in text[-lines:])


# --- memory ------------------------------------------------------------------


def _status_kib(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(key.encode() + b":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def proc_stat_fields(pid: int) -> list[bytes]:
    """The fields of /proc/PID/stat after "pid (comm)", or [] if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return []
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
    return stat[stat.rfind(b")") + 2 :].split()


def process_tree(root: int) -> list[int]:
    """root and all its descendants, from the ppid field of /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = proc_stat_fields(int(entry))
        if fields:
            children.setdefault(int(fields[1]), []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time used so far by these processes."""
    total = 0
    for pid in pids:
        fields = proc_stat_fields(pid)
        if fields:
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def rss_mib(pids: list[int]) -> float:
    return sum(_status_kib(pid, "VmRSS") for pid in pids) / 1024


@final
class RssSampler:
    """
    Samples the resident memory of a process and its children (summed) every
    ~50 ms on a thread, while in a C{with} block.  The tree is re-read every
    second; the samples themselves read one small /proc file per process.
    """

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_mib = 0.0
        self.before_mib = 0.0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self.before_mib = rss_mib(process_tree(self.pid))
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        pids = process_tree(self.pid)
        refreshed = time.monotonic()
        while True:
            if time.monotonic() - refreshed > 1.0:
                pids = process_tree(self.pid)
                refreshed = time.monotonic()
            self.peak_mib = max(self.peak_mib, rss_mib(pids))
            self.samples += 1
            if self._stop.wait(self.interval):
                break
        self.peak_mib = max(self.peak_mib, rss_mib(process_tree(self.pid)))


# --- data set ----------------------------------------------------------------


@dataclass
class DataSet:
    root: Path  # served by every server for workloads 1-5
    listdir: Path  # 100,000 files, for workload 6 only
    small_list: Path  # paths of the 1,000 4 KiB files
    cold_list: Path  # paths of the 10,000 cold files


def make_dataset(fresh: bool) -> DataSet:
    data = WORK / "data"
    listdir = WORK / "listdir"
    lists = WORK / "lists"
    stamp = WORK / "dataset.stamp"
    ds = DataSet(data, listdir, lists / "small.txt", lists / "cold.txt")
    spec = f"{DATASET_VERSION} {SMALL_FILES} {SMALL_SIZE} {COLD_FILES} {LIST_FILES} {BIG_SIZE} {HUGE_SIZE}"
    if not fresh and stamp.exists() and stamp.read_text() == spec:
        say(f"data set: reusing {WORK} (--fresh-data to rebuild)")
        return ds
    say(f"data set: making it in {WORK} (about 250 MiB and 111,000 small files)...")
    t0 = time.monotonic()
    stamp.unlink(missing_ok=True)
    for d in (data, listdir, lists):
        if d.exists():
            shutil.rmtree(d)
    (data / "small").mkdir(parents=True)
    (data / "cold").mkdir()
    listdir.mkdir()
    lists.mkdir()

    small = [f"small/f{i:04d}.bin" for i in range(SMALL_FILES)]
    cold = [f"cold/c{i:05d}.bin" for i in range(COLD_FILES)]
    for rel in small + cold:
        (data / rel).write_bytes(os.urandom(SMALL_SIZE))
    for name, size in ((BIG, BIG_SIZE), (HUGE, HUGE_SIZE)):
        chunk = os.urandom(1 << 20)
        with open(data / name, "wb") as f:
            # Vary each MiB a little so no block is a copy of another.
            f.writelines(i.to_bytes(8, "little") + chunk[8:] for i in range(size >> 20))
    for i in range(LIST_FILES):
        with open(listdir / f"entry-{i:06d}.txt", "wb") as f:
            f.write(b"%d\n" % i)
    ds.small_list.write_text("\n".join(small) + "\n")
    ds.cold_list.write_text("\n".join(cold) + "\n")
    os.sync()
    stamp.write_text(spec)
    say(f"data set: made in {time.monotonic() - t0:.1f} s")
    return ds


# --- load generator ----------------------------------------------------------


def build_loadgen() -> None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise BenchError("no C compiler: apt-get install -y gcc")
    if LOADGEN.exists() and LOADGEN.stat().st_mtime >= LOADGEN_SRC.stat().st_mtime:
        return
    BUILD.mkdir(exist_ok=True)
    argv = [cc, "-O2", "-Wall", "-Wextra", "-pthread", "-o", str(LOADGEN), str(LOADGEN_SRC)]
    say("building: " + " ".join(argv))
    done = subprocess.run(argv, check=False, capture_output=True, text=True)
    if done.returncode != 0 or done.stderr.strip():
        sys.stderr.write(done.stderr)
    if done.returncode != 0:
        raise BenchError("the load generator did not build")


# --- servers -----------------------------------------------------------------


def wait_workers(log: Path, offset: int, workers: str, timeout: float = 30) -> None:
    """
    With --workers, the parent listens before its workers are up: wait until
    every process has logged that it listens, so a run measures them all.
    """
    count = (os.cpu_count() or 1) if workers == "auto" else int(workers)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(log, "rb") as f:
            f.seek(offset)
            if f.read().count(b"FileCacheFactory starting on") >= count:
                return
        time.sleep(0.05)
    raise BenchError(f"the filecache workers did not all start within {timeout:g} s; see {log}")


@dataclass
class Server:
    name: str
    proto: str  # "fc" or "http"
    argv: Callable[[int], list[str]]  # port -> command line
    log: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    restarts: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, procs: Processes) -> None:
        self.port = free_port()
        argv = self.argv(self.port)
        with open(self.log, "a") as f:
            f.write(f"\n# {datetime.datetime.now().isoformat()} {' '.join(argv)}\n")
            offset = f.tell()
        self.proc = procs.start(argv, self.log)
        wait_listening(self.proc, self.port, self.name, self.log)
        if "--workers" in argv:
            wait_workers(self.log, offset, argv[argv.index("--workers") + 1])

    def stop(self, procs: Processes) -> None:
        if self.proc is not None:
            procs.stop(self.proc)
            self.proc = None

    def alive(self) -> bool:
        return self.proc is not None and exit_status(self.proc) is None


def twistd() -> str:
    path = shutil.which("twistd")
    if not path:
        raise BenchError("twistd not found: pip install -e . (in the repository)")
    return path


def filecache_options() -> str:
    """The daemon's --help text, to see which options this version has."""
    done = subprocess.run(
        [twistd(), "filecache", "--help"], check=False, capture_output=True, text=True, timeout=60
    )
    return done.stdout


def filecache_argv(port: int, folder: Path, args: argparse.Namespace) -> list[str]:
    argv = [
        twistd(),
        "-n",
        "--pidfile=",
        "filecache",
        "--port",
        f"tcp:{port}:interface={LOOPBACK}",
        "--dir",
        str(folder),
        "--cache-size",
        CACHE_SIZE,
        "--no-access-log",
    ]
    if args.workers:
        argv += ["--workers", str(args.workers)]
    if "--max-per-ip" in args.filecache_help:
        # Every benchmark client comes from 127.0.0.1: a per-address limit
        # meant for the internet would refuse workload 4's 200 connections.
        argv += ["--max-per-ip", str(MAX_PER_IP)]
    return argv + list(args.daemon_arg)


def twistd_web_argv(port: int, folder: Path, access_log: Path) -> list[str]:
    """
    twistd web serving C{folder}.  Its access log (web's --logfile) rotates at
    1 MB by renaming the file and creating a new one in its place, so it must
    be a regular file of ours: given /dev/null, a run as root renamed the
    device away and left a regular file in its place (issue 8, item 23).
    """
    return [
        twistd(),
        "-n",
        "--pidfile=",
        "web",
        "--path",
        str(folder),
        "--listen",
        f"tcp:{port}:interface={LOOPBACK}:backlog=1024",
        "--logfile",
        str(access_log),
    ]


def find_nginx() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )


NGINX_CONF = """\
# Written by benchmarks/run.py for one run; not a system configuration.
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 1000000000;
    keepalive_timeout 600s;
    open_file_cache off;
    default_type application/octet-stream;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    server {{
        listen {addr}:{{port}};
        root {root};
        location /listdir/ {{
            alias {listdir}/;
            autoindex on;
        }}
    }}
}}
"""


def make_servers(
    ds: DataSet, args: argparse.Namespace, logs: Path, work: Path
) -> dict[str, Server]:
    """The servers to measure; every file they write is under C{work} or C{logs}."""
    servers: dict[str, Server] = {}
    wanted = args.servers

    if FILECACHE in wanted:
        servers[FILECACHE] = Server(
            FILECACHE,
            "fc",
            lambda port: filecache_argv(port, ds.root, args),
            logs / "filecache.log",
        )

    if NGINX in wanted:
        nginx = find_nginx()
        if nginx is None:
            say("nginx not installed: apt-get install -y nginx")
        else:
            prefix = work / "nginx"
            if prefix.exists():
                shutil.rmtree(prefix)
            prefix.mkdir(parents=True)
            conf_template = NGINX_CONF.format(
                prefix=prefix, addr=LOOPBACK, root=ds.root, listdir=ds.listdir
            )
            conf = prefix / "nginx.conf"

            def nginx_argv(port: int) -> list[str]:
                conf.write_text(conf_template.replace("{port}", str(port)))
                # -e: the error log before the configuration is read.
                return [
                    nginx,
                    "-p",
                    str(prefix),
                    "-e",
                    str(prefix / "error.log"),
                    "-c",
                    str(conf),
                    "-g",
                    "daemon off;",
                ]

            servers[NGINX] = Server(NGINX, "http", nginx_argv, logs / "nginx.log")

    if TWISTD_WEB in wanted:
        servers[TWISTD_WEB] = Server(
            TWISTD_WEB,
            "http",
            lambda port: twistd_web_argv(port, ds.root, logs / "twistd-web-access.log"),
            logs / "twistd-web.log",
        )
    return servers


# --- clients -----------------------------------------------------------------


@dataclass
class Run:
    """What one measurement gave."""

    values: dict[str, float] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)
    errors: int = 0
    error: str = ""  # first error, or why there is no figure

    def fail(self, why: str) -> Run:
        self.error = why
        self.errors = max(self.errors, 1)
        return self


TIMED = {1, 2, 3, 4, 5, 6, 7}


def median_run(runs: list[Run]) -> Run:
    """One Run from several rounds: each figure's median, every error kept."""
    if len(runs) == 1:
        return runs[0]
    merged = Run()
    for key in runs[0].values:
        merged.values[key] = statistics.median(r.values[key] for r in runs if key in r.values)
    merged.errors = sum(r.errors for r in runs)
    merged.error = next((r.error for r in runs if r.error), "")
    merged.raw = {"rounds": [{"values": r.values, **r.raw} for r in runs]}
    return merged


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


def checked(result: dict[str, Any], run: Run) -> Run:
    run.raw = result
    run.errors = int(result["errors"])
    if result["errors"] or result["timed_out"]:
        run.error = result["first_error"] or "timed out"
        if result["timed_out"]:
            run.error += " (timed out)"
    return run


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


# --- workloads ---------------------------------------------------------------


@dataclass
class Context:
    args: argparse.Namespace
    procs: Processes
    ds: DataSet
    servers: dict[str, Server]
    logs: Path

    @property
    def duration(self) -> str:
        return str(self.args.duration)

    def threads(self, default: int) -> str:
        """Load generator threads: --loadgen-threads, else the workload's default."""
        return str(self.args.loadgen_threads or default)


def w1_small(ctx: Context, s: Server) -> Run:
    lg = ("-f", str(ctx.ds.small_list))
    loadgen(ctx.procs, s, "-c", "10", "-C", *lg, label="w1-warm")
    r = loadgen(
        ctx.procs,
        s,
        "-c",
        "50",
        "-t",
        ctx.threads(1),
        "-d",
        ctx.duration,
        *lg,
        label="w1",
    )
    run = checked(r, Run())
    run.values = {"rps": r["requests_per_s"], "p99": r["latency_ms"]["p99"]}
    return run


def w7_small_two_workers(ctx: Context, s: Server) -> Run:
    """Workload 1 again, with filecache started with --workers 2 (the others as they are)."""
    if s.name != FILECACHE or ctx.args.workers:
        return w1_small(ctx, s)
    two = Server(
        FILECACHE,
        "fc",
        lambda port: filecache_argv(port, ctx.ds.root, ctx.args) + ["--workers", "2"],
        ctx.logs / "filecache-2-workers.log",
    )
    two.start(ctx.procs)
    try:
        return w1_small(ctx, two)
    finally:
        two.stop(ctx.procs)


def one_connection_mbps(ctx: Context, s: Server, path: str, warm: int, label: str) -> Run:
    """MB/s of one connection fetching C{path} over and over, after C{warm} fetches."""
    loadgen(ctx.procs, s, "-n", str(warm), "-u", path, label=f"{label}-warm")
    r = loadgen(ctx.procs, s, "-c", "1", "-d", ctx.duration, "-u", path, label=label)
    run = checked(r, Run())
    run.values = {"mbps": r["mb_per_s"]}
    return run


def w2_big_cached(ctx: Context, s: Server) -> Run:
    return one_connection_mbps(ctx, s, BIG, 2, "w2")


def w3_huge(ctx: Context, s: Server) -> Run:
    # One transfer first, as for the others: a server may learn something
    # about a file on its first full read (filecache: the SHA-256).
    return one_connection_mbps(ctx, s, HUGE, 1, "w3")


def w4_many(ctx: Context, s: Server) -> Run:
    loadgen(ctx.procs, s, "-n", "1", "-u", BIG, label="w4-warm")
    with RssSampler(s.pid) as rss:
        r = loadgen(
            ctx.procs,
            s,
            "-c",
            "200",
            "-t",
            ctx.threads(2),
            "-d",
            ctx.duration,
            "-u",
            BIG,
            label="w4",
        )
    run = checked(r, Run())
    run.values = {"mbps": r["mb_per_s"], "rss": rss.peak_mib}
    run.raw["rss_before_mib"] = round(rss.before_mib, 1)
    run.raw["rss_samples"] = rss.samples
    run.raw["vmhwm_main_mib"] = round(_status_kib(s.pid, "VmHWM") / 1024, 1)
    return run


def warm_page_cache(data: Path, list_file: Path) -> None:
    """Read every listed file once, so no server pays for the disk (only its own cache is cold)."""
    for rel in list_file.read_text().split():
        with open(data / rel, "rb") as f:
            while f.read(1 << 20):
                pass


def w5_cold(ctx: Context, s: Server) -> Run:
    if s.name == FILECACHE:
        # A fresh daemon: nothing in its cache, nothing learnt about any file.
        s.stop(ctx.procs)
        s.start(ctx.procs)
    warm_page_cache(ctx.ds.root, ctx.ds.cold_list)
    r = loadgen(
        ctx.procs,
        s,
        "-c",
        "50",
        "-t",
        ctx.threads(1),
        "-C",
        "-f",
        str(ctx.ds.cold_list),
        label="w5",
        limit=300,
    )
    run = checked(r, Run())
    if r["requests"] + r["errors"] < COLD_FILES:
        run.fail(f"only {r['requests']} of {COLD_FILES} replies; " + run.error)
    run.values = {"rps": r["requests_per_s"]}
    return run


def w6_list(ctx: Context, s: Server) -> Run:
    """filecache: a fresh daemon on the 100,000-file folder; nginx: autoindex."""
    run = Run()
    if s.name == NGINX:
        with RssSampler(s.pid) as rss:
            seconds, links, size = http_get_all(s.port, "/listdir/")
        if links < LIST_FILES:
            run.fail(f"autoindex listed {links} of {LIST_FILES} files")
        run.values = {"seconds": seconds, "rss": rss.peak_mib}
        run.raw = {"links": links, "bytes": size, "rss_before_mib": round(rss.before_mib, 1)}
        return run
    # filecache and twistd web: a separate server on the listing folder,
    # started for this workload only, so that its lifetime peak (VmHWM) is
    # the peak of the listing: a short LIST may fall between two samples.
    def argv(port: int) -> list[str]:
        if s.name == FILECACHE:
            return filecache_argv(port, ctx.ds.listdir, ctx.args)
        return twistd_web_argv(port, ctx.ds.listdir, ctx.logs / f"{s.name}-list-access.log")

    lister = Server(s.name + "-list", s.proto, argv, ctx.logs / f"{s.name}-list.log")
    lister.start(ctx.procs)
    try:
        with RssSampler(lister.pid) as rss:
            if s.name == FILECACHE:
                seconds, rows, size = fc_list(lister.port)
                again, _, _ = fc_list(lister.port)
                run.raw = {"rows": rows, "bytes": size, "second_list_s": round(again, 3)}
                if rows != LIST_FILES:
                    run.fail(f"LIST gave {rows} rows, expected {LIST_FILES}")
            else:
                seconds, links, size = http_get_all(lister.port, "/", timeout=ctx.args.list_timeout)
                run.raw = {"links": links, "bytes": size}
                if links < LIST_FILES:
                    run.fail(f"listing had {links} of {LIST_FILES} files")
        hwm = sum(_status_kib(pid, "VmHWM") for pid in process_tree(lister.pid)) / 1024
        run.raw["rss_before_mib"] = round(rss.before_mib, 1)
        run.raw["vmhwm_mib"] = round(hwm, 1)
        run.values = {"seconds": seconds, "rss": max(rss.peak_mib, hwm)}
        if not lister.alive():
            run.fail(f"{lister.name} exited:\n{tail(lister.log)}")
    finally:
        lister.stop(ctx.procs)
    return run


@dataclass(frozen=True)
class Workload:
    number: int
    title: str
    run: Callable[[Context, Server], Run]
    servers: tuple[str, ...] = SERVER_NAMES


WORKLOADS = [
    Workload(1, "4 KiB files (1,000, cached), 50 conns", w1_small),
    Workload(2, "48 MiB file, cached, 1 conn", w2_big_cached),
    Workload(3, "200 MiB file (> 64 MiB cache), 1 conn", w3_huge),
    Workload(4, "48 MiB file, 200 conns at once", w4_many),
    Workload(5, "10,000 cold 4 KiB files, 50 conns", w5_cold),
    Workload(6, "LIST of 100,000 files (nginx: autoindex)", w6_list),
    Workload(7, "as 1, filecache with --workers 2", w7_small_two_workers),
]


# A target from issue 4: (filecache, nginx, twistd web) -> (its text, met or None if unknown).
Target = Callable[[float, "float | None", "float | None"], "tuple[str, bool | None]"]


@dataclass(frozen=True)
class Row:
    workload: int
    metric: str
    key: str
    higher_is_better: bool
    fmt: str
    target: Target


def _ratio_target(nginx_min: float | None = None, twistd_min: float | None = None) -> Target:
    def check(fc: float, ng: float | None, tw: float | None) -> tuple[str, bool | None]:
        parts, ok = [], []
        if nginx_min is not None:
            parts.append(f">= {nginx_min:g} x nginx")
            if ng:
                ok.append(fc / ng >= nginx_min)
        if twistd_min is not None:
            parts.append(f">= {twistd_min:g} x twistd web")
            if tw:
                ok.append(fc / tw >= twistd_min)
        return ", ".join(parts), (all(ok) if ok else None)

    return check


def _below(limit: float, unit: str) -> Target:
    def check(fc: float, ng: float | None, tw: float | None) -> tuple[str, bool | None]:
        return f"< {limit:g} {unit}", fc < limit

    return check


W4_RSS_LIMIT = CACHE_BYTES / 2**20 + 60 + 200 * 256 / 1024

ROWS = [
    Row(1, "requests/s", "rps", True, "{:,.0f}", _ratio_target(0.6, 8)),
    Row(1, "p99 latency ms", "p99", False, "{:.2f}", _below(5, "ms")),
    Row(2, "MB/s", "mbps", True, "{:,.0f}", _ratio_target(1.0)),
    Row(3, "MB/s", "mbps", True, "{:,.0f}", _ratio_target(0.9)),
    Row(4, "aggregate MB/s", "mbps", True, "{:,.0f}", _ratio_target(0.8)),
    Row(4, "peak RSS MiB", "rss", False, "{:,.0f}", _below(W4_RSS_LIMIT, "MiB")),
    Row(5, "requests/s", "rps", True, "{:,.0f}", _ratio_target(None, 5)),
    Row(6, "seconds", "seconds", False, "{:.3f}", _below(1, "s")),
    Row(6, "peak RSS MiB", "rss", False, "{:,.0f}", _below(100, "MiB")),
    Row(7, "requests/s", "rps", True, "{:,.0f}", _ratio_target(0.6, 8)),
    Row(7, "p99 latency ms", "p99", False, "{:.2f}", _below(5, "ms")),
]


# --- report ------------------------------------------------------------------


def machine_info(args: argparse.Namespace) -> list[tuple[str, str]]:
    def first_line(argv: list[str]) -> str:
        try:
            p = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=20)
            return (p.stdout + p.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "?"

    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?"
            )
    except OSError:
        pass
    commit = first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(
        [
            "git",
            "-C",
            str(REPO),
            "--no-optional-locks",
            "status",
            "--porcelain",
            "--untracked-files=no",
        ],
        check=False,
        capture_output=True,
        text=True,
    ).stdout.strip()
    nginx = find_nginx()
    daemon_options = filecache_argv(0, Path("DIR"), args)[4:]
    for name in ("--port", "--dir"):
        i = daemon_options.index(name)
        del daemon_options[i : i + 2]
    return [
        ("date", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")),
        ("commit", commit + (" (with uncommitted changes)" if dirty else "")),
        ("cores (nproc)", str(len(os.sched_getaffinity(0)))),
        ("CPU", cpu),
        ("kernel", platform.release()),
        ("python", platform.python_version()),
        (
            "twisted",
            first_line([twistd(), "--version"]).replace("twistd (the Twisted daemon) ", ""),
        ),
        (
            "nginx",
            first_line([nginx, "-v"]).replace("nginx version: ", "") if nginx else "not installed",
        ),
        ("cc", first_line([os.environ.get("CC") or "cc", "--version"])),
        ("filecache options", " ".join(daemon_options)),
        (
            "timed runs",
            f"{args.duration:g} s each, {args.rounds} rounds (median shown); loadgen threads: "
            + (str(args.loadgen_threads) if args.loadgen_threads else "1, 2 for workload 4"),
        ),
    ]


def render(
    results: dict[int, dict[str, Run]],
    names: list[str],
    args: argparse.Namespace,
    info: list[tuple[str, str]],
) -> str:
    titles = {w.number: w.title for w in WORKLOADS}
    out = ["# filecache benchmark", ""]
    out += [f"- {k}: {v}" for k, v in info]
    out += ["", "Command: `" + " ".join(["python3", "benchmarks/run.py", *sys.argv[1:]]) + "`", ""]
    col = {FILECACHE: "filecache", NGINX: "nginx", TWISTD_WEB: "twistd web"}
    head = (
        ["workload", "metric"]
        + [col[n] for n in names]
        + ["fc/nginx", "fc/twistd-web", "target (issue 4)", "met"]
    )
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    problems = []
    for row in ROWS:
        if row.workload not in results:
            continue
        per = results[row.workload]
        cells, nums = [], {}
        for n in names:
            run = per.get(n)
            if run is None or row.key not in run.values:
                cells.append("-")
                continue
            v = run.values[row.key]
            nums[n] = v
            cells.append(row.fmt.format(v) + (" !" if run.errors else ""))
        fc = nums.get(FILECACHE)

        def ratio(other: str, fc: float | None = fc, nums: dict[str, float] = nums) -> str:
            o = nums.get(other)
            return f"{fc / o:.2f}" if fc is not None and o else "-"

        target, met = ("", None)
        if fc is not None:
            target, met = row.target(fc, nums.get(NGINX), nums.get(TWISTD_WEB))
        fc_run = per.get(FILECACHE)
        met_text = {True: "yes", False: "**no**", None: "?"}[met]
        if fc_run is not None and fc_run.errors:
            met_text = "**no** (errors)"
        better = "" if row.higher_is_better else " (lower is better)"
        out.append(
            "| "
            + " | ".join(
                [
                    f"{row.workload}. {titles[row.workload]}",
                    row.metric + better,
                    *cells,
                    ratio(NGINX),
                    ratio(TWISTD_WEB),
                    target,
                    met_text,
                ]
            )
            + " |"
        )
    for w, per in sorted(results.items()):
        for n, run in per.items():
            if run.error:
                problems.append(f"- workload {w}, {n}: {run.errors} error(s): {run.error}")
    notes = [
        "",
        "Notes:",
        "- MB/s is 10^6 bytes of body per second, as read by the client; ratios are filecache / other.",
        "- `!` marks a figure measured with errors (listed below).",
    ]
    if 5 in results:
        notes.append(
            "- Workload 5: the files were never requested before, but the OS page cache holds them "
            "for every server (they were just written); filecache is restarted first so its memory "
            "cache is empty."
        )
    if 4 in results or 6 in results:
        notes.append(
            "- Peak RSS is VmRSS of the server and its child processes, summed, sampled every 50 ms "
            "(nginx: master + worker). Workload 6 (filecache, twistd web) uses a fresh server on "
            "the 100,000-file folder, so its VmHWM is included."
        )
    for w in (1, 2, 3, 4, 5):
        cpu = []
        for n, run in results.get(w, {}).items():
            if "client_cpu_s" in run.raw and run.raw.get("seconds"):
                secs = run.raw["seconds"]
                client = 100 * run.raw["client_cpu_s"] / secs / run.raw["threads"]
                server = 100 * run.raw["server_cpu_s"] / secs
                cpu.append(f"{col[n]} {server:.0f}/{client:.0f}")
        if cpu:
            notes.append(
                f"- Workload {w}, CPU in % of one core, server (all processes) / load generator "
                "(per thread; near 100 would make it the limit): " + ", ".join(cpu) + "."
            )
    extras = []
    if 4 in results:
        for n, run in results[4].items():
            if "rss_before_mib" in run.raw:
                extras.append(f"{col[n]} {run.raw['rss_before_mib']:.0f} MiB")
        if extras:
            notes.append("- Workload 4, RSS before the 200 connections: " + ", ".join(extras) + ".")
    if 6 in results and FILECACHE in results[6] and "second_list_s" in results[6][FILECACHE].raw:
        notes.append(
            f"- Workload 6: a second LIST on the same daemon took "
            f"{results[6][FILECACHE].raw['second_list_s']:.3f} s."
        )
    if problems:
        notes += ["", "Errors:"] + problems
    return "\n".join(out + notes) + "\n"


# --- main --------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="2 s per timed run instead of 8")
    p.add_argument("--duration", type=float, help="seconds per timed run (overrides --quick)")
    p.add_argument(
        "--workers",
        type=str,
        default=None,
        help="passed to the filecache daemon as --workers N (N or auto)",
    )
    p.add_argument(
        "--only", type=str, default="", help="comma-separated workload numbers to run, e.g. 1,4"
    )
    p.add_argument(
        "--servers",
        type=str,
        default=",".join(SERVER_NAMES),
        help=f"comma-separated subset of {','.join(SERVER_NAMES)}",
    )
    p.add_argument(
        "--loadgen-threads",
        type=int,
        default=None,
        help="threads of the load generator for workloads 1, 4 and 5 "
        "(default: 1, and 2 for workload 4, whose 200 transfers make it copy-bound)",
    )
    p.add_argument(
        "--list-timeout",
        type=float,
        default=120,
        help="seconds to wait for twistd web's listing of 100,000 files",
    )
    p.add_argument(
        "--daemon-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="one more argument for the filecache daemon (repeat for several)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="every workload runs this many times, servers alternating; "
        "the table shows each figure's median (default 3)",
    )
    p.add_argument("--fresh-data", action="store_true", help="rebuild the data set")
    p.add_argument("--write", action="store_true", help="also write benchmarks/results.md")
    args = p.parse_args(argv)
    if args.duration is None:
        args.duration = 2.0 if args.quick else 8.0
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = set(args.servers) - set(SERVER_NAMES)
    if unknown:
        p.error(f"unknown server(s): {', '.join(sorted(unknown))}")
    try:
        args.only = {int(x) for x in args.only.split(",") if x.strip()} or {
            w.number for w in WORKLOADS
        }
    except ValueError:
        p.error("--only takes workload numbers, e.g. 1,4")
    return args


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    # Ctrl-C even when started with SIGINT ignored (e.g. "&" in a script).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)
    procs = Processes()
    results: dict[int, dict[str, Run]] = {}
    started = time.monotonic()
    try:
        build_loadgen()
        ds = make_dataset(args.fresh_data)
        args.filecache_help = filecache_options() if FILECACHE in args.servers else ""
        if args.workers and FILECACHE in args.servers and "--workers" not in args.filecache_help:
            raise BenchError("--workers: this filecache daemon has no --workers option (yet)")
        logs = WORK / "logs"
        if logs.exists():
            shutil.rmtree(logs)  # this run's logs only
        logs.mkdir(parents=True)
        servers = make_servers(ds, args, logs, WORK)
        if not servers:
            raise BenchError("no server to measure")
        for s in servers.values():
            say(f"starting {s.name}...")
            s.start(procs)
            say(f"  {s.name}: pid {s.pid}, {LOOPBACK}:{s.port}, log {s.log}")
        ctx = Context(args, procs, ds, servers, logs)
        for w in WORKLOADS:
            if w.number not in args.only:
                continue
            results[w.number] = {}
            rounds: dict[str, list[Run]] = {}
            # Workloads alternate the servers for several rounds and keep each
            # figure's median: a noisy moment then hits no server alone.
            for s in [
                s
                for _ in range(args.rounds if w.number in TIMED else 1)
                for s in servers.values()
            ]:
                if s.name not in w.servers:
                    continue
                if not s.alive():
                    code = exit_status(s.proc) if s.proc else None
                    note = (
                        f"{s.name} had exited (status {code}) before workload {w.number}; restarted"
                    )
                    say("  " + note + ":\n" + tail(s.log))
                    s.restarts.append(note)
                    s.stop(procs)
                    s.start(procs)
                say(f"[{w.number}] {w.title}: {s.name}...")
                try:
                    run = w.run(ctx, s)
                except (BenchError, OSError, ValueError) as e:
                    run = Run().fail(f"{type(e).__name__}: {e}")
                if not s.alive():
                    run.fail(
                        (run.error + "; " if run.error else "")
                        + f"{s.name} exited during the workload:\n{tail(s.log)}"
                    )
                rounds.setdefault(s.name, []).append(run)
                results[w.number][s.name] = median_run(rounds[s.name])
                shown = ", ".join(f"{k} {v:,.2f}" for k, v in run.values.items())
                say(
                    f"    {shown or 'no figure'}"
                    + (f"  [errors {run.errors}: {run.error}]" if run.error else "")
                )
        info = machine_info(args)
        report = render(results, list(servers), args, info)
        for s in servers.values():
            for note in s.restarts:
                report += f"- {note}\n"
        raw = {
            "info": dict(info),
            "results": {
                w: {
                    n: {"values": r.values, "errors": r.errors, "error": r.error, "raw": r.raw}
                    for n, r in per.items()
                }
                for w, per in results.items()
            },
        }
        (WORK / "results.json").write_text(json.dumps(raw, indent=1) + "\n")
        sys.stdout.write(report)
        if args.write:
            (HERE / "results.md").write_text(report)
            say(f"wrote {HERE / 'results.md'}")
        say(f"done in {time.monotonic() - started:.0f} s; raw figures in {WORK / 'results.json'}")
        return 0
    except BenchError as e:
        say(f"error: {e}")
        return 1
    except KeyboardInterrupt:
        say("interrupted: stopping the servers")
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        procs.stop_all()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
