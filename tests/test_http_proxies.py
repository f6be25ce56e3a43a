"""
HTTP through the proxies users put in front of a file server, real ones:
nginx as a caching reverse proxy (it revalidates with our validators) and
HAProxy in HTTP mode balancing two daemons with an HTTP health check.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import DaemonFactory, free_port, wait_for

CURL = ["curl", "--silent", "--show-error", "--max-time", "20"]


def _find(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
    if found is None:
        message = f"{name} is not installed: .ci/run installs it from Debian"
        if os.environ.get("FILECACHE_ALLOW_SKIP_SYSTEM_TOOLS") == "1":
            pytest.skip(message)
        pytest.fail(message)
    return found


def fetch(url: str, *args: str) -> tuple[dict[str, str], bytes]:
    """GET C{url} with curl: the response's headers (lower-case names) and body."""
    done = subprocess.run([*CURL, "-D", "-", *args, url], capture_output=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    head, _, body = done.stdout.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    headers[":status"] = lines[0].split()[1]
    return headers, body


class Proxy:
    """A proxy process of ours, stopped by its PID."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self.log = log
        self.process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log.open("wb"), stderr=subprocess.STDOUT
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def start_nginx(nginx: str, prefix: Path, http: str, out: Path) -> Proxy:
    """nginx in the foreground under C{prefix} (its temp paths, pid and error log there), C{http} in its http block."""
    user = "user root;\n" if os.geteuid() == 0 else ""
    conf = prefix / "nginx.conf"
    conf.write_text(
        f"""{user}worker_processes 1;
error_log {prefix}/error.log warn;
pid {prefix}/nginx.pid;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
{http}}}
"""
    )
    return Proxy([nginx, "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"], out)


@pytest.fixture
def proxies() -> Iterator[list[Proxy]]:
    started: list[Proxy] = []
    yield started
    for proxy in started:
        proxy.stop()


def up(port: int) -> bool:
    done = subprocess.run([*CURL, "-o", "/dev/null", f"http://127.0.0.1:{port}/"], capture_output=True, check=False)
    return done.returncode == 0


def test_nginx_caches_and_revalidates_with_our_validators(
    shared: Path, tmp_path: Path, daemon_factory: DaemonFactory, proxies: list[Proxy]
) -> None:
    """
    nginx with proxy_cache and proxy_cache_revalidate: a miss, a hit, then,
    once stale, a revalidation our daemon answers 304 (nginx sends our ETag
    and Last-Modified back); a file rewritten with its mtime put back is not
    taken as the same by the revalidation (the ETag moved) and the new bytes
    come through.
    """
    nginx = _find("nginx")
    path = shared / "a.txt"
    path.write_bytes(b"first version\n")
    daemon = daemon_factory(shared)
    port = free_port()
    prefix = tmp_path / "nginx"
    (prefix / "cache").mkdir(parents=True)
    http = f"""    proxy_cache_path {prefix}/cache keys_zone=files:1m;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://127.0.0.1:{daemon.port};
            proxy_http_version 1.1;
            proxy_cache files;
            proxy_cache_valid 200 1s;
            proxy_cache_revalidate on;
            add_header X-Cache-Status $upstream_cache_status always;
        }}
    }}
"""
    proxies.append(start_nginx(nginx, prefix, http, tmp_path / "nginx.out"))
    wait_for(lambda: up(port), 10, "nginx to listen")
    url = f"http://127.0.0.1:{port}/a.txt"

    headers, body = fetch(url)
    assert body == b"first version\n"
    assert headers["x-cache-status"] in ("MISS", "EXPIRED")
    headers, body = fetch(url)
    assert (headers["x-cache-status"], body) == ("HIT", b"first version\n")
    time.sleep(2.1)  # nginx counts validity in whole seconds
    headers, body = fetch(url)
    assert (headers["x-cache-status"], body) == ("REVALIDATED", b"first version\n")
    wait_for(lambda: "HTTP/1.1 GET /a.txt 304 0" in daemon.log_text(), 5, "the 304 in the access log")

    st = path.stat()
    path.write_bytes(b"other version\n")  # same size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    time.sleep(2.1)  # nginx counts validity in whole seconds
    headers, body = fetch(url)
    assert body == b"other version\n", headers
    assert headers["x-cache-status"] == "EXPIRED"


def test_haproxy_in_http_mode_balances_two_daemons(
    shared: Path, tmp_path: Path, daemon_factory: DaemonFactory, proxies: list[Proxy]
) -> None:
    """
    HAProxy in `mode http`, health-checking each daemon with `GET /`:
    requests through it are spread over both daemons, and a big file comes
    through whole; with one daemon stopped, the check takes it out and
    every request still succeeds.
    """
    haproxy = _find("haproxy")
    data = os.urandom(5 * 1024 * 1024 + 3)
    (shared / "big.bin").write_bytes(data)
    (shared / "a.txt").write_bytes(b"A")
    first = daemon_factory(shared, "--max-per-ip", "1024")
    second = daemon_factory(shared, "--max-per-ip", "1024")
    port = free_port()
    conf = tmp_path / "haproxy.cfg"
    conf.write_text(
        f"""global
    maxconn 256
defaults
    mode http
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    option http-keep-alive
frontend files
    bind 127.0.0.1:{port}
    default_backend daemons
backend daemons
    balance roundrobin
    option httpchk
    http-check send meth GET uri /
    http-check expect status 200
    server one 127.0.0.1:{first.port} check inter 300ms fall 2 rise 1
    server two 127.0.0.1:{second.port} check inter 300ms fall 2 rise 1
"""
    )
    proxies.append(Proxy([haproxy, "-db", "-f", str(conf)], tmp_path / "haproxy.out"))
    wait_for(lambda: up(port), 10, "haproxy to listen")
    url = f"http://127.0.0.1:{port}"

    def served_by(daemon_log: str) -> int:
        return daemon_log.count("HTTP/1.1 GET /a.txt 200")

    def both_served() -> bool:
        assert fetch(f"{url}/a.txt")[1] == b"A"
        return served_by(first.log_text()) > 0 and served_by(second.log_text()) > 0

    wait_for(both_served, 15, "both daemons to serve through haproxy")
    _, body = fetch(f"{url}/big.bin")
    assert hashlib.sha256(body).digest() == hashlib.sha256(data).digest()

    first.stop()
    time.sleep(1.0)  # three checks at 300 ms: taken out after two failures
    for _ in range(6):
        headers, body = fetch(f"{url}/a.txt")
        assert (headers[":status"], body) == ("200", b"A")
