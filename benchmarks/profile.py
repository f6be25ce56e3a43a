"""
Where the daemon's time goes (issue 13): one filecache daemon on the
benchmark's data set, one load on it, and three views of the same requests:
the CPU per request (user and system, from /proc), py-spy's samples of the
Python frames (their share, turned into microseconds per request), and the
system calls per request (strace -c, in a second, shorter pass: strace slows
every call, so only its counts are kept).

    python3 benchmarks/profile.py cold          # 10,000 cold 4 KiB files (workload 5)
    python3 benchmarks/profile.py small         # 4 KiB cached files, 50 conns (workload 1)
    python3 benchmarks/profile.py cold --write  # also into benchmarks/results.md

Needs py-spy (pip install py-spy) and strace (apt-get install -y strace).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.clients import LOADGEN, build_loadgen
from benchmarks.console import BenchError, say
from benchmarks.dataset import DataSet, fresh_files, make_dataset
from benchmarks.processes import LOOPBACK, Processes, free_port, run_with_servers, wait_listening
from benchmarks.report import publish, run_info
from benchmarks.resources import proc_stat_fields
from benchmarks.servers import CACHE_SIZE, twistd
from benchmarks.workloads import warm_page_cache

TOP = 14


@dataclass
class Load:
    """One load: what it is, and whether each file is asked once (cold) or for a timed run."""

    name: str
    what: str
    cold: bool


LOADS = {
    "cold": Load("cold", "10,000 cold 4 KiB files, each asked once, 50 conns (workload 5)", True),
    "small": Load("small", "4 KiB cached files, 50 keep-alive conns (workload 1)", False),
}


def cpu_seconds_split(pid: int) -> tuple[float, float]:
    """The user and system CPU seconds C{pid} has used so far."""
    fields = proc_stat_fields(pid)  # after "pid (comm)": utime and stime are the 12th and 13th
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / ticks, int(fields[12]) / ticks


def run_load(procs: Processes, port: int, paths: Path, seconds: float | None) -> dict[str, object]:
    """The load generator on C{port}, 50 connections: each path once, or for C{seconds}."""
    timing = ["-C"] if seconds is None else ["-d", str(seconds)]
    argv = [str(LOADGEN), "-a", LOOPBACK, "-p", str(port), "-P", "fc", "-T", "300", "-c", "50", *timing, "-f", str(paths)]
    proc = procs.start(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=400)
    procs.stop(proc)
    if proc.returncode != 0:
        raise BenchError(f"loadgen failed: {err.decode(errors='replace').strip()}")
    result: dict[str, object] = json.loads(out)
    return result


def start_daemon(procs: Processes, ds: DataSet, log: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    argv = [
        twistd(), "-n", "--pidfile=", "filecache", "--port", f"tcp:{port}:interface={LOOPBACK}",
        "--dir", str(ds.root), "--cache-size", CACHE_SIZE, "--no-access-log", "--max-per-ip", "1024",
    ]
    proc = procs.start(argv, log=log)
    wait_listening(proc, port, "filecache", log)
    return proc, port


def frame_shares(raw: Path) -> tuple[int, collections.Counter[str], collections.Counter[str]]:
    """py-spy's raw samples: their number, and the samples per leaf frame and per frame anywhere on the stack."""
    leaf: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = [short(f) for f in stack.split(";")]
        leaf[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    return total, leaf, inclusive


def short(frame: str) -> str:
    """C{func (path/to/file.py:12)} as C{func (file.py)}: one row per function, whatever the line."""
    name, _, where = frame.partition(" (")
    file = where.split(":")[0].rsplit("/", 1)[-1]
    return f"{name} ({file})"


@contextmanager
def ready(procs: Processes, ds: DataSet, load: Load, log: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, Path]]:
    """
    A new daemon, and the list of paths to load it with: fresh cold files
    read once (the page cache warm, filecache's cache cold), or the small
    files read into the cache and hit once (a first hit sets the file's
    inotify watch with one stat, which steady hits no longer pay).
    """
    daemon, port = start_daemon(procs, ds, log)
    if not load.cold:
        for _ in range(2):
            run_load(procs, port, ds.small_list, None)
        yield daemon, port, ds.small_list
        return
    with fresh_files(ds, f"profile-{log.stem}") as cold:
        warm_page_cache(ds.root, cold.list_file)  # last: this machine evicts the page cache as it goes
        yield daemon, port, cold.list_file


def measure(load: Load, seconds: float) -> str:
    for tool in ("py-spy", "strace"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} not found (pip install py-spy; apt-get install -y strace)")
    build_loadgen()
    ds = make_dataset(False)
    work = Path(tempfile.mkdtemp(prefix="filecache-profile-"))
    timed = None if load.cold else seconds

    def sampled(procs: Processes) -> tuple[dict[str, object], float, float, Path]:
        """Pass 1: the CPU per request, and py-spy's samples of the same requests."""
        raw = work / "spy.txt"
        with ready(procs, ds, load, work / "daemon.log") as (daemon, port, paths):
            spy = procs.start(
                ["py-spy", "record", "-p", str(daemon.pid), "-r", "997", "-f", "raw", "-o", str(raw), "--nonblocking"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(1.0)  # py-spy attaches
            user0, sys0 = cpu_seconds_split(daemon.pid)
            result = run_load(procs, port, paths, timed)
            user1, sys1 = cpu_seconds_split(daemon.pid)
            spy.send_signal(2)  # py-spy writes its samples on SIGINT
            spy.wait(timeout=60)
            procs.stop(daemon)
        requests = int(str(result["requests"]))
        return result, (user1 - user0) / requests * 1e6, (sys1 - sys0) / requests * 1e6, raw

    def traced(procs: Processes) -> tuple[dict[str, int], int]:
        """Pass 2: the system calls per request, counted by strace (which slows every call)."""
        counts = work / "strace.txt"
        with ready(procs, ds, load, work / "daemon2.log") as (daemon, port, paths):
            tracer = procs.start(
                ["strace", "-c", "-f", "-o", str(counts), "-p", str(daemon.pid)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(1.0)
            result = run_load(procs, port, paths, None if timed is None else min(timed, 3))
            tracer.send_signal(2)
            tracer.wait(timeout=60)
            procs.stop(daemon)
        return syscall_counts(counts), int(str(result["requests"]))

    out: list[str] = []

    def run(procs: Processes) -> int:
        result, user_us, sys_us, raw = sampled(procs)
        calls, traced_requests = traced(procs)
        out.append(report(load, result, int(str(result["requests"])), user_us, sys_us, raw, calls, traced_requests))
        return 0

    status = run_with_servers(run)
    if status != 0 or not out:
        raise BenchError("the profile run failed")
    return out[0]


def syscall_counts(path: Path) -> dict[str, int]:
    """The calls per system call in strace -c's table."""
    counts: dict[str, int] = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
            counts[parts[-1]] = int(parts[3])
    return counts


def report(
    load: Load,
    result: dict[str, object],
    requests: int,
    user_us: float,
    sys_us: float,
    raw: Path,
    calls: dict[str, int],
    traced_requests: int,
) -> str:
    total, leaf, inclusive = frame_shares(raw)
    cpu_us = user_us + sys_us
    rps = float(str(result["requests_per_s"]))
    lines = [
        f"### Where the time goes: {load.what}",
        "",
        (
            f"{requests:,} requests at {rps:,.0f} requests/s; the daemon's CPU per request "
            f"{cpu_us:.1f} us ({user_us:.1f} us user, {sys_us:.1f} us system), from /proc. "
            f"py-spy took {total:,} samples of the same requests (997 Hz); "
            "a frame's share of them, times the CPU per request, is its cost per request."
        ),
        "",
        "| function (self time: the frame that was running) | share | us per request |",
        "|---|---|---|",
    ]
    for frame, n in leaf.most_common(TOP):
        lines.append(f"| `{frame}` | {n / total:.1%} | {n / total * cpu_us:.1f} |")
    lines += [
        "",
        "| our function (with what it calls) | share | us per request |",
        "|---|---|---|",
    ]
    ours = [(f, n) for f, n in inclusive.most_common() if _ours(f)]
    for frame, n in ours[:TOP]:
        lines.append(f"| `{frame}` | {n / total:.1%} | {n / total * cpu_us:.1f} |")
    lines += [
        "",
        f"System calls per request (strace -c over {traced_requests:,} requests of a second run):",
        "",
        "| system call | per request |",
        "|---|---|",
    ]
    for name, count in sorted(calls.items(), key=lambda kv: -kv[1]):
        per = count / max(traced_requests, 1)
        if per >= 0.05:
            lines.append(f"| `{name}` | {per:.2f} |")
    lines.append("")
    return "\n".join(lines)


_OUR_FILES = {
    p.name for p in (Path(__file__).resolve().parent.parent / "filecache").rglob("*.py")
}


def _ours(frame: str) -> bool:
    file = frame.rsplit("(", 1)[-1].rstrip(")")
    return file in _OUR_FILES and file != "__init__.py"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("load", choices=sorted(LOADS), help="the load to profile")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds of the timed run (small)")
    parser.add_argument("--write", action="store_true", help="also write the section into benchmarks/results.md")
    args = parser.parse_args(argv)
    load = LOADS[args.load]
    try:
        text = measure(load, args.duration)
    except BenchError as e:
        say(f"error: {e}")
        return 1
    info = dict(run_info())
    begin, end = f"<!-- profile {load.name} -->", f"<!-- end of profile {load.name} -->"
    section = f"{begin}\n_{info['date']}, {info['commit']}, {info['CPU']}, {info['cores (nproc)']} cores_\n\n{text}\n{end}\n"
    publish(section, args.write, begin, end)
    return 0


if __name__ == "__main__":
    sys.exit(main())
