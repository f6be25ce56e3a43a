"""
The nine workloads, each a function that measures one server and gives a Run
(one measurement's figures), and WORKLOADS, their numbers and titles in order.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.clients import fc_list, http_get_all, loadgen
from benchmarks.dataset import BIG, COLD_FILES, HUGE, LIST_FILES, DataSet, fresh_files
from benchmarks.processes import Processes, tail
from benchmarks.resources import RssSampler, process_tree, status_kib
from benchmarks.servers import (
    FILECACHE,
    NGINX_OPEN_FILE_CACHE,
    SERVER_NAMES,
    Server,
    filecache_argv,
    twistd_web_argv,
)


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


TIMED = {1, 2, 3, 4, 5, 6, 7, 8, 9}


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


def checked(result: dict[str, Any], run: Run) -> Run:
    run.raw = result
    run.errors = int(result["errors"])
    if result["errors"] or result["timed_out"]:
        run.error = result["first_error"] or "timed out"
        if result["timed_out"]:
            run.error += " (timed out)"
    return run


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


def with_two_workers(ctx: Context, s: Server, measure: Callable[[Context, Server], Run]) -> Run:
    """
    C{measure} of filecache started with --workers 2, for this measurement
    only (the other servers as they are), unless --workers chose for the
    whole run.
    """
    if s.name != FILECACHE or ctx.args.workers:
        return measure(ctx, s)
    two = Server(
        FILECACHE,
        "fc",
        lambda port: filecache_argv(port, ctx.ds.root, ctx.args) + ["--workers", "2"],
        ctx.logs / "filecache-2-workers.log",
    )
    two.start(ctx.procs)
    try:
        return measure(ctx, two)
    finally:
        two.stop(ctx.procs)


def w7_small_two_workers(ctx: Context, s: Server) -> Run:
    """Workload 1 again, with filecache started with --workers 2 (the others as they are)."""
    return with_two_workers(ctx, s, w1_small)


def _on_a_proxy_port(ctx: Context, s: Server, measure: Callable[[Context, Server], Run]) -> Run:
    """C{measure} of filecache on a PROXY protocol port (haproxy:), every connection opening with a header."""
    if s.name != FILECACHE:
        return measure(ctx, s)

    def argv(port: int) -> list[str]:
        plain = filecache_argv(port, ctx.ds.root, ctx.args)
        at = plain.index("--port") + 1
        plain[at] = "haproxy:" + plain[at]
        return plain

    proxied = Server(FILECACHE, "fc", argv, ctx.logs / "filecache-proxy.log", proxy_header=True)
    proxied.start(ctx.procs)
    try:
        return measure(ctx, proxied)
    finally:
        proxied.stop(ctx.procs)


def w8_small_proxied(ctx: Context, s: Server) -> Run:
    """Workload 1 with filecache on a PROXY port: the direct write path beneath Twisted's wrapper."""
    return _on_a_proxy_port(ctx, s, w1_small)


def w9_huge_proxied(ctx: Context, s: Server) -> Run:
    """Workload 3 with filecache on a PROXY port: sendfile beneath Twisted's wrapper."""
    return _on_a_proxy_port(ctx, s, w3_huge)


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
    run.raw["vmhwm_main_mib"] = round(status_kib(s.pid, "VmHWM") / 1024, 1)
    return run


def warm_page_cache(data: Path, list_file: Path) -> None:
    """Read every listed file once, so no server pays for the disk (only its own cache is cold)."""
    for rel in list_file.read_text().split():
        with open(data / rel, "rb") as f:
            while f.read(1 << 20):
                pass


def restart_filecache(ctx: Context, s: Server) -> None:
    """A fresh filecache daemon: nothing in its cache, nothing learnt about any file."""
    if s.name == FILECACHE:
        s.stop(ctx.procs)
        s.start(ctx.procs)


def w5_cold(ctx: Context, s: Server) -> Run:
    with fresh_files(ctx.ds, f"w5-{s.name}") as cold:
        restart_filecache(ctx, s)
        # Last, right before the run: this machine evicts the page cache as it goes.
        warm_page_cache(ctx.ds.root, cold.list_file)
        r = loadgen(
            ctx.procs,
            s,
            "-c",
            "50",
            "-t",
            ctx.threads(1),
            "-C",
            "-f",
            str(cold.list_file),
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
    if s.name in NGINX_OPEN_FILE_CACHE:
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
        hwm = sum(status_kib(pid, "VmHWM") for pid in process_tree(lister.pid)) / 1024
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
    Workload(5, "10,000 cold 4 KiB files, each once, 50 conns", w5_cold),
    Workload(6, "LIST of 100,000 files (nginx: autoindex)", w6_list),
    Workload(7, "as 1, filecache with --workers 2", w7_small_two_workers),
    Workload(8, "as 1, filecache on a PROXY port (haproxy:)", w8_small_proxied),
    Workload(9, "as 3, filecache on a PROXY port (haproxy:)", w9_huge_proxied),
]
