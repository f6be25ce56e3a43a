#!/usr/bin/env python3
"""
The cost curves of issue 13, filecache beside tuned nginx in the same run:
how requests/s of 50 active connections and resident memory grow with idle
connections (0, 1,000, 5,000, 10,000 beside them), and how a listing's time
and peak memory grow with the folder (LIST of 10,000, 100,000 and 1,000,000
files; nginx: autoindex).  See benchmarks/README.md.

    python3 benchmarks/curves.py [--quick] [--only connections|folders] [--write]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.clients import build_loadgen, fc_list, http_get_all, loadgen
from benchmarks.console import BenchError, say
from benchmarks.dataset import WORK, make_dataset
from benchmarks.processes import LOOPBACK, Processes, run_with_servers
from benchmarks.report import publish, run_info
from benchmarks.resources import RssSampler, process_tree, status_kib
from benchmarks.servers import NGINX_CONF, Server, filecache_argv, find_nginx

IDLE_COUNTS = (0, 1_000, 5_000, 10_000)
FOLDER_SIZES = (10_000, 100_000, 1_000_000)
FD_LIMIT = min(65_536, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
"""Descriptors for each server: 65,536, or the hard limit if lower (20,000 in
some containers: enough for 10,000 idle connections and the active ones)."""
BEGIN = "<!-- cost curves: written by benchmarks/curves.py -->"
END = "<!-- end of the cost curves -->"


def rss_kib(pid: int) -> int:
    """Resident memory of C{pid} and its children, KiB."""
    return sum(status_kib(p, "VmRSS") for p in process_tree(pid))


def raise_own_fd_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, hard))


def with_fd_limit(argv: list[str]) -> list[str]:
    """C{argv} run under prlimit with L{FD_LIMIT} descriptors (util-linux)."""
    prlimit = shutil.which("prlimit")
    if prlimit is None:
        raise BenchError("prlimit not found: apt-get install util-linux")
    return [prlimit, f"--nofile={FD_LIMIT}:{FD_LIMIT}", *argv]


def nginx_tuned(nginx: str, root: Path, listdir: Path, work: Path, logs: Path) -> Server:
    """Tuned nginx (open_file_cache), with descriptors and worker_connections for 10,000 idle clients."""
    prefix = work / "nginx-curves"
    shutil.rmtree(prefix, ignore_errors=True)
    prefix.mkdir(parents=True)
    template = NGINX_CONF.format(
        prefix=prefix, addr=LOOPBACK, root=root, listdir=listdir, open_file_cache="max=10000"
    )
    template = template.replace("worker_connections 4096;", "worker_connections 20000;")
    template = template.replace("worker_processes 1;", f"worker_processes 1;\nworker_rlimit_nofile {FD_LIMIT};")
    # Idle connections that never send a request must outlive the run.
    template = template.replace("    access_log off;", "    access_log off;\n    client_header_timeout 600s;")
    conf = prefix / "nginx.conf"

    def argv(port: int) -> list[str]:
        conf.write_text(template.replace("{port}", str(port)))
        return [nginx, "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(conf), "-g", "daemon off;"]

    return Server("nginx", "http", argv, logs / "nginx-curves.log", config=conf)


def filecache_server(root: Path, args: argparse.Namespace, logs: Path, name: str = "filecache") -> Server:
    def argv(port: int) -> list[str]:
        return with_fd_limit(
            filecache_argv(port, root, args)
            + ["--max-connections", "20000", "--max-per-ip", "20000", "--idle-timeout", "600"]
        )

    return Server(name, "fc", argv, logs / f"{name}-curves.log")


def open_idle(port: int, count: int) -> list[socket.socket]:
    """C{count} connections to C{port} that send nothing."""
    idle = []
    for _ in range(count):
        s = socket.socket()
        s.connect((LOOPBACK, port))
        idle.append(s)
    return idle


def connection_curve(procs: Processes, server: Server, small_list: Path, duration: str) -> list[dict[str, Any]]:
    server.start(procs)
    points = []
    try:
        lg = ("-f", str(small_list))
        loadgen(procs, server, "-c", "10", "-C", *lg, label="curve-warm")
        # One baseline, before any idle connection: memory freed when one
        # point's connections close is kept by the allocator and reused by
        # the next point's, so a baseline taken between points would hide it.
        before = rss_kib(server.pid)
        for count in IDLE_COUNTS:
            idle = open_idle(server.port, count)
            try:
                time.sleep(1.0 + count / 5000)  # accepted and settled
                after = rss_kib(server.pid)
                r = loadgen(procs, server, "-c", "50", "-d", duration, *lg, label=f"curve-{count}")
                if r["errors"]:
                    raise BenchError(f"{server.name} with {count} idle: {r['first_error']}")
            finally:
                for s in idle:
                    s.close()
            per = (after - before) / count if count else 0.0
            points.append({"idle": count, "rps": r["requests_per_s"], "p99": r["latency_ms"]["p99"],
                           "rss_mib": after / 1024, "kib_per_idle": per})
            say(f"  {server.name}: {count:,} idle: {r['requests_per_s']:,.0f} req/s, {per:.1f} KiB per idle connection")
            time.sleep(1.0)  # the closed ones gone
    finally:
        server.stop(procs)
    return points


def make_folder(path: Path, count: int) -> None:
    """C{count} empty files in one folder (a stamp says it is complete)."""
    stamp = path.with_suffix(".done")
    if stamp.exists():
        return
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    say(f"making a folder of {count:,} files...")
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(count):
            os.close(os.open(f"f{i:07d}", os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644, dir_fd=fd))
    finally:
        os.close(fd)
    stamp.write_text(str(count))


def folder_curve(procs: Processes, args: argparse.Namespace, nginx: str | None, work: Path, logs: Path) -> list[dict[str, Any]]:
    points = []
    for count in FOLDER_SIZES:
        folder = work / "curves" / f"list{count}"
        make_folder(folder, count)
        point: dict[str, Any] = {"files": count}
        lister = filecache_server(folder, args, logs, f"filecache-list{count}")
        lister.start(procs)
        try:
            with RssSampler(lister.pid) as rss:
                seconds, rows, _ = fc_list(lister.port, timeout=600)
            hwm = sum(status_kib(pid, "VmHWM") for pid in process_tree(lister.pid)) / 1024
            if rows != count:
                raise BenchError(f"LIST of {count:,} gave {rows:,} rows")
            point.update(fc_seconds=seconds, fc_rss=max(rss.peak_mib, hwm), fc_before=rss.before_mib)
        finally:
            lister.stop(procs)
        if nginx:
            web = nginx_tuned(nginx, folder, folder, work, logs)
            web.start(procs)
            try:
                with RssSampler(web.pid) as rss:
                    seconds, links, _ = http_get_all(web.port, "/listdir/", timeout=600)
                if links < count:
                    raise BenchError(f"autoindex of {count:,} listed {links:,}")
                point.update(ng_seconds=seconds, ng_rss=rss.peak_mib)
            finally:
                web.stop(procs)
        say(f"  {count:,} files: LIST {point['fc_seconds']:.2f} s, peak RSS {point['fc_rss']:.0f} MiB"
            + (f"; nginx autoindex {point['ng_seconds']:.2f} s" if "ng_seconds" in point else ""))
        points.append(point)
    return points


def render(info: list[tuple[str, str]], conns: dict[str, list[dict[str, Any]]], folders: list[dict[str, Any]]) -> str:
    out = [BEGIN, "## Cost curves (issue 13)", ""]
    out += [f"- {k}: {v}" for k, v in info]
    if conns:
        out += ["", "### Idle connections beside 50 active ones (4 KiB cached files)", "",
                "| server | idle | requests/s | vs 0 idle | p99 ms | RSS MiB | KiB per idle connection |",
                "|---|---|---|---|---|---|---|"]
        verdicts = []
        for name, points in conns.items():
            base = points[0]["rps"]
            for p in points:
                out.append(f"| {name} | {p['idle']:,} | {p['rps']:,.0f} | {p['rps'] / base:.2f} | "
                           f"{p['p99']:.2f} | {p['rss_mib']:.0f} | {p['kib_per_idle']:.1f} |")
            last = points[-1]
            if name == "filecache":
                verdicts.append(f"requests/s at {last['idle']:,} idle = {last['rps'] / base:.2f} x none "
                                f"(target 0.8: **{'met' if last['rps'] / base >= 0.8 else 'not met'}**)")
                worst = max(p["kib_per_idle"] for p in points if p["idle"])
                verdicts.append(f"memory per idle connection at most {worst:.1f} KiB "
                                f"(target 16 KiB: **{'met' if worst <= 16 else 'not met'}**)")
        out += ["", "filecache: " + "; ".join(verdicts) + "."]
    if folders:
        out += ["", "### LIST against the folder's size", "",
                "| files | filecache LIST s | peak RSS MiB | s per 100,000 | nginx autoindex s | nginx peak RSS MiB |",
                "|---|---|---|---|---|---|"]
        for p in folders:
            out.append(f"| {p['files']:,} | {p['fc_seconds']:.2f} | {p['fc_rss']:.0f} | "
                       f"{p['fc_seconds'] / p['files'] * 100_000:.2f} | "
                       f"{p.get('ng_seconds', float('nan')):.2f} | {p.get('ng_rss', float('nan')):.0f} |")
        big = folders[-1]
        verdict = (
            f"filecache: 1,000,000 files in {big['fc_seconds']:.1f} s "
            f"(target < 10 s: **{'met' if big['fc_seconds'] < 10 else 'not met'}**); peak RSS "
            f"{folders[0]['fc_rss']:.0f} / {folders[1]['fc_rss']:.0f} / {big['fc_rss']:.0f} MiB."
        )
        out += ["", verdict]
    out.append(END)
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 s per timed run instead of 5")
    p.add_argument("--only", choices=("connections", "folders"), help="one of the two curves")
    p.add_argument("--write", action="store_true", help="write the cost curves section of benchmarks/results.md")
    args = p.parse_args(argv)
    args.workers = None
    args.daemon_arg = []
    args.filecache_help = ""  # the limits are given below, for 10,000 connections from one address
    duration = "2" if args.quick else "5"
    work = WORK
    logs = work / "curves-logs"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)

    def body(procs: Processes) -> int:
        raise_own_fd_limit()
        build_loadgen()
        ds = make_dataset(False)
        nginx = find_nginx()
        info = [
            *run_info(),
            ("nginx", "tuned: one worker, sendfile, open_file_cache max=10000, worker_connections 20000"
             if nginx else "not installed"),
            ("timed runs", f"{duration} s each, one round"),
        ]
        conns: dict[str, list[dict[str, Any]]] = {}
        folders: list[dict[str, Any]] = []
        if args.only in (None, "connections"):
            say("connection curve: filecache")
            conns["filecache"] = connection_curve(procs, filecache_server(ds.root, args, logs), ds.small_list, duration)
            if nginx:
                say("connection curve: nginx")
                conns["nginx"] = connection_curve(
                    procs, nginx_tuned(nginx, ds.root, ds.listdir, work, logs), ds.small_list, duration
                )
        if args.only in (None, "folders"):
            say("folder curve")
            folders = folder_curve(procs, args, nginx, work, logs)
        publish(render(info, conns, folders), args.write, BEGIN, END)
        return 0

    return run_with_servers(body)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
