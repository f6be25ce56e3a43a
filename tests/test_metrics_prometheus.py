"""
The metrics with real processes: a real Prometheus server (Debian's
C{prometheus}) scrapes a C{--workers 2} daemon and agrees with the requests
made; C{promtool check metrics} accepts what it serves; a scrape on the main
port answered by either process reports both.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Daemon, DaemonFactory, RawClient, free_port, wait_for
from httpkit import fetch
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.skipif(
    shutil.which("prometheus") is None or shutil.which("promtool") is None,
    reason="prometheus and promtool are not installed (apt-get install prometheus)",
)


def worker_pid(daemon: Daemon) -> int:
    wait_for(lambda: "worker 1: [-] FileCacheFactory starting on" in daemon.log_text(), 20, "the worker")
    return int(re.findall(r"started worker 1 \(pid (\d+)\)", daemon.log_text())[0])


def requests_served_by_each(daemon: Daemon, worker: int) -> int:
    """Ten native GETs answered by the worker (the parent stopped), ten HTTP GETs by the parent; how many were made."""
    made = 0
    for stopped in (daemon.pid, worker):
        os.kill(stopped, signal.SIGSTOP)
        try:
            for _ in range(10):
                if stopped == daemon.pid:
                    client = RawClient(daemon.port)
                    assert client.get(b"a.txt")[1] == b"served by both"
                    client.close()
                else:
                    assert fetch(daemon.port, "/a.txt").body == b"served by both"
                made += 1
        finally:
            os.kill(stopped, signal.SIGCONT)
    return made


def get(url: str, timeout: float = 5) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        body: bytes = response.read()
        return body


def samples_of(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def requests_total(text: str) -> float:
    return sum(v for (name, _), v in samples_of(text).items() if name == "filecache_requests_total")


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[tuple[int, int]]:
    """A port for the daemon's --metrics, and a Prometheus server scraping it every second (stopped by its PID)."""
    metrics_port, web_port = free_port(), free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n"
        "  scrape_interval: 1s\n"
        "  scrape_timeout: 1s\n"
        "scrape_configs:\n"
        "  - job_name: filecache\n"
        "    static_configs:\n"
        f"      - targets: ['127.0.0.1:{metrics_port}']\n"
    )
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{web_port}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:

        def ready() -> bool:
            assert process.poll() is None, log.read_text(errors="replace")
            try:
                return get(f"http://127.0.0.1:{web_port}/-/ready", 1).startswith(b"Prometheus")
            except OSError:
                return False

        wait_for(ready, 30, "prometheus to be ready")
        yield metrics_port, web_port
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def query(web_port: int, expression: str) -> list[dict[str, object]]:
    url = f"http://127.0.0.1:{web_port}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
    answer = json.loads(get(url))
    assert answer["status"] == "success", answer
    result: list[dict[str, object]] = answer["data"]["result"]
    return result


def test_prometheus_scrapes_a_daemon_with_two_workers(
    shared: Path, daemon_factory: DaemonFactory, prometheus: tuple[int, int]
) -> None:
    """
    Prometheus scrapes --metrics tcp:PORT of a --workers 2 daemon once a
    second; with requests answered by each process, its API's
    sum(filecache_requests_total) is the number the test made, both
    processes are reported, promtool accepts the scrape, and the snapshot
    folder is gone once the daemon has stopped.
    """
    metrics_port, web_port = prometheus
    (shared / "a.txt").write_bytes(b"served by both")
    daemon = daemon_factory(
        shared, "--workers", "2", "--metrics", f"tcp:{metrics_port}:interface=127.0.0.1"
    )
    worker = worker_pid(daemon)
    folder = re.findall(r"metrics snapshots of the workers in (\S+)", daemon.log_text())[0]
    assert os.path.isdir(folder)
    made = requests_served_by_each(daemon, worker)

    def counted() -> bool:
        result = query(web_port, "sum(filecache_requests_total)")
        return bool(result) and float(result[0]["value"][1]) == made  # type: ignore[index]

    took = wait_for(counted, 30, f"Prometheus to count {made} requests")
    print(f"Prometheus counted the {made} requests {took:.1f} s after the last one")
    processes = query(web_port, "filecache_processes")
    assert float(processes[0]["value"][1]) == 2  # type: ignore[index]
    by_protocol = {
        r["metric"]["protocol"]: float(r["value"][1])  # type: ignore[index]
        for r in query(web_port, "sum by (protocol) (filecache_requests_total)")
    }
    assert by_protocol == {"native": 10, "http": 10}
    hits = query(web_port, "sum(filecache_cache_hits_total)")
    assert float(hits[0]["value"][1]) == 18  # type: ignore[index]  # the first GET in each process is a miss

    scraped = get(f"http://127.0.0.1:{metrics_port}/metrics")
    check = subprocess.run(
        ["promtool", "check", "metrics"], input=scraped, capture_output=True, timeout=30, check=False
    )
    assert check.returncode == 0, check.stdout + check.stderr
    samples = samples_of(scraped.decode())
    assert {labels for name, labels in samples if name == "process_resident_memory_bytes"} == {
        (("pid", str(daemon.pid)),),
        (("pid", str(worker)),),
    }
    assert b"a.txt" not in scraped
    # Not on the main port when --metrics has a listener of its own: the file lookup answers.
    assert fetch(daemon.port, "/metrics").status == 404
    assert daemon.stop() == 0
    assert not os.path.exists(folder)


def test_a_main_port_scrape_reports_both_processes(shared: Path, daemon_factory: DaemonFactory) -> None:
    """
    With --workers 2 and no --metrics, GET /metrics on the main port
    answered by the worker (the parent stopped) counts the parent's
    requests too, from its snapshot.
    """
    (shared / "a.txt").write_bytes(b"served by both")
    daemon = daemon_factory(shared, "--workers", "2")
    worker = worker_pid(daemon)
    made = requests_served_by_each(daemon, worker)
    time.sleep(1.5)  # every process has written a snapshot since
    os.kill(daemon.pid, signal.SIGSTOP)
    try:
        response = fetch(daemon.port, "/metrics")
    finally:
        os.kill(daemon.pid, signal.SIGCONT)
    assert response.status == 200
    text = response.body.decode()
    assert requests_total(text) == made
    samples = samples_of(text)
    assert samples[("filecache_processes", ())] == 2
    assert samples[("filecache_connections_total", ())] == made + 1  # the scrape's own


def test_the_example_alert_rules_pass_promtool() -> None:
    """deploy/prometheus-alerts.yml (quoted in docs/operations.md) is valid for promtool, with its three rules."""
    rules = Path(__file__).parent.parent / "deploy" / "prometheus-alerts.yml"
    check = subprocess.run(
        ["promtool", "check", "rules", str(rules)], capture_output=True, timeout=30, check=False
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert b"SUCCESS: 3 rules found" in check.stdout
