"""
The processes the harness starts: each leads its own process group, is stopped by
signalling that group, and is watched without being reaped until then.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.console import BenchError, say

LOOPBACK = "127.0.0.1"


class Processes:
    """
    Every process this script starts, each the leader of its own process
    group (start_new_session), so that stopping one stops its children too.
    Only these groups are ever signalled: never anything found by name.
    """

    def __init__(self) -> None:
        self._live: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], log: Path | None = None, **kw: Any) -> subprocess.Popen[bytes]:
        if log is None:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True, **kw)
        else:
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "ab") as out:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    **kw,
                )
        self._live.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
        """
        SIGTERM to the process group, SIGKILL after C{grace} seconds, then
        SIGKILL to whatever is left of the group, and only then reap the
        leader: until it is reaped its pid (the group id) cannot be reused,
        so no other process can be signalled by mistake.
        """
        if proc not in self._live:
            return
        try:
            if proc.returncode is None:  # not reaped: the group id is still ours
                _signal_group(proc.pid, signal.SIGTERM)
                if not wait_exit(proc, grace):
                    say(f"  pid {proc.pid} ignored SIGTERM for {grace:.0f} s: SIGKILL")
                    _signal_group(proc.pid, signal.SIGKILL)
                    wait_exit(proc, 5)
                _signal_group(proc.pid, signal.SIGKILL)  # children that outlived it
                proc.wait(5)
        finally:
            self._live.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self._live)):
            try:
                self.stop(proc, grace=5.0)
            except Exception as e:  # noqa: BLE001 -- keep stopping the others
                say(f"  could not stop pid {proc.pid}: {e}")


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_with_servers(body: Callable[[Processes], int]) -> int:
    """
    A benchmark's main: C{body(procs)} returns the exit status; whatever it
    started in C{procs} is stopped however it ends.  Ctrl-C, SIGTERM and
    SIGHUP stop it (even when started with SIGINT ignored, e.g. "&" in a
    script), with status 130; a L{BenchError} is said, with status 1.
    """
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)
    procs = Processes()
    try:
        return body(procs)
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


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def exit_status(proc: subprocess.Popen[bytes]) -> int | None:
    """
    The exit status if the process has ended, else None, without reaping it
    (Popen.poll would reap it and free its pid for reuse).
    """
    if proc.returncode is not None:
        return proc.returncode
    try:
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return -1
    if info is None or info.si_pid == 0:
        return None
    return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status


def wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Wait up to C{timeout} seconds for the process to end, without reaping it."""
    deadline = time.monotonic() + timeout
    while exit_status(proc) is None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def wait_listening(
    proc: subprocess.Popen[bytes], port: int, name: str, log: Path, timeout: float = 30
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = exit_status(proc)
        if status is not None:
            raise BenchError(f"{name} exited with status {status} at start:\n{tail(log)}")
        try:
            with socket.create_connection((LOOPBACK, port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise BenchError(
        f"{name} did not listen on {LOOPBACK}:{port} within {timeout:.0f} s:\n{tail(log)}"
    )


def tail(log: Path, lines: int = 8) -> str:
    try:
        text = log.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("    " + line for line in text[-lines:])
