"""
The HTTP section of the report: issue 10's targets, the table of H1-H4 with its
ratios, nginx's configuration, and that section's place in results.md.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any

from benchmarks.httpworkloads import HTTP_WORKLOADS
from benchmarks.report import Target, below, heading, ratio_target
from benchmarks.servers import (
    FILECACHE,
    HTTP_SERVER,
    NGINX_HTTP,
    RCLONE,
    TWISTD_WEB,
    Server,
)
from benchmarks.workloads import Run

BEGIN = "<!-- HTTP section: written by benchmarks/run.py --http --write; the rest is kept -->"
END = "<!-- end of the HTTP section -->"

LABELS = {
    FILECACHE: "filecache",
    NGINX_HTTP: "nginx",
    TWISTD_WEB: "twistd web",
    HTTP_SERVER: "python3 -m http.server",
    RCLONE: "rclone serve http",
}


@dataclass(frozen=True)
class Column:
    workload: str
    key: str
    head: str
    fmt: str
    target: Target


COLUMNS = [
    Column("H1", "rps", "H1 req/s", "{:,.0f}", ratio_target(0.5, 6)),
    Column("H1", "p99", "H1 p99 ms (lower is better)", "{:.2f}", below(5, "ms")),
    Column("H2", "mbps", "H2 MB/s", "{:,.0f}", ratio_target(1.0)),
    Column("H3", "mbps", "H3 MB/s", "{:,.0f}", ratio_target(0.9)),
    Column("H4", "mbps", "H4 MB/s", "{:,.0f}", ratio_target(0.8)),
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


def _cell(run: Run | None, col: Column) -> tuple[str, float | None]:
    if run is None or col.key not in run.values:
        return "-", None
    v = run.values[col.key]
    return col.fmt.format(v) + (" !" if run.errors else ""), v


def _table(results: dict[str, dict[str, Run]], names: list[str]) -> list[str]:
    cols = [c for c in COLUMNS if c.workload in results]
    out = ["| server | " + " | ".join(c.head for c in cols) + " |", "|" + "---|" * (len(cols) + 1)]
    nums: dict[tuple[str, str], float] = {}
    for n in names:
        cells = []
        for c in cols:
            text, v = _cell(results[c.workload].get(n), c)
            cells.append(text)
            if v is not None:
                nums[(n, c.head)] = v
        out.append(f"| {LABELS[n]} | " + " | ".join(cells) + " |")

    def ratio(other: str, c: Column) -> str:
        fc, o = nums.get((FILECACHE, c.head)), nums.get((other, c.head))
        return f"{fc / o:.2f}" if fc is not None and o else "-"

    for other in (NGINX_HTTP, TWISTD_WEB):
        out.append(
            f"| filecache / {LABELS[other]} | " + " | ".join(ratio(other, c) for c in cols) + " |"
        )
    targets, met = [], []
    for c in cols:
        fc = nums.get((FILECACHE, c.head))
        if fc is None:
            targets.append(c.target(0, None, None)[0])
            met.append("?")
            continue
        text, ok = c.target(fc, nums.get((NGINX_HTTP, c.head)), nums.get((TWISTD_WEB, c.head)))
        fc_run = results[c.workload].get(FILECACHE)
        targets.append(text)
        met.append(
            "**no** (errors)"
            if fc_run is not None and fc_run.errors
            else {True: "yes", False: "**no**", None: "?"}[ok]
        )
    out.append("| target (issue 10) | " + " | ".join(targets) + " |")
    out.append("| met | " + " | ".join(met) + " |")
    return out


def _cpu_notes(results: dict[str, dict[str, Run]]) -> list[str]:
    notes = []
    for w in HTTP_WORKLOADS:
        cpu = []
        for n, run in results.get(w.name, {}).items():
            raw: dict[str, Any] = run.raw.get("rounds", [run.raw])[-1]
            if raw.get("seconds"):
                server = 100 * raw["server_cpu_s"] / raw["seconds"]
                client = 100 * raw["client_cpu_s"] / raw["seconds"] / raw["threads"]
                cpu.append(f"{LABELS[n]} {server:.0f}/{client:.0f}")
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
    names = [n for n in LABELS if n in servers]
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
    out = [BEGIN, "## HTTP (issue 10)", ""]
    if args.duration < 8 or args.rounds < 3:
        out += [
            (
                f"**A short run** ({max(1, round(args.duration))} s per timed run, {args.rounds} "
                "round(s)): a smoke test of the harness, not figures to quote."
            ),
            "",
        ]
    out += heading(info)
    out += ["Workloads:", ""] + [f"- {w}: {titles[w]}" for w in titles if w in results] + [""]
    out += _table(results, names)
    out += [
        "",
        "Notes:",
        (
            "- H1 req/s: completed replies per second; p99: wrk's latency (request sent to reply "
            "read), 99th percentile. MB/s: 10^6 bytes read by wrk (heads included, under 0.1% "
            "of these bodies) per second. Ratios are filecache / other."
        ),
        (
            "- Before every timed run one curl fetches the workload's files (H1: all 1,000 in turn, "
            "which also fills filecache's cache; H2: twice; H4: one 1 MiB range, as a 206) and "
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
    out += _cpu_notes(results)
    problems = [
        f"- {w}, {LABELS[n]}: {run.errors} error(s): {run.error}"
        for w, per in results.items()
        for n, run in per.items()
        if run.error
    ]
    problems += [
        f"- {note}" for s in servers.values() for note in s.restarts if "workload H" in note
    ]
    if problems:
        out += ["", "Errors:", *problems]
    nginx = servers.get(NGINX_HTTP)
    if nginx is not None and nginx.config is not None and nginx.config.exists():
        out += ["", "nginx's configuration (one run's; the port changes):", "", "```nginx"]
        out += [nginx.config.read_text().rstrip(), "```"]
    return "\n".join(out + [END]) + "\n"


def merge_results(old: str, native: str | None, http: str | None) -> str:
    """
    results.md with the native report and the HTTP section replaced by the
    new ones where given, the other kept as it was.
    """
    before, marker, rest = old.partition(BEGIN)
    old_http = (marker + rest.partition(END)[0] + END + "\n") if marker else ""
    after = rest.partition(END)[2] if marker else ""
    native_part = native if native is not None else before + after.lstrip("\n")
    http_part = http if http is not None else old_http
    if not native_part.strip() or not http_part:
        return http_part or native_part
    return native_part.rstrip("\n") + "\n\n" + http_part
