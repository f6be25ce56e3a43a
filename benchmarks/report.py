"""
The report: issue 4's target for each figure, the machine and commit measured, and
the markdown table of figures and ratios that run.py prints.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchmarks.console import say
from benchmarks.servers import (
    CACHE_BYTES,
    FILECACHE,
    NGINX,
    TWISTD_WEB,
    filecache_argv,
    find_nginx,
    twistd,
)
from benchmarks.workloads import WORKLOADS, Run

HERE = Path(__file__).resolve().parent

REPO = Path(__file__).resolve().parent.parent


# A target from issue 4: (filecache, nginx, twistd web) -> (its text, met or None if unknown).
Target = Callable[[float, "float | None", "float | None"], "tuple[str, bool | None]"]


@dataclass(frozen=True)
class Row:
    workload: int
    metric: str
    key: str
    higher_is_better: bool
    fmt: str
    target: Target


def ratio_target(nginx_min: float | None = None, twistd_min: float | None = None) -> Target:
    def check(fc: float, ng: float | None, tw: float | None) -> tuple[str, bool | None]:
        parts, ok = [], []
        if nginx_min is not None:
            parts.append(f">= {nginx_min:g} x nginx")
            if ng:
                ok.append(fc / ng >= nginx_min)
        if twistd_min is not None:
            parts.append(f">= {twistd_min:g} x twistd web")
            if tw:
                ok.append(fc / tw >= twistd_min)
        return ", ".join(parts), (all(ok) if ok else None)

    return check


def below(limit: float, unit: str) -> Target:
    def check(fc: float, ng: float | None, tw: float | None) -> tuple[str, bool | None]:
        return f"< {limit:g} {unit}", fc < limit

    return check


W4_RSS_LIMIT = CACHE_BYTES / 2**20 + 60 + 200 * 256 / 1024

ROWS = [
    Row(1, "requests/s", "rps", True, "{:,.0f}", ratio_target(0.6, 8)),
    Row(1, "p99 latency ms", "p99", False, "{:.2f}", below(5, "ms")),
    Row(2, "MB/s", "mbps", True, "{:,.0f}", ratio_target(1.0)),
    Row(3, "MB/s", "mbps", True, "{:,.0f}", ratio_target(0.9)),
    Row(4, "aggregate MB/s", "mbps", True, "{:,.0f}", ratio_target(0.8)),
    Row(4, "peak RSS MiB", "rss", False, "{:,.0f}", below(W4_RSS_LIMIT, "MiB")),
    Row(5, "requests/s", "rps", True, "{:,.0f}", ratio_target(None, 5)),
    Row(6, "seconds", "seconds", False, "{:.3f}", below(1, "s")),
    Row(6, "peak RSS MiB", "rss", False, "{:,.0f}", below(100, "MiB")),
    Row(7, "requests/s", "rps", True, "{:,.0f}", ratio_target(0.6, 8)),
    Row(7, "p99 latency ms", "p99", False, "{:.2f}", below(5, "ms")),
    Row(8, "requests/s", "rps", True, "{:,.0f}", ratio_target(0.6, 8)),
    Row(8, "p99 latency ms", "p99", False, "{:.2f}", below(5, "ms")),
    Row(9, "MB/s", "mbps", True, "{:,.0f}", ratio_target(0.9)),
]


def code_state() -> str:
    """
    The commit measured, and whether the code that runs (the daemon, its
    plugin, the harness's code) differs from it: changed or new files there
    count, as a daemon started now would load them.
    """
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
        check=False,
        capture_output=True,
        text=True,
    ).stdout.strip()
    changed = subprocess.run(
        ["git", "-C", str(REPO), "--no-optional-locks", "status", "--porcelain", "--"]
        + ["filecache", "twisted", "benchmarks/*.py", "benchmarks/*.c", "benchmarks/*.lua"],
        check=False,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return (commit or "?") + (
        " (with uncommitted changes to filecache/, twisted/ or benchmarks/)" if changed else ""
    )


def run_info(code: str | None = None) -> list[tuple[str, str]]:
    """The rows every benchmark report opens with: when, which code, which machine."""
    import twisted

    return [
        ("date", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")),
        ("commit", code if code is not None else code_state()),
        ("cores (nproc)", str(len(os.sched_getaffinity(0)))),
        ("CPU", cpu_model()),
        ("kernel", platform.release()),
        ("python", platform.python_version()),
        ("twisted", twisted.__version__),
    ]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        return "?"


def publish(report: str, write: bool, begin: str, end: str) -> None:
    """Print C{report}; with C{write}, also put it in benchmarks/results.md between C{begin} and C{end}."""
    sys.stdout.write(report)
    if write:
        write_section(report, begin, end)


def write_section(section: str, begin: str, end: str) -> None:
    """benchmarks/results.md with the section between C{begin} and C{end} replaced by C{section}."""
    md = HERE / "results.md"
    md.write_text(replace_section(md.read_text() if md.exists() else "", section, begin, end))
    say(f"wrote {md}")


def replace_section(old: str, section: str, begin: str, end: str) -> str:
    """C{old} with its section from C{begin} to C{end} replaced by C{section} (or added at the end)."""
    before, marker, rest = old.partition(begin)
    if not marker:
        return old.rstrip("\n") + "\n\n" + section
    return before + section + rest.partition(end)[2].lstrip("\n")


def machine_info(args: argparse.Namespace, code: str | None = None) -> list[tuple[str, str]]:
    """The machine, the tools, and C{code}: the code_state() the servers started with."""

    def first_line(argv: list[str]) -> str:
        try:
            p = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=20)
            return (p.stdout + p.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "?"

    cpu = cpu_model()
    nginx = find_nginx()
    daemon_options = filecache_argv(0, Path("DIR"), args)[4:]
    for name in ("--port", "--dir"):
        i = daemon_options.index(name)
        del daemon_options[i : i + 2]
    return [
        ("date", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")),
        ("commit", code if code is not None else code_state()),
        ("cores (nproc)", str(len(os.sched_getaffinity(0)))),
        ("CPU", cpu),
        ("kernel", platform.release()),
        ("python", platform.python_version()),
        (
            "twisted",
            first_line([twistd(), "--version"]).replace("twistd (the Twisted daemon) ", ""),
        ),
        (
            "nginx",
            first_line([nginx, "-v"]).replace("nginx version: ", "") if nginx else "not installed",
        ),
        ("cc", first_line([os.environ.get("CC") or "cc", "--version"])),
        ("filecache options", " ".join(daemon_options)),
        (
            "timed runs",
            f"{args.duration:g} s each, {args.rounds} rounds (median shown); loadgen threads: "
            + (str(args.loadgen_threads) if args.loadgen_threads else "1, 2 for workload 4"),
        ),
    ]


def heading(info: list[tuple[str, str]]) -> list[str]:
    """The machine, the commit and the command, as markdown lines."""
    out = [f"- {k}: {v}" for k, v in info]
    return out + [
        "",
        "Command: `" + " ".join(["python3", "benchmarks/run.py", *sys.argv[1:]]) + "`",
        "",
    ]


def render(
    results: dict[int, dict[str, Run]],
    names: list[str],
    args: argparse.Namespace,
    info: list[tuple[str, str]],
) -> str:
    titles = {w.number: w.title for w in WORKLOADS}
    out = ["# filecache benchmark", ""] + heading(info)
    col = {FILECACHE: "filecache", NGINX: "nginx", TWISTD_WEB: "twistd web"}
    head = (
        ["workload", "metric"]
        + [col[n] for n in names]
        + ["fc/nginx", "fc/twistd-web", "target (issue 4)", "met"]
    )
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    problems = []
    for row in ROWS:
        if row.workload not in results:
            continue
        per = results[row.workload]
        cells, nums = [], {}
        for n in names:
            run = per.get(n)
            if run is None or row.key not in run.values:
                cells.append("-")
                continue
            v = run.values[row.key]
            nums[n] = v
            cells.append(row.fmt.format(v) + (" !" if run.errors else ""))
        fc = nums.get(FILECACHE)

        def ratio(other: str, fc: float | None = fc, nums: dict[str, float] = nums) -> str:
            o = nums.get(other)
            return f"{fc / o:.2f}" if fc is not None and o else "-"

        target, met = ("", None)
        if fc is not None:
            target, met = row.target(fc, nums.get(NGINX), nums.get(TWISTD_WEB))
        fc_run = per.get(FILECACHE)
        met_text = {True: "yes", False: "**no**", None: "?"}[met]
        if fc_run is not None and fc_run.errors:
            met_text = "**no** (errors)"
        better = "" if row.higher_is_better else " (lower is better)"
        out.append(
            "| "
            + " | ".join(
                [
                    f"{row.workload}. {titles[row.workload]}",
                    row.metric + better,
                    *cells,
                    ratio(NGINX),
                    ratio(TWISTD_WEB),
                    target,
                    met_text,
                ]
            )
            + " |"
        )
    for w, per in sorted(results.items()):
        for n, run in per.items():
            if run.error:
                problems.append(f"- workload {w}, {n}: {run.errors} error(s): {run.error}")
    notes = [
        "",
        "Notes:",
        "- MB/s is 10^6 bytes of body per second, as read by the client; ratios are filecache / other.",
        "- `!` marks a figure measured with errors (listed below).",
    ]
    if 5 in results:
        notes.append(
            "- Workload 5: the files were never requested before, but the OS page cache holds them "
            "for every server (they were just written); filecache is restarted first so its memory "
            "cache is empty."
        )
    if 4 in results or 6 in results:
        notes.append(
            "- Peak RSS is VmRSS of the server and its child processes, summed, sampled every 50 ms "
            "(nginx: master + worker). Workload 6 (filecache, twistd web) uses a fresh server on "
            "the 100,000-file folder, so its VmHWM is included."
        )
    for w in (1, 2, 3, 4, 5):
        cpu = []
        for n, run in results.get(w, {}).items():
            if "client_cpu_s" in run.raw and run.raw.get("seconds"):
                secs = run.raw["seconds"]
                client = 100 * run.raw["client_cpu_s"] / secs / run.raw["threads"]
                server = 100 * run.raw["server_cpu_s"] / secs
                cpu.append(f"{col[n]} {server:.0f}/{client:.0f}")
        if cpu:
            notes.append(
                f"- Workload {w}, CPU in % of one core, server (all processes) / load generator "
                "(per thread; near 100 would make it the limit): " + ", ".join(cpu) + "."
            )
    extras = []
    if 4 in results:
        for n, run in results[4].items():
            if "rss_before_mib" in run.raw:
                extras.append(f"{col[n]} {run.raw['rss_before_mib']:.0f} MiB")
        if extras:
            notes.append("- Workload 4, RSS before the 200 connections: " + ", ".join(extras) + ".")
    if 6 in results and FILECACHE in results[6] and "second_list_s" in results[6][FILECACHE].raw:
        notes.append(
            f"- Workload 6: a second LIST on the same daemon took "
            f"{results[6][FILECACHE].raw['second_list_s']:.3f} s."
        )
    if problems:
        notes += ["", "Errors:"] + problems
    return "\n".join(out + notes) + "\n"
