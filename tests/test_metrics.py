"""
In-memory tests of the Prometheus metrics (docs/operations.md, "Metrics"):
what a scrape says after known requests, that it agrees with STATS, the
refusals, the duration histogram, and the sum over workers' snapshots.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from filecache import __version__
from filecache.daemon.admission import Refusal
from filecache.daemon.cache import FifoCache
from filecache.daemon.folder import SharedFolder
from filecache.daemon.metrics import (
    CONTENT_TYPE_LATEST,
    DURATION_BUCKETS,
    STALE_AFTER,
    DaemonMetrics,
    Figures,
    SnapshotFolder,
    SnapshotService,
    outcome,
)
from filecache.daemon.native import FileCacheFactory
from filecache.daemon.responder import Responder
from filecache.daemon.tap import Options

PEER = IPv4Address("TCP", "10.0.0.9", 40000)
SMALL = b"hello, world\n"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "hello.txt").write_bytes(SMALL)
    (shared / "other.txt").write_bytes(b"x" * 1000)
    (shared / "metrics").write_bytes(b"a shared file named metrics")
    return shared


def make(root: Path, clock: Clock | None = None, metrics: bool = True, **kwargs: Any) -> FileCacheFactory:
    clock = clock or Clock()
    settle = kwargs.pop("settle", 0)
    responder = Responder(SharedFolder(str(root)), FifoCache(1 << 20), reactor=clock, settle=settle)
    factory = FileCacheFactory(responder, clock=clock, access_log=False, **kwargs)
    if metrics:
        factory.metrics = DaemonMetrics(responder, factory.admission, factory.replies, clock=clock)
    return factory


def connect(factory: FileCacheFactory, peer: IPv4Address = PEER) -> tuple[Any, StringTransport]:
    proto = factory.buildProtocol(peer)
    transport = StringTransport(peerAddress=peer)
    assert proto is not None
    proto.makeConnection(transport)
    return proto, transport


def ask(factory: FileCacheFactory, data: bytes) -> bytes:
    """Send C{data} on a new connection; what came back."""
    proto, transport = connect(factory)
    proto.dataReceived(data)
    out: bytes = transport.value()
    proto.connectionLost(None)
    return out


def http_get(target: str) -> bytes:
    return f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode()


def scrape(factory: FileCacheFactory) -> tuple[str, Samples]:
    """GET /metrics over HTTP on the factory's port: the body, and its samples by name and labels."""
    out = ask(factory, http_get("/metrics"))
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    assert b"Content-Type: " + CONTENT_TYPE_LATEST.encode() + b"\r\n" in head
    return body.decode(), samples_of(body.decode())


def samples_of(text: str) -> Samples:
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def stats_of(factory: FileCacheFactory) -> dict[str, str]:
    out = ask(factory, b"STATS\r\n").decode()
    rows = out.split("\r\n")[1:-1]
    return dict(row.split(" ", 1) for row in rows)


def requests(samples: Samples, protocol: str, result: str) -> float:
    return samples.get(("filecache_requests_total", (("outcome", result), ("protocol", protocol))), 0)


def known_requests(factory: FileCacheFactory) -> None:
    """Two native GETs (a miss, then a hit), a native not-found, two HTTP GETs of one file, an HTTP 404."""
    ask(factory, b"GET other.txt 0\r\n")
    ask(factory, b"GET other.txt 0\r\n")
    ask(factory, b"GET nope 0\r\n")
    proto, _transport = connect(factory)
    proto.dataReceived(http_get("/hello.txt"))
    proto.dataReceived(http_get("/hello.txt"))  # the kept response, on the fast path
    proto.connectionLost(None)
    ask(factory, http_get("/missing"))


def test_scrape_counts_known_requests(root: Path) -> None:
    """After known requests, the requests by protocol and outcome, cache figures and bytes are exact."""
    factory = make(root)
    known_requests(factory)
    text, samples = scrape(factory)
    assert requests(samples, "native", "ok") == 2
    assert requests(samples, "native", "not_found") == 1
    assert requests(samples, "http", "ok") == 2
    assert requests(samples, "http", "not_found") == 1
    assert samples[("filecache_cache_hits_total", ())] == 2  # the native hit and the HTTP hit
    assert samples[("filecache_response_body_bytes_total", ())] == 2000 + 2 * len(SMALL)
    assert samples[("filecache_cache_entries", ())] == 2
    assert samples[("filecache_cache_bytes", ())] == 1000 + len(SMALL)
    assert samples[("filecache_cache_capacity_bytes", ())] == 1 << 20
    assert samples[("filecache_connections_total", ())] == 6  # the scrape's own included
    assert samples[("filecache_connections_active", ())] == 1  # the scrape's own
    assert samples[("filecache_request_duration_seconds_count", ())] == 6
    assert samples[("filecache_build_info", (("version", __version__),))] == 1
    assert samples[("filecache_processes", ())] == 1
    assert ("process_cpu_seconds_total", ()) in samples
    assert "/hello.txt" not in text and "other.txt" not in text and "nope" not in text


def test_scrape_agrees_with_stats(root: Path) -> None:
    """Every figure STATS and a scrape both have is the same number in both."""
    factory = make(root)
    known_requests(factory)
    stats = stats_of(factory)
    _, samples = scrape(factory)
    total = sum(v for (name, _), v in samples.items() if name == "filecache_requests_total")
    # STATS counts itself; the scrape is not in its own figures (it has not ended).
    assert total == int(stats["requests"])
    http = sum(v for (name, labels), v in samples.items() if name == "filecache_requests_total" and ("protocol", "http") in labels)
    assert http == int(stats["http_requests"])
    pairs = {
        "hits": "filecache_cache_hits_total",
        "misses": "filecache_cache_misses_total",
        "evictions": "filecache_cache_evictions_total",
        "bytes_sent": "filecache_response_body_bytes_total",
        "cache_bytes": "filecache_cache_bytes",
        "cache_files": "filecache_cache_entries",
        "cache_capacity": "filecache_cache_capacity_bytes",
    }
    for row, name in pairs.items():
        assert samples[(name, ())] == int(stats[row]), row
    # STATS was asked on a connection of its own, now closed; the scrape's is one more.
    assert samples[("filecache_connections_total", ())] == int(stats["connections_total"]) + 1
    assert samples[("filecache_connections_active", ())] == int(stats["connections_active"])


def test_quit_and_malformed_requests_are_counted(root: Path) -> None:
    """QUIT and a request line that cannot be parsed count, so the outcomes add up to STATS requests."""
    factory = make(root)
    ask(factory, b"QUIT\r\n")
    ask(factory, b"BOGUS\r\n")
    ask(factory, b"GET /x HTTP/1.1\r\nBad header line\r\n\r\n")
    stats = stats_of(factory)
    _, samples = scrape(factory)
    assert requests(samples, "native", "ok") == 2  # QUIT, STATS
    assert requests(samples, "native", "bad_request") == 1
    assert requests(samples, "http", "bad_request") == 1
    total = sum(v for (name, _), v in samples.items() if name == "filecache_requests_total")
    assert total == int(stats["requests"])


def test_a_client_that_leaves_before_its_reply_is_gone(root: Path) -> None:
    """A request whose client hangs up while its file is read is counted as outcome gone."""
    clock = Clock()
    factory = make(root, clock, settle=10)
    os.utime(root / "hello.txt")  # changed just now: read again after settle seconds
    proto, transport = connect(factory)
    proto.dataReceived(http_get("/hello.txt"))
    assert transport.value() == b""
    proto.connectionLost(None)
    _, samples = scrape(factory)
    assert requests(samples, "http", "gone") == 1


def test_duration_histogram(root: Path) -> None:
    """A reply that took 0.3 s of the clock lands in the 0.5 s bucket and not in the 0.25 s one."""
    clock = Clock()
    factory = make(root, clock, settle=0.3)
    os.utime(root / "hello.txt")
    proto, transport = connect(factory)
    proto.dataReceived(b"GET hello.txt 0\r\n")
    clock.advance(0.3)
    assert transport.value().startswith(b"OK ")
    proto.connectionLost(None)
    _, samples = scrape(factory)
    bucket = "filecache_request_duration_seconds_bucket"
    assert samples[(bucket, (("le", "0.25"),))] == 0
    assert samples[(bucket, (("le", "0.5"),))] == 1
    assert samples[(bucket, (("le", "+Inf"),))] == 1
    assert samples[("filecache_request_duration_seconds_sum", ())] == pytest.approx(0.3, abs=0.01)
    assert len([k for k in samples if k[0] == bucket]) == len(DURATION_BUCKETS) + 1


def test_refusals_by_reason(root: Path) -> None:
    """Connections refused by the allow-list and by each limit are counted under their reason."""
    from filecache.daemon.admission import parse_allow

    factory = make(root, max_connections=3, max_per_ip=1, allow=parse_allow("10.0.0.0/8"))
    assert factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", 1)) is None
    _held, _ = connect(factory)
    assert isinstance(factory.buildProtocol(PEER), Refusal)
    connect(factory, IPv4Address("TCP", "10.0.0.10", 1))
    connect(factory, IPv4Address("TCP", "10.0.0.11", 1))
    assert isinstance(factory.buildProtocol(IPv4Address("TCP", "10.0.0.12", 1)), Refusal)
    assert factory.metrics is not None
    samples = samples_of(factory.metrics.exposition().decode())
    refusal = "filecache_refusals_total"
    assert samples[(refusal, (("reason", "not_allowed"),))] == 1
    assert samples[(refusal, (("reason", "too_many_per_address"),))] == 1
    assert samples[(refusal, (("reason", "too_many_connections"),))] == 1
    assert samples[(refusal, (("reason", "untrusted_proxy"),))] == 0  # there from the start


def test_proxy_refusals_by_reason(root: Path) -> None:
    """On a PROXY port, a peer that is not a --trusted-proxy and a connection without a header are counted."""
    from filecache.daemon.admission import parse_allow

    factory = make(root, trusted_proxies=parse_allow("10.0.0.1"))
    proxied = factory.behind_proxy()
    closer = proxied.buildProtocol(IPv4Address("TCP", "192.0.2.7", 1))
    assert type(closer).__name__ == "_Closer"
    factory.admission.bad_proxy_header("10.0.0.1")
    assert factory.metrics is not None
    samples = samples_of(factory.metrics.exposition().decode())
    assert samples[("filecache_refusals_total", (("reason", "untrusted_proxy"),))] == 1
    assert samples[("filecache_refusals_total", (("reason", "bad_proxy_header"),))] == 1


@pytest.mark.parametrize(
    ("http", "status", "expected"),
    [
        (False, "OK", "ok"),
        (False, "ERR not-found", "not_found"),
        (False, "ERR unavailable", "unavailable"),
        (False, "ERR bad-request", "bad_request"),
        (False, "ERR too-long", "bad_request"),
        (False, "cut", "cut"),
        (True, "200", "ok"),
        (True, "206", "ok"),
        (True, "304", "ok"),
        (True, "301", "ok"),
        (True, "404", "not_found"),
        (True, "416", "bad_request"),
        (True, "503", "unavailable"),
        (True, "500", "error"),
        (True, "200-cut", "cut"),
        (True, "200-changed", "cut"),
        (True, "gone", "gone"),
    ],
)
def test_outcome_of_status(http: bool, status: str, expected: str) -> None:
    """Each reply status the access log writes maps to one outcome label."""
    assert outcome(http, status) == expected


def test_metrics_shadow_a_file_named_metrics(root: Path) -> None:
    """With metrics on, /metrics is the metrics; with them off, it is the shared file of that name."""
    body, _ = scrape(make(root))
    assert "filecache_requests_total" in body
    out = ask(make(root, metrics=False), http_get("/metrics"))
    assert out.endswith(b"a shared file named metrics")


def test_head_and_post_on_metrics(root: Path) -> None:
    """HEAD /metrics has the head and no body; POST is refused with 405."""
    factory = make(root)
    out = ask(factory, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200 ") and out.endswith(b"\r\n\r\n")
    out = ask(factory, b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 405 ")


def test_names_follow_conventions(root: Path) -> None:
    """Every family has the filecache_ prefix (or is the process collector's), counters end in _total, no path label."""
    factory = make(root)
    known_requests(factory)
    body, _ = scrape(factory)
    for family in text_string_to_metric_families(body):
        assert family.name.startswith(("filecache_", "process_")), family.name
        for sample in family.samples:
            assert "path" not in sample.labels
            if family.type == "counter":
                assert sample.name.endswith(("_total", "_created")), sample.name


def _other_process(root: Path, pid: int, written: float, ended: bool = False) -> Figures:
    figures = make(root, metrics=True)
    assert figures.metrics is not None
    ask(figures, b"GET hello.txt 0\r\n")
    snapshot = figures.metrics.figures()
    snapshot.pid, snapshot.written, snapshot.ended = pid, written, ended
    snapshot.process = [("process_open_fds", "gauge", "Open fds.", "process_open_fds", 7.0)]
    return snapshot


def test_workers_snapshots_are_summed(root: Path, tmp_path: Path) -> None:
    """A scrape adds the other processes' snapshots: counters of all, gauges and process figures of the live ones only."""
    folder = tmp_path / "snapshots"
    folder.mkdir()
    snapshots = SnapshotFolder(str(folder))
    clock = Clock()
    clock.advance(1000)
    snapshots.write(_other_process(root, 111, written=999))
    snapshots.write(_other_process(root, 222, written=999, ended=True))
    snapshots.write(_other_process(root, 333, written=1000 - STALE_AFTER - 1))
    (folder / "444.json").write_text("{not json")
    factory = make(root, clock, metrics=False)
    factory.metrics = DaemonMetrics(factory.responder, factory.admission, factory.replies, clock=clock, snapshots=snapshots)
    ask(factory, b"GET hello.txt 0\r\n")
    samples = samples_of(factory.metrics.exposition().decode())
    assert requests(samples, "native", "ok") == 4  # one here, one in each snapshot
    assert samples[("filecache_cache_hits_total", ())] == 0
    assert samples[("filecache_cache_misses_total", ())] == 4
    assert samples[("filecache_cache_entries", ())] == 2  # here and in 111's; 222 ended, 333 is stale
    assert samples[("filecache_cache_capacity_bytes", ())] == 2 << 20
    assert samples[("filecache_processes", ())] == 2
    assert samples[("process_open_fds", (("pid", "111"),))] == 7
    assert ("process_open_fds", (("pid", "222"),)) not in samples
    assert ("process_open_fds", (("pid", str(os.getpid())),)) in samples
    assert ("process_cpu_seconds_total", ()) not in samples  # no unlabelled, per-process series


def test_snapshot_service_writes_and_ends(root: Path, tmp_path: Path) -> None:
    """Each process writes its snapshot at start and every second, and marks it ended when it stops."""
    clock = Clock()
    factory = make(root, clock, metrics=False)
    metrics = DaemonMetrics(factory.responder, factory.admission, factory.replies, clock=clock, snapshots=SnapshotFolder(str(tmp_path)))
    service = SnapshotService(metrics, clock)
    service.startService()
    path = tmp_path / f"{os.getpid()}.json"
    assert json.loads(path.read_text())["requests"] == {}
    ask(factory, b"GET hello.txt 0\r\n")
    clock.advance(1)
    assert json.loads(path.read_text())["requests"] == {"native ok": 1}
    service.stopService()
    assert json.loads(path.read_text())["ended"] is True
    assert not clock.getDelayedCalls()


def test_metrics_option(root: Path) -> None:
    """--metrics takes off or an endpoint (checked as --port is); workers get off and the snapshot folder."""
    options = Options()
    options.parseOptions(["--dir", str(root)])
    assert options.config.metrics is None and options.config.metrics_on_ports
    assert options.config.worker_metrics_argv("/d") == ["--metrics-dir", "/d"]
    options = Options()
    options.parseOptions(["--dir", str(root), "--metrics", "OFF"])
    assert options.config.metrics == "off" and not options.config.metrics_on_ports
    assert options.config.worker_metrics_argv(None) == ["--metrics", "off"]
    options = Options()
    options.parseOptions(["--dir", str(root), "--metrics", "9100"])
    assert options.config.metrics == "tcp:9100:backlog=1024" and not options.config.metrics_on_ports
    assert "--metrics" not in options.config.to_argv()
    with pytest.raises(SystemExit, match="--metrics nope:1: unknown endpoint type"):
        Options().parseOptions(["--dir", str(root), "--metrics", "nope:1"])


def test_fast_path_costs_one_increment(root: Path) -> None:
    """A kept response sent on the fast path is counted (http ok, lowest bucket) from one integer."""
    factory = make(root)
    proto, _transport = connect(factory)
    proto.dataReceived(http_get("/hello.txt"))
    for _ in range(5):
        proto.dataReceived(http_get("/hello.txt"))
    assert factory.replies.fast == 5
    _, samples = scrape(factory)
    assert requests(samples, "http", "ok") == 6  # the scrape's own ends after its figures are taken
    assert samples[("filecache_request_duration_seconds_bucket", (("le", "0.0005"),))] >= 5


def test_native_fast_path_is_counted_too(root: Path) -> None:
    """Known native GET lines answered without parsing are counted as native ok replies."""
    factory = make(root)
    proto, _transport = connect(factory)
    for _ in range(6):
        proto.dataReceived(b"GET hello.txt 0\r\n")
    assert factory.replies.fast_native == 4  # the first read, then the one that kept the reply
    _, samples = scrape(factory)
    assert requests(samples, "native", "ok") == 6
