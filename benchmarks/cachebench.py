#!/usr/bin/env python3
"""
The cache policy benchmark (issue 12): how much of a hot set's hit ratio
each --cache-policy keeps while one client scans a folder much larger than
the cache.  (a) A trace replayed straight against FifoCache, S3FifoCache and
SieveCache in this process; (b) the issue's workload against a real
`twistd -n filecache` per policy: 50 clients on a Zipf(0.9) hot set while
`filecache-client get` mirrors a 500 MiB folder once.  See benchmarks/README.md.

    python3 benchmarks/cachebench.py [--trace-only] [--write]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

# Run as a script, Python puts benchmarks/ on the path, not the checkout.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.clients import LOADGEN, build_loadgen
from benchmarks.console import BenchError, say
from benchmarks.dataset import WORK
from benchmarks.processes import LOOPBACK, Processes, run_with_servers
from benchmarks.report import publish, run_info
from benchmarks.servers import MAX_PER_IP, Server, twistd
from filecache.daemon.cache import POLICIES, CacheEntry, ICache, make_cache

BEGIN = "<!-- cache policies section: written by benchmarks/cachebench.py --write; the rest is kept -->"
END = "<!-- end of the cache policies section -->"

ZIPF_S = 0.9
HOT_SIZE = 64 << 10
SCAN_FILES = 2_000
SCAN_SIZE = 256 << 10  # 2,000 of them: 500 MiB
CACHE_SIZE = "16M"
CACHE_BYTES = 16 << 20
INLINE_LIMIT = 64 << 10  # the daemon reads files up to this whole; larger ones reserve first

# (a) the trace
TRACE_FILES = 2_000
TRACE_REQUESTS = 100_000
TRACE_WARMUP = 20_000  # hot requests not counted: the cache fills
SCAN_START = 40_000  # the scan begins before this hot request...
SCAN_EVERY = 2  # ...and reads one of its files after every 2 hot requests

# (b) the daemons
HOT_FILES = 500
CLIENTS = 50
WARMUP_S = 4.0
PLAIN_S = 5.0
AFTER_S = 3.0
DATA_VERSION = f"filecache-cachebench v1 {HOT_FILES} {HOT_SIZE} {SCAN_FILES} {SCAN_SIZE}"


def zipf_ranks(files: int, count: int, rng: random.Random) -> list[int]:
    """C{count} file numbers drawn from Zipf(L{ZIPF_S}) over C{files} files (0 the most popular)."""
    weights = [1 / (rank + 1) ** ZIPF_S for rank in range(files)]
    return rng.choices(range(files), weights=weights, k=count)


# (a) A trace replayed in this process.


@dataclass
class TraceResult:
    policy: str
    scan: bool
    hot_hits: int = 0
    hot_requests: int = 0
    window_hits: int = 0  # hot requests while the scan runs (or would run)
    window_requests: int = 0

    def ratio(self) -> float:
        return self.hot_hits / self.hot_requests

    def window_ratio(self) -> float:
        return self.window_hits / self.window_requests


def trace(scan: bool, rng: random.Random) -> Iterator[tuple[str, int, int]]:
    """(path, size, hot request number or -1) in order: the hot trace, with the scan mixed in."""
    hot = zipf_ranks(TRACE_FILES, TRACE_REQUESTS, rng)
    scanned = 0
    for n, rank in enumerate(hot):
        if scan and n >= SCAN_START and n % SCAN_EVERY == 0 and scanned < SCAN_FILES:
            yield f"scan/s{scanned:04d}", SCAN_SIZE, -1
            scanned += 1
        yield f"hot/h{rank:04d}", HOT_SIZE, n


def replay(policy: str, scan: bool, seed: int) -> TraceResult:
    """
    The trace against a fresh cache as the daemon drives it: a lookup, and
    on a miss a file up to INLINE_LIMIT read whole and inserted, a larger
    one given a reservation first, released when it was sent, then inserted.
    """
    cache: ICache = make_cache(policy, CACHE_BYTES)
    contents = {HOT_SIZE: bytes(HOT_SIZE), SCAN_SIZE: bytes(SCAN_SIZE)}
    result = TraceResult(policy, scan)
    window = range(SCAN_START, SCAN_START + SCAN_FILES * SCAN_EVERY)
    for path, size, n in trace(scan, random.Random(seed)):
        hit = cache.lookup(path, "v1") is not None
        if not hit:
            reserved = size > INLINE_LIMIT and cache.reserve(size)
            if reserved:
                cache.release(size)
            if size <= INLINE_LIMIT or reserved:
                cache.insert(path, CacheEntry(contents[size], "v1", "", 0))
        if n >= TRACE_WARMUP:
            result.hot_requests += 1
            result.hot_hits += hit
            if n in window:
                result.window_requests += 1
                result.window_hits += hit
    return result


def hit_cost(policy: str, rounds: int = 200_000) -> float:
    """Nanoseconds per lookup that hits, in a cache of 200 entries."""
    cache = make_cache(policy, CACHE_BYTES)
    data = bytes(HOT_SIZE)
    names = [f"hot/h{i:04d}" for i in range(200)]
    for name in names:
        cache.insert(name, CacheEntry(data, "v1", "", 0))
    lookup = cache.lookup
    order = [names[i % 200] for i in range(rounds)]
    t0 = time.perf_counter()
    for name in order:
        lookup(name, "v1")
    return (time.perf_counter() - t0) / rounds * 1e9


def run_trace(seed: int) -> tuple[list[TraceResult], dict[str, float]]:
    results = []
    for policy in POLICIES:
        for scan in (False, True):
            r = replay(policy, scan, seed)
            say(f"[trace] {policy:7s} scan={scan!s:5s} hot hit ratio {r.ratio():.3f}, during the scan {r.window_ratio():.3f}")
            results.append(r)
    costs = {policy: min(hit_cost(policy) for _ in range(3)) for policy in POLICIES}
    say("[trace] ns per hit: " + ", ".join(f"{p} {c:.0f}" for p, c in costs.items()))
    return results, costs


# (b) Real daemons.


@dataclass
class DaemonResult:
    policy: str
    plain: tuple[int, int] = (0, 0)  # hot (hits, requests) with no scan
    scan: tuple[int, int] = (0, 0)  # while the mirror runs
    after: tuple[int, int] = (0, 0)  # the seconds after it
    mirror_s: float = 0.0
    mirror_files: int = 0
    hot_requests: int = 0  # as loadgen counted them, for the whole run
    hot_errors: int = 0
    notes: list[str] = field(default_factory=list)


def make_data(root: Path) -> None:
    stamp = root / "stamp"
    if stamp.exists() and stamp.read_text() == DATA_VERSION:
        say(f"data: reusing {root}")
        return
    say(f"data: making {HOT_FILES} hot files and {SCAN_FILES} x {SCAN_SIZE >> 10} KiB in {root}...")
    shutil.rmtree(root, ignore_errors=True)
    for folder, count, size, prefix in (("hot", HOT_FILES, HOT_SIZE, "h"), ("scan", SCAN_FILES, SCAN_SIZE, "s")):
        (root / folder).mkdir(parents=True)
        chunk = os.urandom(size)
        for i in range(count):
            # Each file its own bytes, cheaply: its number up front.
            (root / folder / f"{prefix}{i:04d}.bin").write_bytes(i.to_bytes(8, "little") + chunk[8:])
    stamp.write_text(DATA_VERSION)


def stats(port: int) -> dict[str, str]:
    """The daemon's STATS, as text values."""
    with socket.create_connection((LOOPBACK, port), timeout=10) as s:
        s.sendall(b"STATS\r\n")
        buf = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                raise BenchError("STATS: connection closed early")
            buf += chunk
            lines = buf.split(b"\r\n")
            head = lines[0].split()
            if len(head) == 2 and head[0] == b"OK" and len(lines) > int(head[1]) + 1:
                rows = [line.decode().split(" ", 1) for line in lines[1 : int(head[1]) + 1]]
                return {k: v for k, v in rows}


def counts(port: int) -> tuple[int, int]:
    """(hits, misses) from STATS."""
    s = stats(port)
    return int(s["hits"]), int(s["misses"])


class HotLoad:
    """
    The 50 hot clients: loadgen runs of one second each, one after the
    other on a thread, until stopped, picking paths at random from a
    Zipf-drawn list (so every run draws from the same distribution).
    """

    def __init__(self, procs: Processes, port: int, paths: Path) -> None:
        self._procs = procs
        self._argv = [str(LOADGEN), "-a", LOOPBACK, "-p", str(port), "-P", "fc", "-c", str(CLIENTS), "-f", str(paths), "-r", "-d", "1", "-T", "30"]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.requests = self.errors = 0
        self.failure: str | None = None

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        import json

        while not self._stop.is_set():
            proc = self._procs.start(self._argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            try:
                out, err = proc.communicate(timeout=60)
            finally:
                self._procs.stop(proc)
            if proc.returncode != 0:
                self.failure = err.decode(errors="replace").strip()
                return
            result = json.loads(out)
            self.requests += int(result["requests"])
            self.errors += int(result["errors"])

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(90)
        if self.failure:
            raise BenchError(f"loadgen failed: {self.failure}")


def window(port: int, seconds: float) -> tuple[int, int]:
    """Hot (hits, lookups) over C{seconds} of the hot load alone."""
    h0, m0 = counts(port)
    time.sleep(seconds)
    h1, m1 = counts(port)
    return h1 - h0, (h1 - h0) + (m1 - m0)


def run_daemon(procs: Processes, policy: str, data: Path, paths: Path, logs: Path, client: str) -> DaemonResult:
    result = DaemonResult(policy)
    server = Server(
        f"filecache-{policy}",
        "fc",
        lambda port: [
            twistd(), "-n", "--pidfile=", "filecache", "--port", f"tcp:{port}:interface={LOOPBACK}",
            "--dir", str(data), "--cache-size", CACHE_SIZE, "--cache-policy", policy,
            "--no-access-log", "--max-per-ip", str(MAX_PER_IP),
        ],
        logs / f"filecache-{policy}.log",
    )
    server.start(procs)
    mirror = WORK / "cachebench" / "mirror"
    shutil.rmtree(mirror, ignore_errors=True)
    try:
        load = HotLoad(procs, server.port, paths)
        load.start()
        time.sleep(WARMUP_S)
        result.plain = window(server.port, PLAIN_S)
        # The scan: one filecache-client mirrors scan/ (its default -j 4
        # connections) into an empty folder, so it GETs each file once.
        # Every one of those GETs is a miss (this daemon has never read the
        # file) and none a hit, so the hot set's lookups over the mirror's
        # time are the STATS delta less one miss per file mirrored.
        h0, m0 = counts(server.port)
        t0 = time.monotonic()
        done = subprocess.run(
            [client, LOOPBACK, str(server.port), "get", "scan/", "-o", str(mirror), "-q", "--retries", "0"],
            check=False, capture_output=True, text=True, timeout=600,
        )
        result.mirror_s = time.monotonic() - t0
        h1, m1 = counts(server.port)
        if done.returncode != 0:
            raise BenchError(f"the mirror failed ({done.returncode}): {done.stderr.strip()[-500:]}")
        result.mirror_files = sum(1 for p in (mirror / "scan").iterdir() if not p.name.startswith("."))
        if result.mirror_files != SCAN_FILES:
            raise BenchError(f"the mirror made {result.mirror_files} files, not {SCAN_FILES}")
        lookups = (h1 - h0) + (m1 - m0) - result.mirror_files
        result.scan = (h1 - h0, lookups)
        result.after = window(server.port, AFTER_S)
        load.stop()
        result.hot_requests, result.hot_errors = load.requests, load.errors
    finally:
        server.stop(procs)
        shutil.rmtree(mirror, ignore_errors=True)
    say(
        f"[daemon] {policy:7s} hot hit ratio: no scan {pct(*result.plain)}, during the mirror "
        f"{pct(*result.scan)} ({result.mirror_s:.1f} s), after it {pct(*result.after)}; "
        f"{result.hot_requests} hot requests, {result.hot_errors} errors"
    )
    return result


def pct(hits: int, total: int) -> str:
    return f"{100 * hits / total:.1f}%" if total else "-"


# The report.


def render(args: argparse.Namespace, info: list[tuple[str, str]], trace_results: list[TraceResult], costs: dict[str, float], daemons: list[DaemonResult]) -> str:
    out = [BEGIN, "## Cache policies (issue 12)", ""]
    out += [f"- {k}: {v}" for k, v in info]
    out += ["", "Command: `python3 benchmarks/cachebench.py " + " ".join(sys.argv[1:]) + "`", ""]
    out += [
        (
            f"### (a) Trace replay, in-process (no daemon): cache {CACHE_BYTES >> 20} MiB, Zipf({ZIPF_S}) over "
            f"{TRACE_FILES:,} files of {HOT_SIZE >> 10} KiB"
        ),
        "",
        (
            f"{TRACE_REQUESTS:,} hot requests, the first {TRACE_WARMUP:,} not counted. With the scan, "
            f"{SCAN_FILES:,} files of {SCAN_SIZE >> 10} KiB (500 MiB) are read once each, one after every "
            f"{SCAN_EVERY} hot requests from hot request {SCAN_START:,} on; \"during the scan\" counts the "
            "hot requests of that stretch. Hit ratios of the hot requests:"
        ),
        "",
        "| policy | plain Zipf | with the scan | during the scan (plain / with scan) | ns per hit |",
        "|---|---|---|---|---|",
    ]
    by = {(r.policy, r.scan): r for r in trace_results}
    for policy in POLICIES:
        plain, scan = by[(policy, False)], by[(policy, True)]
        out.append(
            f"| {policy} | {plain.ratio():.1%} | {scan.ratio():.1%} | "
            f"{plain.window_ratio():.1%} / {scan.window_ratio():.1%} | {costs[policy]:.0f} |"
        )
    if daemons:
        out += [
            "",
            f"### (b) Real daemons: `twistd -n filecache --cache-size {CACHE_SIZE} --cache-policy P`",
            "",
            (
                f"{CLIENTS} loadgen connections fetch {HOT_FILES} files of {HOT_SIZE >> 10} KiB (`hot/`, 31 MiB) "
                f"drawn from Zipf({ZIPF_S}), while one `filecache-client get scan/` (4 connections) mirrors "
                f"`scan/`, {SCAN_FILES:,} files of {SCAN_SIZE >> 10} KiB (500 MiB), into an empty folder, once. "
                f"A fresh daemon per policy; {WARMUP_S:g} s of hot load to warm it, then {PLAIN_S:g} s with no "
                f"scan, then the mirror, then {AFTER_S:g} s more. Hit ratios from the daemon's STATS `hits` and "
                "`misses` read by the harness at the edges of each stretch; during the mirror, one miss per "
                "file mirrored is taken off (each scan file is read once by a daemon that never had it, so its "
                "GET is a miss, never a hit)."
            ),
            "",
            "| policy | hot hit ratio, no scan | during the mirror | points lost | the 3 s after | mirror s | hot requests (errors) |",
            "|---|---|---|---|---|---|---|",
        ]
        for d in daemons:
            lost = 100 * (d.plain[0] / d.plain[1] - d.scan[0] / d.scan[1])
            out.append(
                f"| {d.policy} | {pct(*d.plain)} | {pct(*d.scan)} | {lost:.1f} | {pct(*d.after)} | "
                f"{d.mirror_s:.1f} | {d.hot_requests:,} ({d.hot_errors}) |"
            )
        s3 = next(d for d in daemons if d.policy == "s3fifo")
        lost = 100 * (s3.plain[0] / s3.plain[1] - s3.scan[0] / s3.scan[1])
        out += ["", f"Target (issue 12): s3fifo within 10 points of its no-scan hit ratio: {lost:.1f} points, **{'met' if lost <= 10 else 'not met'}**."]
    out.append(END)
    return "\n".join(out) + "\n"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace-only", action="store_true", help="only (a), the in-process trace replay")
    p.add_argument("--seed", type=int, default=12, help="the traces' random seed")
    p.add_argument("--write", action="store_true", help="write the cache policies section of benchmarks/results.md")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    work = WORK / "cachebench"
    logs = work / "logs"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)

    def body(procs: Processes) -> int:
        info = run_info()
        trace_results, costs = run_trace(args.seed)
        daemons = []
        if not args.trace_only:
            client = shutil.which("filecache-client")
            if not client:
                raise BenchError("filecache-client not found: pip install -e . (in the repository)")
            build_loadgen()
            data = work / "data"
            make_data(data)
            paths = work / "hot-paths.txt"
            ranks = zipf_ranks(HOT_FILES, 100_000, random.Random(args.seed))
            paths.write_text("".join(f"hot/h{r:04d}.bin\n" for r in ranks))
            daemons = [run_daemon(procs, policy, data, paths, logs, client) for policy in POLICIES]
        publish(render(args, info, trace_results, costs, daemons), args.write, BEGIN, END)
        return 0

    return run_with_servers(body)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
