"""
What a process tree uses, read from /proc: its processes, their CPU time and
resident memory, and RssSampler, which samples the peak on a thread.
"""

from __future__ import annotations

import os
import threading
import time
from typing import final


def status_kib(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(key.encode() + b":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def proc_stat_fields(pid: int) -> list[bytes]:
    """The fields of /proc/PID/stat after "pid (comm)", or [] if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return []
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
    return stat[stat.rfind(b")") + 2 :].split()


def process_tree(root: int) -> list[int]:
    """root and all its descendants, from the ppid field of /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = proc_stat_fields(int(entry))
        if fields:
            children.setdefault(int(fields[1]), []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time used so far by these processes."""
    total = 0
    for pid in pids:
        fields = proc_stat_fields(pid)
        if fields:
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def rss_mib(pids: list[int]) -> float:
    return sum(status_kib(pid, "VmRSS") for pid in pids) / 1024


@final
class RssSampler:
    """
    Samples the resident memory of a process and its children (summed) every
    ~50 ms on a thread, while in a C{with} block.  The tree is re-read every
    second; the samples themselves read one small /proc file per process.
    """

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_mib = 0.0
        self.before_mib = 0.0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self.before_mib = rss_mib(process_tree(self.pid))
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        pids = process_tree(self.pid)
        refreshed = time.monotonic()
        while True:
            if time.monotonic() - refreshed > 1.0:
                pids = process_tree(self.pid)
                refreshed = time.monotonic()
            self.peak_mib = max(self.peak_mib, rss_mib(pids))
            self.samples += 1
            if self._stop.wait(self.interval):
                break
        self.peak_mib = max(self.peak_mib, rss_mib(process_tree(self.pid)))
