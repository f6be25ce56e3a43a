#!/usr/bin/env python3
"""
The filecache benchmark: one command that builds the load generator, makes the
data set, starts nginx, twistd web and filecache on the same folder, runs every
workload against each of them in turn and prints a markdown table with the
filecache/nginx and filecache/twistd-web ratios, nginx in two configurations
(tuned and default, issue 13).  With --http (or --only H1,...) it runs the HTTP
workloads of issues 10 and 13 under wrk, python3 -m http.server and rclone
serve http joining in.  See benchmarks/README.md.

    python3 benchmarks/run.py [--quick] [--workers N] [--only 1,4] [--http] [--write]
    python3 benchmarks/run.py --client [--quick] [--sweep] [--write]   (benchmarks/clientbench.py)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

# Run as a script, Python puts benchmarks/ on the path, not the checkout that
# holds the benchmarks package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.clients import build_loadgen
from benchmarks.console import BenchError, say
from benchmarks.dataset import WORK, make_dataset
from benchmarks.httpreport import merge_results, render_http
from benchmarks.httpworkloads import HTTP_WORKLOADS
from benchmarks.processes import LOOPBACK, Processes, exit_status, run_with_servers, tail
from benchmarks.report import code_state, machine_info, render
from benchmarks.servers import (
    FILECACHE,
    HTTP_SERVER,
    NGINX,
    NGINX_DEFAULT,
    NGINX_TUNED,
    RCLONE,
    SERVER_CHOICES,
    Server,
    filecache_options,
    make_servers,
)
from benchmarks.workloads import TIMED, WORKLOADS, Context, Run, median_run

HERE = Path(__file__).resolve().parent


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
        "--only",
        type=str,
        default="",
        help="comma-separated workloads to run: native numbers and HTTP names, e.g. 1,4 or H1,H4",
    )
    p.add_argument(
        "--http",
        action="store_true",
        help="run the HTTP workloads H1-H6 (issues 10 and 13), under wrk; alone, only those",
    )
    p.add_argument(
        "--wrk-threads",
        type=int,
        default=None,
        help="wrk threads for H1, H4, H5 and H6 (default 1; H2 and H3 have one connection)",
    )
    p.add_argument(
        "--servers",
        type=str,
        default=",".join(SERVER_CHOICES),
        help=f"comma-separated subset of {','.join(SERVER_CHOICES)} "
        f"({NGINX}: both {NGINX_TUNED} and {NGINX_DEFAULT}; the native workloads use all but "
        f"{HTTP_SERVER} and {RCLONE})",
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
    unknown = set(args.servers) - set(SERVER_CHOICES)
    if unknown:
        p.error(f"unknown server(s): {', '.join(sorted(unknown))}")
    # args.only: the native workloads' numbers; args.http: the HTTP workloads' names.
    names = [x.strip().upper() for x in args.only.split(",") if x.strip()]
    http_names = [w.name for w in HTTP_WORKLOADS]
    # --http alone: all of them; --only naming some: those.
    every_http = args.http and not set(names) & set(http_names)
    args.http = [n for n in http_names if every_http or n in names]
    try:
        native = {int(x) for x in names if x not in http_names}
    except ValueError:
        p.error(f"--only takes workload numbers and names ({', '.join(http_names)}), e.g. 1,4,H1")
    if not names and not args.http:
        native = {w.number for w in WORKLOADS}
    args.only = native
    return args


def measure(
    ctx: Context,
    key: str,
    title: str,
    run_one: Callable[[Context, Server], Run],
    names: tuple[str, ...],
    rounds: int,
) -> dict[str, Run]:
    """
    One workload against each of its servers, for C{rounds} rounds with the
    servers taking turns, so that a noisy moment hits no server alone; each
    server's figures are the medians of its rounds.  A server found dead is
    restarted first.
    """
    procs, servers = ctx.procs, ctx.servers
    per: dict[str, Run] = {}
    runs: dict[str, list[Run]] = {}
    for s in [s for _ in range(rounds) for s in servers.values() if s.name in names]:
        if not s.alive():
            code = exit_status(s.proc) if s.proc else None
            note = f"{s.name} had exited (status {code}) before workload {key}; restarted"
            say("  " + note + ":\n" + tail(s.log))
            s.restarts.append(note)
            s.stop(procs)
            s.start(procs)
        say(f"[{key}] {title}: {s.name}...")
        try:
            run = run_one(ctx, s)
        except (BenchError, OSError, ValueError) as e:
            run = Run().fail(f"{type(e).__name__}: {e}")
        if not s.alive():
            run.fail(
                (run.error + "; " if run.error else "")
                + f"{s.name} exited during the workload:\n{tail(s.log)}"
            )
        runs.setdefault(s.name, []).append(run)
        per[s.name] = median_run(runs[s.name])
        shown = ", ".join(f"{k} {v:,.2f}" for k, v in run.values.items())
        say(
            f"    {shown or 'no figure'}"
            + (f"  [errors {run.errors}: {run.error}]" if run.error else "")
        )
    return per


def main(argv: list[str]) -> int:
    if "--client" in argv:
        # Issue 11's client benchmark: a harness of its own (benchmarks/clientbench.py).
        from benchmarks.clientbench import main as client_main

        return client_main([a for a in argv if a != "--client"])
    args = parse_args(argv)
    results: dict[int, dict[str, Run]] = {}
    http_results: dict[str, dict[str, Run]] = {}
    started = time.monotonic()

    def body(procs: Processes) -> int:
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
        # The code the servers load now is the code measured, whatever lands meanwhile.
        code = code_state()
        if not servers:
            raise BenchError("no server to measure")
        for s in servers.values():
            say(f"starting {s.name}...")
            s.start(procs)
            say(f"  {s.name}: pid {s.pid}, {LOOPBACK}:{s.port}, log {s.log}")
        ctx = Context(args, procs, ds, servers, logs)
        for w in WORKLOADS:
            if w.number in args.only:
                rounds = args.rounds if w.number in TIMED else 1
                results[w.number] = measure(ctx, str(w.number), w.title, w.run, w.servers, rounds)
        for hw in HTTP_WORKLOADS:
            if hw.name in args.http:
                http_results[hw.name] = measure(
                    ctx, hw.name, hw.title, hw.run, hw.servers, args.rounds
                )
        info = machine_info(args, code)
        if code_state() != code:
            info.append(("code at the end of the run", f"{code_state()}: it changed during the run"))
        native = None
        if results:
            native = render(results, servers, args, info)
            for s in servers.values():
                for note in s.restarts:
                    if "workload H" not in note:
                        native += f"- {note}\n"
        http = render_http(http_results, servers, args, info) if http_results else None
        report = "\n".join(x for x in (native or "# filecache benchmark\n", http) if x)
        raw = {
            "info": dict(info),
            "results": {
                w: {
                    n: {"values": r.values, "errors": r.errors, "error": r.error, "raw": r.raw}
                    for n, r in per.items()
                }
                for w, per in results.items()
            },
            "http_results": {
                w: {
                    n: {"values": r.values, "errors": r.errors, "error": r.error, "raw": r.raw}
                    for n, r in per.items()
                }
                for w, per in http_results.items()
            },
        }
        (WORK / "results.json").write_text(json.dumps(raw, indent=1) + "\n")
        sys.stdout.write(report)
        if args.write:
            md = HERE / "results.md"
            md.write_text(merge_results(md.read_text() if md.exists() else "", native, http))
            say(f"wrote {HERE / 'results.md'}")
        say(f"done in {time.monotonic() - started:.0f} s; raw figures in {WORK / 'results.json'}")
        return 0

    return run_with_servers(body)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
