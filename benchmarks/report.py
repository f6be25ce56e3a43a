"""
The report: each figure's targets (issues 4 and 13), the machine and commit
measured, the markdown table of figures and ratios that run.py prints, and
nginx's configurations.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.console import say
from benchmarks.processes import LOOPBACK
from benchmarks.servers import (
    CACHE_BYTES,
    FILECACHE,
    NGINX_DEFAULT,
    NGINX_TUNED,
    SERVER_LABELS,
    SERVER_NAMES,
    TWISTD_WEB,
    Server,
    filecache_argv,
    find_nginx,
    twistd,
)
from benchmarks.targets import Goal, at_least, judge, under
from benchmarks.workloads import WORKLOADS, Run

HERE = Path(__file__).resolve().parent

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Row:
    """One row of a table of figures: one figure of one workload, and its targets."""

    workload: str  # "1", "H1"
    metric: str
    key: str
    higher_is_better: bool
    fmt: str
    goals: tuple[Goal, ...]


W4_RSS_LIMIT = CACHE_BYTES / 2**20 + 60 + 200 * 256 / 1024

# Issue 4 set its targets against nginx with open_file_cache off, so they are
# judged against nginx default still; issue 13's are judged against nginx
# tuned, its anchor.  Workloads 7-9 repeat 1 and 3 and take their targets.
ISSUE_4_SMALL = (at_least("4", 0.6, NGINX_DEFAULT), at_least("4", 8, TWISTD_WEB))
LIKE_1 = "4 (workload 1's)"
LIKE_3 = "4 (workload 3's)"
ROWS = [
    Row("1", "requests/s", "rps", True, "{:,.0f}", (*ISSUE_4_SMALL, at_least("13", 0.6, NGINX_TUNED))),
    Row("1", "p99 latency ms", "p99", False, "{:.2f}", (under("4", 5, "ms"), under("13", 5, "ms"))),
    Row("2", "MB/s", "mbps", True, "{:,.0f}", (at_least("4", 1.0, NGINX_DEFAULT), at_least("13", 1.0, NGINX_TUNED))),
    Row("3", "MB/s", "mbps", True, "{:,.0f}", (at_least("4", 0.9, NGINX_DEFAULT), at_least("13", 0.9, NGINX_TUNED))),
    Row("4", "aggregate MB/s", "mbps", True, "{:,.0f}", (at_least("4", 0.8, NGINX_DEFAULT),)),
    Row("4", "peak RSS MiB", "rss", False, "{:,.0f}", (under("4", W4_RSS_LIMIT, "MiB"),)),
    Row(
        "5",
        "requests/s",
        "rps",
        True,
        "{:,.0f}",
        (at_least("4", 5, TWISTD_WEB), at_least("13", 5, TWISTD_WEB), at_least("13", 0.3, NGINX_TUNED)),
    ),
    Row("6", "seconds", "seconds", False, "{:.3f}", (under("4", 1, "s"),)),
    Row("6", "peak RSS MiB", "rss", False, "{:,.0f}", (under("4", 100, "MiB"),)),
    Row(
        "7",
        "requests/s",
        "rps",
        True,
        "{:,.0f}",
        (
            at_least(LIKE_1, 0.6, NGINX_DEFAULT),
            at_least(LIKE_1, 8, TWISTD_WEB),
            at_least("13", 0.9, NGINX_TUNED),
        ),
    ),
    Row("7", "p99 latency ms", "p99", False, "{:.2f}", (under(LIKE_1, 5, "ms"),)),
    Row(
        "8",
        "requests/s",
        "rps",
        True,
        "{:,.0f}",
        (at_least(LIKE_1, 0.6, NGINX_DEFAULT), at_least(LIKE_1, 8, TWISTD_WEB)),
    ),
    Row("8", "p99 latency ms", "p99", False, "{:.2f}", (under(LIKE_1, 5, "ms"),)),
    Row("9", "MB/s", "mbps", True, "{:,.0f}", (at_least(LIKE_3, 0.9, NGINX_DEFAULT),)),
]

# The ratio columns, filecache / each of these.
RATIO_TO = (NGINX_TUNED, NGINX_DEFAULT, TWISTD_WEB)


def _figure(run: Run | None, row: Row) -> tuple[str, float | None]:
    """A server's cell in C{row} (marked when measured with errors) and its figure."""
    if run is None or row.key not in run.values:
        return "-", None
    v = run.values[row.key]
    return row.fmt.format(v) + (" !" if run.errors else ""), v


def ratio_text(fc: float | None, other: float | None) -> str:
    return f"{fc / other:.2f}" if fc is not None and other else "-"


def figure_table(
    rows: Sequence[Row],
    results: Mapping[str, Mapping[str, Run]],
    names: Sequence[str],
    titles: Mapping[str, str],
) -> list[str]:
    """
    The markdown table of C{rows} for the workloads in C{results}: one column
    per server of C{names} that was measured in one of them, filecache's
    ratio to each of RATIO_TO among those, the targets and the verdict.
    """
    names = [n for n in names if any(n in per for per in results.values())]
    ratio_to = [n for n in RATIO_TO if n in names]
    head = (
        ["workload", "metric"]
        + [SERVER_LABELS[n] for n in names]
        + [f"fc/{n}" for n in ratio_to]
        + ["target", "met"]
    )
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        per = results.get(row.workload)
        if per is None:
            continue
        cells, figures = [], {}
        for n in names:
            text, v = _figure(per.get(n), row)
            cells.append(text)
            if v is not None:
                figures[n] = v
        fc = figures.get(FILECACHE)
        fc_run = per.get(FILECACHE)
        verdict = judge(row.goals, fc, figures, fc_run is not None and fc_run.errors > 0)
        better = "" if row.higher_is_better else " (lower is better)"
        out.append(
            "| "
            + " | ".join(
                [
                    f"{row.workload}. {titles[row.workload]}",
                    row.metric + better,
                    *cells,
                    *(ratio_text(fc, figures.get(n)) for n in ratio_to),
                    verdict.target,
                    verdict.met,
                ]
            )
            + " |"
        )
    return out


@dataclass(frozen=True)
class NginxConfig:
    """One nginx configuration as the report shows it."""

    label: str  # "nginx tuned"
    text: str
    # Strings that are this server's own (its prefix, its address), and the
    # placeholder each stands for when configurations are compared.
    own: Mapping[str, str]

    def compared(self) -> list[str]:
        text = self.text
        for mine, placeholder in self.own.items():
            text = text.replace(mine, placeholder)
        return text.splitlines()


def differing_lines(first: NginxConfig, second: NginxConfig) -> list[tuple[str, str]] | None:
    """
    The lines of C{second} that differ from C{first}'s, as (first's,
    second's), each read with its own prefix and address taken as the
    same; None if the two do not line up.
    """
    a, b = first.compared(), second.compared()
    if len(a) != len(b):
        return None
    return [(x.strip(), y.strip()) for x, y in zip(a, b) if x != y]


def configuration_section(configs: Sequence[NginxConfig]) -> list[str]:
    """
    Markdown for nginx's configurations: the first in full, each other as
    the lines where it differs, so a reader sees at once what sets them
    apart (in full if they do not line up).
    """
    if not configs:
        return []
    first = configs[0]
    out = [f"{first.label}'s configuration (one run's; the port changes):", "", "```nginx"]
    out += [first.text.rstrip(), "```"]
    for other in configs[1:]:
        lines = differing_lines(first, other)
        if lines is None:
            out += ["", f"{other.label}'s configuration:", "", "```nginx", other.text.rstrip(), "```"]
            continue
        out += [
            "",
            f"{other.label}'s configuration is the same, with a prefix and port of its own, but for:",
            "",
        ]
        out += [f"- `{theirs}` where {first.label} has `{ours}`" for ours, theirs in lines]
    return out


def nginx_configurations(servers: Mapping[str, Server]) -> list[str]:
    """The configuration section of the nginx servers of this run that wrote one."""
    configs = []
    for name in (NGINX_TUNED, NGINX_DEFAULT):
        server = servers.get(name)
        if server is not None and server.config is not None and server.config.exists():
            own = {str(server.config.parent): "PREFIX", f"{LOOPBACK}:{server.port};": "ADDRESS;"}
            configs.append(NginxConfig(SERVER_LABELS[name], server.config.read_text(), own))
    return configuration_section(configs)


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
    servers: Mapping[str, Server],
    args: argparse.Namespace,
    info: list[tuple[str, str]],
) -> str:
    """The native report: the heading, the table, its notes and nginx's configurations."""
    titles = {str(w.number): w.title for w in WORKLOADS}
    names = [n for n in SERVER_NAMES if n in servers]
    out = ["# filecache benchmark", ""] + heading(info)
    out += figure_table(ROWS, {str(w): per for w, per in results.items()}, names, titles)
    problems = []
    for w, per in sorted(results.items()):
        for n, run in per.items():
            if run.error:
                problems.append(f"- workload {w}, {n}: {run.errors} error(s): {run.error}")
    notes = [
        "",
        "Notes:",
        "- MB/s is 10^6 bytes of body per second, as read by the client; ratios are filecache / other.",
        "- `!` marks a figure measured with errors (listed below).",
        (
            "- nginx runs in two configurations (below): tuned (`open_file_cache max=10000`) is "
            "issue 13's anchor, default (`open_file_cache off`) the nginx issue 4 set its targets "
            "against; each issue's targets are judged against its own."
        ),
    ]
    if 5 in results:
        notes.append(
            "- Workload 5: each server, in each round, gets 10,000 files of its own, made just "
            "before and read once by the script right before the timed run: no server has seen "
            "them (nginx tuned's open_file_cache and filecache's cache are cold), but the OS page "
            "cache holds them; filecache is restarted first as well, so its memory cache is empty."
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
                cpu.append(f"{SERVER_LABELS[n]} {server:.0f}/{client:.0f}")
        if cpu:
            notes.append(
                f"- Workload {w}, CPU in % of one core, server (all processes) / load generator "
                "(per thread; near 100 would make it the limit): " + ", ".join(cpu) + "."
            )
    extras = []
    if 4 in results:
        for n, run in results[4].items():
            if "rss_before_mib" in run.raw:
                extras.append(f"{SERVER_LABELS[n]} {run.raw['rss_before_mib']:.0f} MiB")
        if extras:
            notes.append("- Workload 4, RSS before the 200 connections: " + ", ".join(extras) + ".")
    if 6 in results and FILECACHE in results[6] and "second_list_s" in results[6][FILECACHE].raw:
        notes.append(
            f"- Workload 6: a second LIST on the same daemon took "
            f"{results[6][FILECACHE].raw['second_list_s']:.3f} s."
        )
    if problems:
        notes += ["", "Errors:"] + problems
    configs = nginx_configurations(servers)
    if configs:
        notes += [""] + configs
    return "\n".join(out + notes) + "\n"
