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
import json
import shutil
import signal
import sys
import time
from pathlib import Path

# Run as a script, Python puts benchmarks/ on the path, not the checkout that
# holds the benchmarks package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.clients import build_loadgen
from benchmarks.console import BenchError, say
from benchmarks.dataset import WORK, make_dataset
from benchmarks.processes import LOOPBACK, Processes, exit_status, tail
from benchmarks.report import machine_info, render
from benchmarks.servers import FILECACHE, SERVER_NAMES, filecache_options, make_servers
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
