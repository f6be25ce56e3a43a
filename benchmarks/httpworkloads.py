"""
The HTTP workloads of issues 10 and 13 (H1-H6), measured with wrk against every
HTTP server, with curl checking the bytes each serves.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from benchmarks.dataset import BIG, BIG_SIZE, COLD_FILES, HUGE, HUGE_SIZE, SMALL_SIZE, fresh_files
from benchmarks.httpclients import check_bytes, wrk, wrk_problem
from benchmarks.servers import HTTP_SERVER_NAMES, SERVER_NAMES, Server
from benchmarks.workloads import (
    Context,
    Run,
    restart_filecache,
    warm_page_cache,
    with_two_workers,
)

RANGE_SIZE = 1 << 20
SMALL_CONNECTIONS = 50
RANGE_CONNECTIONS = 8
# H6 ends when its 10,000 replies are in; this only bounds a run that loses one.
COLD_LIMIT_S = 300
COLD_CHECKED = 100  # cold files whose bytes curl checks, after the run


def wrk_seconds(ctx: Context) -> int:
    """wrk takes whole seconds."""
    duration: float = ctx.args.duration
    return max(1, round(duration))


def wrk_threads(ctx: Context, default: int) -> int:
    chosen: int | None = ctx.args.wrk_threads
    return chosen or default


def measured(result: dict[str, Any], body: int, values: dict[str, float]) -> Run:
    """A Run of these figures, failed if wrk's counts do not fit replies of C{body} bytes."""
    run = Run(values=values, raw=result)
    problem = wrk_problem(result, body)
    if problem:
        run.fail(problem)
        run.errors = max(1, sum(result["errors"].values()))
    return run


def mb_per_s(result: dict[str, Any]) -> float:
    return float(result["bytes"]) / float(result["seconds"]) / 1e6


def h1_small(ctx: Context, s: Server) -> Run:
    """The 1,000 4 KiB files of workload 1, round-robin, 50 keep-alive connections."""
    paths = ctx.ds.small_list.read_text().split()
    # One request for each file, which fills filecache's cache as workload 1's warm-up does.
    problem = check_bytes(ctx.procs, s, ctx.ds.root, paths)
    if problem:
        return Run().fail(problem)
    r = wrk(
        ctx.procs,
        s,
        paths[0],
        "paths",
        str(ctx.ds.small_list),
        connections=SMALL_CONNECTIONS,
        threads=wrk_threads(ctx, 1),
        seconds=wrk_seconds(ctx),
    )
    rps = r["requests"] / r["seconds"]
    return measured(r, SMALL_SIZE, {"rps": rps, "p99": r["latency_us"]["p99"] / 1000})


def h5_small_two_workers(ctx: Context, s: Server) -> Run:
    """H1 again, with filecache started with --workers 2 (the others as they are)."""
    return with_two_workers(ctx, s, h1_small)


def h6_cold(ctx: Context, s: Server) -> Run:
    """
    10,000 new 4 KiB files, each requested once, 50 connections: the run
    lasts as long as they take (wrk.lua's "once" mode).  Their bytes cannot
    be checked before without warming them, so curl checks some after.
    """
    threads = wrk_threads(ctx, 1)
    with fresh_files(ctx.ds, f"h6-{s.name}") as cold:
        restart_filecache(ctx, s)
        # Last, right before the run: this machine evicts the page cache as it goes.
        warm_page_cache(ctx.ds.root, cold.list_file)
        r = wrk(
            ctx.procs,
            s,
            cold.paths[0],
            "once",
            str(cold.list_file),
            str(threads),
            connections=SMALL_CONNECTIONS,
            threads=threads,
            seconds=COLD_LIMIT_S,
            until_threads_done=True,
        )
        problem = check_bytes(
            ctx.procs, s, ctx.ds.root, random.sample(cold.paths, COLD_CHECKED)
        )
    run = measured(r, SMALL_SIZE, {"rps": r["requests"] / r["seconds"]})
    if r["requests"] != COLD_FILES or r["threads_done"] != r["threads"]:
        run.fail(
            f"{r['requests']:,} replies for {COLD_FILES:,} files, {r['threads_done']} of "
            f"{r['threads']} wrk thread(s) done; " + run.error
        )
    if problem:
        run.fail(problem + ("; " + run.error if run.error else ""))
    return run


def one_connection(ctx: Context, s: Server, path: str, size: int, fetches: int) -> Run:
    """MB/s of one connection fetching C{path} over and over, after C{fetches} checked fetches."""
    for _ in range(fetches):
        problem = check_bytes(ctx.procs, s, ctx.ds.root, [path])
        if problem:
            return Run().fail(problem)
    r = wrk(ctx.procs, s, path, connections=1, threads=1, seconds=wrk_seconds(ctx))
    return measured(r, size, {"mbps": mb_per_s(r)})


def h2_big_cached(ctx: Context, s: Server) -> Run:
    # Fetched twice first, as in workload 2: filecache has it cached after that.
    return one_connection(ctx, s, BIG, BIG_SIZE, 2)


def h3_huge(ctx: Context, s: Server) -> Run:
    # Larger than filecache's cache: always read from the file (the page cache).
    return one_connection(ctx, s, HUGE, HUGE_SIZE, 1)


def h4_ranges(ctx: Context, s: Server) -> Run:
    """1 MiB ranges at random offsets of the 200 MiB file, 8 connections."""
    start = random.randrange(HUGE_SIZE - RANGE_SIZE)  # a new place each time: more is checked
    problem = check_bytes(ctx.procs, s, ctx.ds.root, [HUGE], (start, RANGE_SIZE))
    if problem:
        return Run().fail(problem)
    r = wrk(
        ctx.procs,
        s,
        HUGE,
        "range",
        HUGE,
        str(HUGE_SIZE),
        str(RANGE_SIZE),
        connections=RANGE_CONNECTIONS,
        threads=wrk_threads(ctx, 1),
        seconds=wrk_seconds(ctx),
    )
    return measured(r, RANGE_SIZE, {"mbps": mb_per_s(r)})


@dataclass(frozen=True)
class HttpWorkload:
    name: str
    title: str
    run: Callable[[Context, Server], Run]
    servers: tuple[str, ...] = HTTP_SERVER_NAMES


HTTP_WORKLOADS = [
    HttpWorkload("H1", "4 KiB files (1,000, cached), 50 keep-alive conns", h1_small),
    HttpWorkload("H2", "48 MiB file, cached, 1 conn", h2_big_cached),
    HttpWorkload("H3", "200 MiB file (> 64 MiB cache), 1 conn", h3_huge),
    HttpWorkload("H4", "1 MiB ranges at random offsets of the 200 MiB file, 8 conns", h4_ranges),
    # H5 and H6 measure the servers their targets name.  For the others, H5
    # would only repeat H1; and in H6 http.server takes some 2 minutes a
    # round (a connection per request, some timing out) and rclone answers
    # 404: it keeps a folder's listing for 5 minutes (--dir-cache-time), so
    # it does not see a folder of cold files made after it listed fresh/.
    HttpWorkload("H5", "as H1, filecache with --workers 2", h5_small_two_workers, SERVER_NAMES),
    HttpWorkload(
        "H6", "10,000 cold 4 KiB files, each once, 50 keep-alive conns", h6_cold, SERVER_NAMES
    ),
]
