"""
--workers: the parent listens, worker processes adopt its socket and serve
beside it; a dead worker is replaced; SIGTERM stops them all.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

from conftest import DaemonFactory, RawClient, stats, wait_for


def worker_pids(log: str) -> list[int]:
    return [int(pid) for pid in re.findall(r"started worker \d+ \(pid (\d+)\)", log)]




def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is not alive either.
    return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()


def test_workers_share_the_port(shared: Path, daemon_factory: DaemonFactory) -> None:
    """
    With --workers 2 both processes accept on the one port: with the parent
    stopped (SIGSTOP) the worker serves every connection, and with the worker
    stopped the parent does.
    """
    (shared / "a.txt").write_bytes(b"shared by all")
    daemon = daemon_factory(shared, "--workers", "2")
    wait_for(lambda: "worker 1: [-] FileCacheFactory starting on" in daemon.log_text(), 20, "the worker")
    worker = worker_pids(daemon.log_text())[0]
    for stopped in (daemon.pid, worker):
        os.kill(stopped, signal.SIGSTOP)
        try:
            for _ in range(10):
                client = RawClient(daemon.port)
                assert client.get(b"a.txt")[1] == b"shared by all"
                client.close()
        finally:
            os.kill(stopped, signal.SIGCONT)

    def served() -> tuple[int, int]:
        """GETs logged by the worker and by the parent (a worker's lines reach the log through the parent)."""
        log = daemon.log_text()
        by_worker = len(re.findall(r"worker 1: \[filecache\.daemon\.native\.FileCacheProtocol#info\] .* GET a\.txt OK", log))
        return by_worker, len(re.findall(r"\] 127\.0\.0\.1:\d+ GET a\.txt OK", log)) - by_worker

    wait_for(lambda: sum(served()) >= 20, 10, "the 20 access lines")
    assert served() == (10, 10)


def test_stats_says_which_worker_answered(shared: Path, daemon_factory: DaemonFactory) -> None:
    """
    With --workers 2, STATS names the process that answered: worker 0 is
    the parent, worker 1 the child, each with its own pid (issue 8, item 15).
    """
    daemon = daemon_factory(shared, "--workers", "2")
    wait_for(lambda: "worker 1: [-] FileCacheFactory starting on" in daemon.log_text(), 20, "the worker")
    worker = worker_pids(daemon.log_text())[0]
    seen = {}
    for stopped, answering in ((daemon.pid, worker), (worker, daemon.pid)):
        os.kill(stopped, signal.SIGSTOP)
        try:
            figures = stats(daemon.port)
        finally:
            os.kill(stopped, signal.SIGCONT)
        assert figures["pid"] == answering
        seen[figures["worker"]] = figures["pid"]
        assert figures["uptime_seconds"] >= 0
    assert seen == {0: daemon.pid, 1: worker}


def test_dead_worker_is_replaced_and_sigterm_stops_all(shared: Path, daemon_factory: DaemonFactory) -> None:
    """A killed worker is started again; SIGTERM to the parent stops every process with status 0."""
    (shared / "a.txt").write_bytes(b"a")
    daemon = daemon_factory(shared, "--workers", "2")
    wait_for(lambda: worker_pids(daemon.log_text()), 20, "the worker")
    first = worker_pids(daemon.log_text())[0]
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: len(worker_pids(daemon.log_text())) == 2, 20, "a new worker")
    second = worker_pids(daemon.log_text())[1]
    assert second != first and alive(second)
    assert "worker 1 ended unexpectedly" in daemon.log_text()
    for _ in range(10):
        client = RawClient(daemon.port)
        assert client.get(b"a.txt")[1] == b"a"
        client.close()
    assert daemon.stop() == 0
    wait_for(lambda: not alive(second), 10, "the worker to stop")


def test_workers_auto_and_bad_values(tmp_path: Path) -> None:
    """--workers auto means one per core; 0 and ssl: ports are refused with one line."""
    import subprocess

    from conftest import tool

    for args, message in [
        (["--workers", "0"], "filecache: --workers must be at least 1"),
        (["--workers", "x"], "filecache: --workers: not a number: 'x'"),
        (["--workers", "2", "--port", "ssl:5443:privateKey=k.pem"], "filecache: --workers with an ssl: port is not supported"),
    ]:
        result = subprocess.run(
            [tool("twistd"), "-n", "--pidfile=", "filecache", "--dir", str(tmp_path), *args],
            check=False, capture_output=True, text=True, timeout=60,
        )
        assert result.returncode == 1
        assert result.stderr.startswith(message), result.stderr
    from filecache.daemon.tap import Options

    options = Options()
    options.parseOptions(["--dir", str(tmp_path), "--workers", "auto"])
    assert options.config.workers == os.cpu_count()


def test_workers_stop_when_the_parent_is_killed(shared: Path, daemon_factory: DaemonFactory) -> None:
    """
    A worker whose parent died (SIGKILL, no chance to stop it) stops by
    itself, and removes the metrics snapshot folder its parent could not.
    """
    daemon = daemon_factory(shared, "--workers", "2")
    wait_for(lambda: worker_pids(daemon.log_text()), 20, "the worker")
    worker = worker_pids(daemon.log_text())[0]
    folder = Path(re.findall(r"metrics snapshots of the workers in (\S+)", daemon.log_text())[0])
    wait_for(lambda: (folder / f"{worker}.json").exists(), 20, "the worker's snapshot")
    daemon.stop(signal.SIGKILL)
    wait_for(lambda: not alive(worker), 15, "the orphaned worker to stop")
    wait_for(lambda: not folder.exists(), 5, "the snapshot folder to be removed")


def test_workers_read_the_proxy_header_on_a_proxy_port(shared: Path, daemon_factory: DaemonFactory) -> None:
    """
    --workers 2 on a haproxy: port: the worker wraps the socket it adopts as
    the parent's endpoint does, so each process reads the PROXY header and
    logs the client's address from it.
    """
    (shared / "a.txt").write_bytes(b"behind a proxy")
    daemon = daemon_factory(shared, "--workers", "2", port="haproxy:tcp:0:interface=127.0.0.1")
    wait_for(lambda: "worker 1: [-] FileCacheFactory (PROXY) starting on" in daemon.log_text(), 20, "the worker")
    worker = worker_pids(daemon.log_text())[0]
    for stopped, client_address in ((daemon.pid, "192.0.2.1"), (worker, "192.0.2.2")):
        os.kill(stopped, signal.SIGSTOP)
        try:
            client = RawClient(daemon.port)
            client.send(f"PROXY TCP4 {client_address} 127.0.0.1 4000 5000\r\n".encode())
            assert client.get(b"a.txt")[1] == b"behind a proxy"
            client.close()
        finally:
            os.kill(stopped, signal.SIGCONT)
    wait_for(lambda: "192.0.2.2:4000 GET a.txt OK" in daemon.log_text(), 10, "the parent's access line")
    assert re.search(r"worker 1: .* 192\.0\.2\.1:4000 GET a\.txt OK", daemon.log_text())


def test_workers_run_the_parents_cache_policy(shared: Path, daemon_factory: DaemonFactory) -> None:
    """
    With --workers 2 --cache-policy s3fifo, both processes build an S3-FIFO
    cache: STATS from each (the other one stopped) says cache_policy s3fifo.
    """
    daemon = daemon_factory(shared, "--workers", "2", "--cache-policy", "s3fifo")
    wait_for(lambda: "worker 1: [-] FileCacheFactory starting on" in daemon.log_text(), 20, "the worker")
    worker = worker_pids(daemon.log_text())[0]
    seen = {}
    for stopped in (daemon.pid, worker):
        os.kill(stopped, signal.SIGSTOP)
        try:
            client = RawClient(daemon.port)
            _, rows = client.rows(b"STATS")
            client.close()
        finally:
            os.kill(stopped, signal.SIGCONT)
        figures = dict(row.decode().strip().split(" ", 1) for row in rows)
        seen[int(figures["pid"])] = figures["cache_policy"]
    assert seen == {daemon.pid: "s3fifo", worker: "s3fifo"}
