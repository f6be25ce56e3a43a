"""
The fleet's HTTP engines, real ones: haproxy running deploy/haproxy-http.cfg
(only its addresses moved to loopback) in front of three daemons, so each
file is cached on one node and the fleet caches three times what one node
can, and a dead node moves only its own files; and nginx running
deploy/nginx-edge.conf as an edge cache that revalidates with our ETags.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import Daemon, DaemonFactory, free_port, stats, wait_for
from test_haproxy import HAProxy, haproxy_binary
from test_http_proxies import _find, fetch, start_nginx, up

CONFIG = Path(__file__).resolve().parent.parent / "deploy" / "haproxy-http.cfg"
MiB = 1024 * 1024
FILES = 160
FILE_SIZE = 256 * 1024  # 160 x 256 KiB = 40 MiB of distinct files
NODE_CACHE = "16M"
CLIENTS = 8


@pytest.fixture
def fleet(tmp_path: Path, daemon_factory: DaemonFactory) -> Iterator[tuple[Path, list[Daemon], Callable[..., HAProxy]]]:
    """Three daemons with 16 MiB caches on PROXY ports serving one folder, and a haproxy starter."""
    haproxy_binary()
    shared = tmp_path / "shared"
    (shared / "set").mkdir(parents=True)
    for i in range(FILES):
        (shared / "set" / f"f{i:03d}.bin").write_bytes(os.urandom(FILE_SIZE))
    daemons = [
        daemon_factory(shared, "--cache-size", NODE_CACHE, port="haproxy:tcp:0:interface=127.0.0.1")
        for _ in range(3)
    ]
    started: list[HAProxy] = []

    def start(edit: Callable[[str], str] = lambda text: text) -> HAProxy:
        proxy = HAProxy(tmp_path, daemons, CONFIG, edit)
        started.append(proxy)
        proxy.wait_all_checked_up()
        return proxy

    yield shared, daemons, start
    for proxy in started:
        proxy.stop()


def fetch_all(port: int, clients: int, passes: int) -> list[str]:
    """
    C{clients} keep-alive clients each fetch every file of the set C{passes}
    times, in turn, each starting at its own offset; return their errors
    (a body whose SHA-256 differs from the file's is one).
    """
    errors: list[str] = []
    names = [f"f{i:03d}.bin" for i in range(FILES)]

    def client(n: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            order = names[n * FILES // clients :] + names[: n * FILES // clients]
            for _ in range(passes):
                for name in order:
                    conn.request("GET", f"/set/{name}")
                    response = conn.getresponse()
                    body = response.read()
                    if response.status != 200 or len(body) != FILE_SIZE:
                        errors.append(f"{name}: {response.status} {len(body)}")
        except Exception as e:  # noqa: BLE001 - reported by the test
            errors.append(repr(e))
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return errors


def fleet_hit_ratio(daemons: list[Daemon], before: list[dict[str, int]]) -> float:
    after = [stats(d.port, proxied=True) for d in daemons]
    hits = sum(a["hits"] - b["hits"] for a, b in zip(after, before))
    misses = sum(a["misses"] - b["misses"] for a, b in zip(after, before))
    return hits / (hits + misses)


def measured_ratio(proxy: HAProxy, daemons: list[Daemon]) -> float:
    """The fleet's hit ratio over two passes of every client, after one warm-up pass."""
    assert fetch_all(proxy.port, 1, 1) == []
    before = [stats(d.port, proxied=True) for d in daemons]
    assert fetch_all(proxy.port, CLIENTS, 2) == []
    return fleet_hit_ratio(daemons, before)


_SERVED = re.compile(r"HTTP/1\.1 GET /set/(f\d{3}\.bin) 200 ")


def nodes_of(daemons: list[Daemon]) -> dict[str, set[int]]:
    """Which daemons (by index) have served each file, from their access logs."""
    served: dict[str, set[int]] = {}
    for index, daemon in enumerate(daemons):
        for name in _SERVED.findall(daemon.log_text()):
            served.setdefault(name, set()).add(index)
    return served


def test_routing_by_uri_caches_each_file_on_one_node(fleet: tuple[Path, list[Daemon], Callable[..., HAProxy]]) -> None:
    """
    40 MiB of distinct files, three nodes of 16 MiB, eight clients taking
    turns over every file: with `balance uri` and consistent hashing the
    fleet's hit ratio after a warm-up is at least 0.9 (each node caches its
    third); with roundrobin, every node sees every file and FIFO keeps
    losing them, at most 0.5.
    """
    _, daemons, start = fleet
    proxy = start()
    by_uri = measured_ratio(proxy, daemons)
    spread = nodes_of(daemons)
    proxy.stop()
    # The same daemons: roundrobin's warm-up pass takes their caches over.
    proxy = start(lambda text: text.replace("    balance uri len 1024\n    hash-type consistent\n", "    balance roundrobin\n"))
    round_robin = measured_ratio(proxy, daemons)
    shares = [sum(1 for nodes in spread.values() if i in nodes) for i in range(3)]
    print(f"\nfleet hit ratio: balance uri consistent {by_uri:.3f}, roundrobin {round_robin:.3f}; files per node {shares}")
    assert all(len(nodes) == 1 for nodes in spread.values()), "a file was served by two nodes"
    assert by_uri >= 0.9
    assert round_robin <= 0.5


def test_a_dead_node_moves_only_its_files_and_downloads_finish(
    fleet: tuple[Path, list[Daemon], Callable[..., HAProxy]], tmp_path: Path
) -> None:
    """
    Kill one node mid-download: the download in flight finishes through
    curl's retries (resuming with a Range request on the next node) with an
    identical SHA-256, and only that node's files move to other nodes: every
    other file stays where it was.
    """
    shared, daemons, start = fleet
    big = os.urandom(48 * MiB)
    (shared / "big.bin").write_bytes(big)
    proxy = start()
    assert fetch_all(proxy.port, 2, 1) == []
    before = {name: nodes for name, nodes in nodes_of(daemons).items()}
    assert len(before) == FILES and all(len(n) == 1 for n in before.values())

    out = tmp_path / "big.out"
    sent_before = [stats(d.port, proxied=True)["bytes_sent"] for d in daemons]
    curl = subprocess.Popen(
        ["curl", "-sS", "--fail", "--limit-rate", "8M", "--retry", "10", "--retry-delay", "1",
         "--retry-all-errors", "-C", "-", "-o", str(out), f"http://127.0.0.1:{proxy.port}/big.bin"],
        stderr=subprocess.PIPE,
    )
    try:
        def serving() -> int | None:
            sent = [stats(d.port, proxied=True)["bytes_sent"] for d in daemons]
            moving = [i for i, (a, b) in enumerate(zip(sent, sent_before)) if a - b > 4 * MiB]
            return moving[0] if moving else None

        wait_for(lambda: serving() is not None, 20, "the download to be under way")
        victim = serving()
        assert victim is not None
        daemons[victim].stop(signal.SIGKILL)
        _, stderr = curl.communicate(timeout=90)
    finally:
        if curl.poll() is None:
            curl.kill()
            curl.wait()
    assert curl.returncode == 0, stderr.decode(errors="replace")
    assert hashlib.sha256(out.read_bytes()).hexdigest() == hashlib.sha256(big).hexdigest()

    wait_for(lambda: proxy.states()[proxy.servers[victim]][0] == "DOWN", 20, "haproxy to mark the node down")
    logs_before = [d.log_text() for d in daemons]
    assert fetch_all(proxy.port, 2, 1) == []
    after: dict[str, set[int]] = {}
    for index, daemon in enumerate(daemons):
        if index == victim:
            continue
        for name in _SERVED.findall(daemon.log_text()[len(logs_before[index]) :]):
            after.setdefault(name, set()).add(index)
    moved = [name for name in before if after.get(name) != before[name]]
    victims_files = [name for name, nodes in before.items() if victim in nodes]
    print(f"\nkilled node {victim}: {len(moved)} of {FILES} files moved ({len(moved) / FILES:.2f}); it held {len(victims_files)}")
    assert sorted(moved) == sorted(victims_files)
    assert all(len(after[name]) == 1 for name in victims_files)


EDGE = Path(__file__).resolve().parent.parent / "deploy" / "nginx-edge.conf"


def _replace_once(text: str, old: str, new: str) -> str:
    if text.count(old) != 1:
        pytest.fail(f"{EDGE} should have exactly one {old!r}; update tests/test_fleet.py along with it")
    return text.replace(old, new)


def _origin_lines(daemon: Daemon, target: str) -> list[str]:
    """The origin's access-log statuses for GETs of C{target}."""
    return re.findall(rf"HTTP/1\.1 GET {re.escape(target)} (\d+) ", daemon.log_text())


def test_nginx_edge_caches_revalidates_and_locks(tmp_path: Path, daemon_factory: DaemonFactory) -> None:
    """
    deploy/nginx-edge.conf with the real nginx in front of a daemon: the
    second GET is the edge's (the origin served one 200); once stale, the
    edge revalidates with our ETag and the origin answers 304; a file
    changed on the origin reaches the edge's clients whole after the
    revalidation; eight clients asking at once for a new file cost the
    origin one request (proxy_cache_lock).
    """
    nginx = _find("nginx")
    shared = tmp_path / "shared"
    shared.mkdir()
    old = os.urandom(3 * MiB)
    (shared / "a.bin").write_bytes(old)
    origin = daemon_factory(shared)
    port = free_port()
    prefix = tmp_path / "edge"
    (prefix / "cache").mkdir(parents=True)
    edge = EDGE.read_text()
    edge = _replace_once(edge, "/var/cache/nginx/filecache", str(prefix / "cache"))
    edge = _replace_once(edge, "server 10.0.0.11:5000;", f"server 127.0.0.1:{origin.port};")
    edge = _replace_once(edge, "listen 80;", f"listen 127.0.0.1:{port};")
    edge = _replace_once(edge, "proxy_cache_valid 200 60s;", "proxy_cache_valid 200 1s;")
    (prefix / "edge.conf").write_text(edge)
    server = start_nginx(nginx, prefix, f"    include {prefix}/edge.conf;\n", tmp_path / "nginx.out")
    try:
        wait_for(lambda: up(port), 10, "nginx to listen")
        url = f"http://127.0.0.1:{port}/a.bin"
        digest = hashlib.sha256
        first, body = fetch(url)
        assert digest(body).digest() == digest(old).digest() and first["x-cache-status"] == "MISS"
        second, body = fetch(url)
        assert digest(body).digest() == digest(old).digest() and second["x-cache-status"] == "HIT"
        assert _origin_lines(origin, "/a.bin") == ["200"]

        time.sleep(2.1)  # nginx counts validity in whole seconds
        third, body = fetch(url)
        assert third["x-cache-status"] == "REVALIDATED" and body == old
        wait_for(lambda: _origin_lines(origin, "/a.bin") == ["200", "304"], 5, "the 304 at the origin")

        new = os.urandom(3 * MiB)
        (shared / "a.bin.tmp").write_bytes(new)
        os.replace(shared / "a.bin.tmp", shared / "a.bin")
        time.sleep(2.1)
        fourth, body = fetch(url)
        assert fourth["x-cache-status"] == "EXPIRED" and digest(body).digest() == digest(new).digest()
        fifth, body = fetch(url)
        assert fifth["x-cache-status"] == "HIT" and body == new
        wait_for(lambda: _origin_lines(origin, "/a.bin") == ["200", "304", "200"], 5, "the new 200 at the origin")

        fresh = os.urandom(16 * MiB)
        (shared / "b.bin").write_bytes(fresh)
        results: list[bytes] = []

        def client() -> None:
            results.append(fetch(f"http://127.0.0.1:{port}/b.bin", "--limit-rate", "64M")[1])

        threads = [threading.Thread(target=client) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(results) == 8 and all(r == fresh for r in results)
        statuses = _origin_lines(origin, "/b.bin")
        print(f"\nedge: a.bin origin statuses {_origin_lines(origin, '/a.bin')}; b.bin, 8 clients at once: {statuses}")
        assert statuses == ["200"]
    finally:
        server.stop()
