"""
The HTTP section of the report: issue 10's and issue 13's targets, the table of
H1-H6 with its ratios, nginx's configurations, and that section's place in results.md.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
from typing import Any

from benchmarks.httpworkloads import HTTP_WORKLOADS
from benchmarks.report import Row, figure_table, heading, nginx_configurations
from benchmarks.servers import HTTP_SERVER_NAMES, NGINX_TUNED, SERVER_LABELS, TWISTD_WEB, Server
from benchmarks.targets import at_least, under
from benchmarks.workloads import Run

BEGIN = "<!-- HTTP section: written by benchmarks/run.py --http --write; the rest is kept -->"
END = "<!-- end of the HTTP section -->"

# Issue 10 set up nginx tuned for its targets, and issue 13 anchors on it:
# every HTTP ratio target is judged against nginx tuned.
ROWS = [
    Row(
        "H1",
        "requests/s",
        "rps",
        True,
        "{:,.0f}",
        (
            at_least("10", 0.5, NGINX_TUNED),
            at_least("10", 6, TWISTD_WEB),
            at_least("13", 0.6, NGINX_TUNED),
        ),
    ),
    Row("H1", "p99 latency ms", "p99", False, "{:.2f}", (under("10", 5, "ms"), under("13", 5, "ms"))),
    Row("H2", "MB/s", "mbps", True, "{:,.0f}", (at_least("10", 1.0, NGINX_TUNED), at_least("13", 1.0, NGINX_TUNED))),
    Row("H3", "MB/s", "mbps", True, "{:,.0f}", (at_least("10", 0.9, NGINX_TUNED), at_least("13", 0.9, NGINX_TUNED))),
    Row("H4", "MB/s", "mbps", True, "{:,.0f}", (at_least("10", 0.8, NGINX_TUNED),)),
    Row("H5", "requests/s", "rps", True, "{:,.0f}", (at_least("13", 0.9, NGINX_TUNED),)),
    Row("H5", "p99 latency ms", "p99", False, "{:.2f}", ()),
    Row(
        "H6",
        "requests/s",
        "rps",
        True,
        "{:,.0f}",
        (at_least("13", 5, TWISTD_WEB), at_least("13", 0.3, NGINX_TUNED)),
    ),
]


def _first_line(argv: list[str]) -> str:
    try:
        p = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=20)
        return (p.stdout + p.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "?"


def tool_versions() -> list[tuple[str, str]]:
    wrk = _first_line(["wrk", "-v"])
    rclone = shutil.which("rclone")
    return [
        ("wrk", re.sub(r"\s*Copyright.*", "", wrk)),
        ("rclone", _first_line([rclone, "version"]) if rclone else "not installed"),
        ("miniserve, dufs", "not measured: not packaged by Debian"),
    ]


def _cpu_notes(results: dict[str, dict[str, Run]]) -> list[str]:
    notes = []
    for w in HTTP_WORKLOADS:
        cpu = []
        for n, run in results.get(w.name, {}).items():
            raw: dict[str, Any] = run.raw.get("rounds", [run.raw])[-1]
            if raw.get("seconds"):
                server = 100 * raw["server_cpu_s"] / raw["seconds"]
                client = 100 * raw["client_cpu_s"] / raw["seconds"] / raw["threads"]
                cpu.append(f"{SERVER_LABELS[n]} {server:.0f}/{client:.0f}")
        if cpu:
            notes.append(
                f"- {w.name}, CPU in % of one core, server (all processes) / wrk (per thread, "
                "last round): " + ", ".join(cpu) + "."
            )
    return notes


def render_http(
    results: dict[str, dict[str, Run]],
    servers: dict[str, Server],
    args: argparse.Namespace,
    info: list[tuple[str, str]],
) -> str:
    """The "## HTTP" section, whole in itself (results.md keeps it apart from the rest)."""
    names = [n for n in HTTP_SERVER_NAMES if n in servers]
    titles = {w.name: w.title for w in HTTP_WORKLOADS}
    info = [(k, v) for k, v in info if k != "timed runs"] + tool_versions()
    info.append(
        (
            "timed runs",
            (
                f"{max(1, round(args.duration))} s each (wrk takes whole seconds), {args.rounds} "
                f"round(s) (median shown); wrk threads: {args.wrk_threads or 1}"
            ),
        )
    )
    info.append(
        ("load average (1, 5, 15 min) at the end", " ".join(f"{x:.2f}" for x in os.getloadavg()))
    )
    out = [BEGIN, "## HTTP (issues 10 and 13)", ""]
    if args.duration < 8 or args.rounds < 3:
        out += [
            (
                f"**A short run** ({max(1, round(args.duration))} s per timed run, {args.rounds} "
                "round(s)): a smoke test of the harness, not figures to quote."
            ),
            "",
        ]
    out += heading(info)
    out += figure_table(ROWS, results, names, titles)
    out += [
        "",
        "Notes:",
        (
            "- H1 req/s: completed replies per second; p99: wrk's latency (request sent to reply "
            "read), 99th percentile. MB/s: 10^6 bytes read by wrk (heads included, under 0.1% "
            "of these bodies) per second. Ratios are filecache / other."
        ),
        (
            "- Before every timed run one curl fetches the workload's files (H1 and H5: all 1,000 in "
            "turn, which also fills filecache's cache; H2: twice; H4: one 1 MiB range, as a 206; "
            "H6, whose files must stay cold: 100 of them at random, after the run) and "
            "their SHA-256 is compared with the files'. During the run wrk must count no error "
            "(no status of 400 or more, no timeout) and the bytes read must fit the replies "
            "counted (a 200 where a 206 was due would not). `!` marks a figure that failed."
        ),
        (
            "- `python3 -m http.server` runs with its defaults: HTTP/1.0, so every request "
            "opens a new connection (with `--protocol HTTP/1.1` it answers about 40 ms late: "
            "its head and body are two writes, held back by Nagle's algorithm and delayed ACKs)."
        ),
    ]
    if "H6" in results:
        out.append(
            "- H6: each server, in each round, gets 10,000 files of its own, made just before and "
            "read once by the script right before the run (so the page cache holds them, but no "
            "server has seen them: nginx tuned's open_file_cache and filecache's cache are cold; "
            "filecache is restarted first as well). wrk requests each exactly once (wrk.lua's "
            "`once` mode) and is stopped when the last reply is in."
        )
    out.append(
        "- nginx runs in two configurations (below): tuned (`open_file_cache max=10000`), which "
        "issue 10 set up and issue 13 anchors on, so every HTTP target is judged against it; "
        "default (`open_file_cache off`) is shown beside it."
    )
    out += _cpu_notes(results)
    problems = [
        f"- {w}, {SERVER_LABELS[n]}: {run.errors} error(s): {run.error}"
        for w, per in results.items()
        for n, run in per.items()
        if run.error
    ]
    problems += [
        f"- {note}" for s in servers.values() for note in s.restarts if "workload H" in note
    ]
    if problems:
        out += ["", "Errors:", *problems]
    configs = nginx_configurations(servers)
    if configs:
        out += [""] + configs
    return "\n".join(out + [END]) + "\n"


def merge_results(old: str, native: str | None, http: str | None) -> str:
    """
    results.md with the native report and the HTTP section replaced by the
    new ones where given, the other kept as it was; the sections after the
    HTTP one (the other tools': client, curves, profiles) are always kept.
    """
    before, marker, rest = old.partition(BEGIN)
    old_http = (marker + rest.partition(END)[0] + END + "\n") if marker else ""
    after = rest.partition(END)[2].strip("\n") if marker else ""
    native_part = native if native is not None else before
    http_part = http if http is not None else old_http
    parts = [part.strip("\n") for part in (native_part, http_part, after) if part.strip()]
    return "\n\n".join(parts) + "\n"
