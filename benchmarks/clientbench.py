#!/usr/bin/env python3
"""
The client benchmark (issue 11): one tree of 2,000 small files and two of
100 MiB, copied in the same run by (a) `filecache-client get -r`, (b) `rclone
copy` from `rclone serve http` and (c) `wget -r -np` from `python3 -m
http.server`, then (d) (a) and (b) again with nothing changed; every copy is
checked by SHA-256 against the share.

    python3 benchmarks/clientbench.py [--quick] [--rounds N] [--sweep] [--write]
    python3 benchmarks/run.py --client [...]            (the same)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# Run as a script, Python puts benchmarks/ on the path, not the checkout.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.console import BenchError, say
from benchmarks.dataset import WORK
from benchmarks.processes import LOOPBACK, Processes, run_with_servers
from benchmarks.report import code_state, heading, publish, run_info
from benchmarks.servers import (
    Server,
    filecache_argv,
    http_server_argv,
    installed_script,
    rclone_argv,
)

BEGIN = "<!-- client section: written by benchmarks/clientbench.py --write; the rest is kept -->"
END = "<!-- end of the client section -->"

TREE_VERSION = "filecache-client-bench tree v1"
TARGET_RATIO = 0.7
"""(a) at most this times (b)."""
TARGET_RERUN = 0.5
"""(d) for filecache, seconds."""


@dataclass(frozen=True)
class TreeShape:
    """The tree copied: C{small} files of 1 to 8 KiB over 3 levels, and two of C{big} bytes."""

    small: int
    big: int

    @property
    def name(self) -> str:
        return f"{self.small} small, 2 x {self.big >> 20} MiB"


FULL = TreeShape(2000, 100 << 20)
QUICK = TreeShape(200, 8 << 20)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"a smaller tree ({QUICK.name}) and one round: a smoke test")
    p.add_argument("--rounds", type=int, default=None, help="rounds, the tools taking turns (default 3; --quick 1)")
    p.add_argument("--sweep", action="store_true", help="also time (a) at -j 1, 2, 4 and 8")
    p.add_argument("--write", action="store_true", help="write the client section of benchmarks/results.md")
    args = p.parse_args(argv)
    args.shape = QUICK if args.quick else FULL
    args.rounds = args.rounds or (1 if args.quick else 3)
    # What machine_info expects of run.py's options.
    args.workers, args.filecache_help, args.daemon_arg = None, "", []
    args.duration, args.loadgen_threads = 0.0, None
    return args


def make_tree(root: Path, shape: TreeShape) -> Path:
    """C{root}/tree, made once per shape (a stamp says which) and reused."""
    stamp = root / "tree.stamp"
    spec = f"{TREE_VERSION} {shape.small} {shape.big}"
    tree = root / "tree"
    if stamp.exists() and stamp.read_text() == spec:
        return tree
    say(f"client tree: making {shape.name} files in {tree}...")
    stamp.unlink(missing_ok=True)
    shutil.rmtree(tree, ignore_errors=True)
    pick = random.Random(11)
    per_folder = max(shape.small // 100, 1)
    for n in range(shape.small):
        folder = tree / f"a{n // (per_folder * 10) % 10}" / f"b{n // per_folder % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"f{n:05d}.bin").write_bytes(os.urandom(pick.randint(1024, 8192)))
    chunk = os.urandom(1 << 20)
    for name in ("big1.bin", "big2.bin"):
        with open(tree / name, "wb") as f:
            f.writelines(i.to_bytes(8, "little") + name.encode() + chunk[8 + len(name) :] for i in range(shape.big >> 20))
    os.sync()
    stamp.write_text(spec)
    return tree


def digests(tree: Path) -> dict[str, str]:
    """SHA-256 of every regular file under C{tree} but dot-names, by relative path."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(tree):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith("."):
                continue
            path = Path(dirpath, name)
            hasher = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    hasher.update(chunk)
            found[str(path.relative_to(tree))] = hasher.hexdigest()
    return found


@dataclass
class Timing:
    """One tool's figures over the rounds."""

    copy: list[float] = field(default_factory=list)
    rerun: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def median(self, which: str) -> float | None:
        values: list[float] = getattr(self, which)
        return statistics.median(values) if values else None


def timed(argv: list[str], log: Path) -> float:
    """Run C{argv} (output to C{log}); its wall time in seconds, or BenchError if it failed."""
    started = time.monotonic()
    with open(log, "ab") as out:
        out.write(f"\n# {' '.join(argv)}\n".encode())
        out.flush()
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, check=False, timeout=600)
    seconds = time.monotonic() - started
    if done.returncode != 0:
        raise BenchError(f"{argv[0]} exited with status {done.returncode}; see {log}")
    return seconds


def verify(copy: Path, expected: dict[str, str]) -> None:
    got = digests(copy)
    if got != expected:
        missing = sorted(set(expected) - set(got))
        wrong = sorted(k for k in expected if k in got and got[k] != expected[k])
        extra = sorted(set(got) - set(expected))
        raise BenchError(f"{copy} differs from the share: {len(missing)} missing, {len(wrong)} wrong, {len(extra)} extra")


@dataclass
class Tool:
    """One way to copy the tree: the command for a fresh copy into a folder, and whether it re-runs."""

    label: str
    server: Server | None
    command: Callable[[Path, int], list[str]]
    reruns: bool


def tools(work: Path, logs: Path, tree: Path, args: argparse.Namespace) -> list[Tool]:
    client = installed_script("filecache-client")
    if client is None:
        raise BenchError("filecache-client not found: pip install -e . (in the repository)")
    fc = Server("filecache", "fc", lambda port: filecache_argv(port, tree.parent, args), logs / "filecache.log")
    found = [
        Tool(
            "(a) filecache-client get -r",
            fc,
            lambda dest, port: [client, LOOPBACK, str(port), "get", "-r", "tree", "-o", str(dest), "-q"],
            True,
        )
    ]
    rclone = shutil.which("rclone")
    if rclone is None:
        say("rclone not installed (apt-get install -y rclone): (b) is left out")
    else:
        (work / "rclone").mkdir(parents=True, exist_ok=True)
        (work / "rclone" / "rclone.conf").touch()
        rc = Server("rclone", "http", lambda port: rclone_argv(port, tree.parent, work), logs / "rclone.log")
        conf = str(work / "rclone" / "rclone.conf")
        found.append(
            Tool(
                "(b) rclone copy from rclone serve http",
                rc,
                lambda dest, port: [rclone, "copy", "--config", conf, "--http-url", f"http://{LOOPBACK}:{port}", ":http:tree", str(dest / "tree")],
                True,
            )
        )
    wget = shutil.which("wget")
    if wget is None:
        say("wget not installed (apt-get install -y wget): (c) is left out")
    else:
        hs = Server("http.server", "http", lambda port: http_server_argv(port, tree.parent), logs / "http.server.log")
        found.append(
            Tool(
                "(c) wget -r -np from python3 -m http.server",
                hs,
                lambda dest, port: [wget, "-q", "-r", "-np", "-nH", "--reject", "index.html*", "-P", str(dest), f"http://{LOOPBACK}:{port}/tree/"],
                False,
            )
        )
    return found


def measure(args: argparse.Namespace, procs: Processes, work: Path, logs: Path, tree: Path) -> tuple[list[Tool], dict[str, Timing], dict[int, Timing]]:
    expected = digests(tree)
    found = tools(work, logs, tree, args)
    for tool in found:
        assert tool.server is not None
        say(f"starting {tool.server.name}...")
        tool.server.start(procs)
    results = {tool.label: Timing() for tool in found}
    copies = work / "copies"
    for round_number in range(1, args.rounds + 1):
        for tool in found:
            assert tool.server is not None
            dest = copies / tool.server.name
            shutil.rmtree(dest, ignore_errors=True)
            dest.mkdir(parents=True)
            timing = results[tool.label]
            try:
                timing.copy.append(timed(tool.command(dest, tool.server.port), logs / "clients.log"))
                verify(dest / "tree", expected)
                if tool.reruns:
                    timing.rerun.append(timed(tool.command(dest, tool.server.port), logs / "clients.log"))
                    verify(dest / "tree", expected)
            except (BenchError, subprocess.TimeoutExpired) as e:
                timing.errors.append(str(e))
            copy = f"{timing.copy[-1]:.2f} s" if timing.copy else "failed"
            say(f"[round {round_number}] {tool.label}: {copy}" + (f", re-run {timing.rerun[-1]:.2f} s" if tool.reruns and timing.rerun else ""))
    sweep: dict[int, Timing] = {}
    fc = found[0]
    assert fc.server is not None
    for jobs in (1, 2, 4, 8) if args.sweep else ():
        sweep[jobs] = Timing()
        for _ in range(args.rounds):
            dest = copies / "sweep"
            shutil.rmtree(dest, ignore_errors=True)
            sweep[jobs].copy.append(timed(fc.command(dest, fc.server.port) + ["-j", str(jobs)], logs / "clients.log"))
            verify(dest / "tree", expected)
        say(f"[sweep] -j {jobs}: {sweep[jobs].median('copy'):.2f} s")
    return found, results, sweep


def render(args: argparse.Namespace, info: list[tuple[str, str]], found: list[Tool], results: dict[str, Timing], sweep: dict[int, Timing]) -> str:
    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    out = [BEGIN, "## Client (issue 11)", ""]
    if args.quick or args.rounds < 3:
        out += [f"**A short run** ({args.shape.name} files, {args.rounds} round(s)): a smoke test of the harness, not figures to quote.", ""]
    out += heading(info)[:-3] + [f"- tree: {args.shape.name} files (1 to 8 KiB, 3 levels)", f"- rounds: {args.rounds} (median shown)", ""]
    out += ["Command: `python3 benchmarks/clientbench.py " + " ".join(sys.argv[1:]) + "`", ""]
    out += ["| tool | copy s | re-run s (nothing changed) | copy identical to the share (SHA-256) |", "|---|---|---|---|"]
    for tool in found:
        t = results[tool.label]
        checked = "yes" if not t.errors else "**no**: " + t.errors[0]
        out.append(f"| {tool.label} | {cell(t.median('copy'))} | {cell(t.median('rerun')) if tool.reruns else 'n/a'} | {checked} |")
    fc = results[found[0].label]
    rc = next((results[t.label] for t in found if t.label.startswith("(b)")), None)
    a, b = fc.median("copy"), rc.median("copy") if rc else None
    d = fc.median("rerun")
    out += ["", "| target (issue 11) | figure | met |", "|---|---|---|"]
    if a is not None and b:
        out.append(f"| (a) <= {TARGET_RATIO} x (b) | {a / b:.2f} x | {'yes' if a / b <= TARGET_RATIO else '**no**'} |")
        if rc is not None and len(fc.copy) == len(rc.copy) > 1:
            # The medians may come from different rounds: the same round's ratios show the spread.
            rounds = ", ".join(f"{x / y:.2f}" for x, y in zip(fc.copy, rc.copy))
            out.append(f"| (a) / (b), round by round | {rounds} | (the spread) |")
    else:
        out.append(f"| (a) <= {TARGET_RATIO} x (b) | - | ? |")
    if d is not None:
        out.append(f"| (d) filecache re-run <= {TARGET_RERUN} s | {d:.2f} s | {'yes' if d <= TARGET_RERUN else '**no**'} |")
    rerun_b = rc.median("rerun") if rc else None
    if rerun_b and d is not None:
        out.append(f"| (d) filecache / rclone re-run | {d / rerun_b:.2f} x | (no target) |")
    if sweep:
        out += ["", "(a) by number of connections:", "", "| -j | copy s |", "|---|---|"]
        out += [f"| {jobs} | {cell(t.median('copy'))} |" for jobs, t in sweep.items()]
    out += [
        "",
        (
            "Notes: each copy starts from an empty folder; the re-run copies again into the full one. "
            "filecache-client checks every file against the server's SHA-256 (HASH for a skipped one); "
            "rclone, serving and copying over HTTP, compares sizes and times only. After every run the "
            "harness hashes the copy and compares it with the share."
        ),
        END,
    ]
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    work = WORK / "client"
    logs = work / "logs"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)

    def body(procs: Processes) -> int:
        tree = make_tree(work / ("quick" if args.quick else "full"), args.shape)
        code = code_state()
        found, results, sweep = measure(args, procs, work, logs, tree)
        info = run_info(code)
        info.append(("rclone", subprocess.run(["rclone", "version"], capture_output=True, text=True, check=False).stdout.split("\n")[0] if shutil.which("rclone") else "not installed"))
        publish(render(args, info, found, results, sweep), args.write, BEGIN, END)
        return 0

    return run_with_servers(body)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
