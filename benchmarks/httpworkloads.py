"""
The HTTP workloads of issue 10 (H1-H4), measured with wrk against every HTTP
server, each after curl has checked the bytes it serves.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from benchmarks.dataset import BIG, BIG_SIZE, HUGE, HUGE_SIZE, SMALL_SIZE
from benchmarks.httpclients import check_bytes, wrk, wrk_problem
from benchmarks.servers import HTTP_SERVER_NAMES, Server
from benchmarks.workloads import Context, Run

RANGE_SIZE = 1 << 20
SMALL_CONNECTIONS = 50
RANGE_CONNECTIONS = 8


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
]
