"""
A fleet behind HAProxy, tested with the real haproxy binary running
deploy/haproxy.cfg (only its addresses moved to loopback): a download survives
the death of the daemon serving it, and the health check takes a dead one out.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import Daemon, DaemonFactory, free_port, run_client, stats, tool, wait_for

MiB = 1024 * 1024
CONFIG = Path(__file__).resolve().parent.parent / "deploy" / "haproxy.cfg"
# What deploy/haproxy.cfg tells operators to run the daemons with: a PROXY
# protocol port, since HAProxy sends each client's address (send-proxy-v2).
DAEMON_ARGS: tuple[str, ...] = ()
DAEMON_PORT = "haproxy:tcp:0:interface=127.0.0.1"



def haproxy_binary() -> str:
    """
    The haproxy executable.  Missing, it fails the test (CI must run it),
    unless FILECACHE_ALLOW_SKIP_SYSTEM_TOOLS=1 allows a skip.
    """
    found = _which("haproxy")
    if found is not None:
        return found
    message = (
        "haproxy is not installed: .ci/run must install Debian's `haproxy` package "
        "(apt-get install -y haproxy)"
    )
    if os.environ.get("FILECACHE_ALLOW_SKIP_SYSTEM_TOOLS") == "1":
        pytest.skip(message)
    pytest.fail(message)


def _which(name: str) -> str | None:
    # Debian puts haproxy in /usr/sbin, which a non-root PATH may lack.
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")




def _rewrite_line(text: str, pattern: str, new: Callable[[re.Match[str]], str], what: str) -> str:
    """C{text} with its one line matching C{pattern} replaced; fail loudly if not exactly one."""
    matches = list(re.finditer(pattern, text, re.MULTILINE))
    if len(matches) != 1:
        pytest.fail(
            f"{CONFIG} should have exactly one {what} (pattern {pattern!r}), found "
            f"{len(matches)}; update tests/test_haproxy.py along with the config"
        )
    match = matches[0]
    return text[: match.start()] + new(match) + text[match.end() :]


_SERVER = r"^(\s*server\s+(\S+)\s+)10\.0\.0\.\d+:5000(.*\n)"


def fleet_config(
    listen: int, daemon_ports: list[int], stats_socket: Path, config: Path = CONFIG
) -> tuple[str, str, list[str]]:
    """
    C{config} (deploy/haproxy.cfg) as committed, with only these lines changed: the
    frontend listens on 127.0.0.1:C{listen}; the first servers point at
    C{daemon_ports} and the servers beyond them are left out; the optional
    runtime API socket is turned on at C{stats_socket}.  Not as root, the
    user, group and chroot lines go too (only root can change them).
    Return the text, the backend's name and the servers' names.
    """
    text = config.read_text()
    text = _rewrite_line(
        text, r"^(\s*bind\s+):\d+$", lambda m: f"{m[1]}127.0.0.1:{listen}", "`bind :PORT` line"
    )
    text = _rewrite_line(
        text,
        r"^(\s*)#\s*(stats socket )\S+( .*)$",
        lambda m: f"{m[1]}{m[2]}{stats_socket}{m[3]}",
        "commented-out `stats socket` line",
    )
    backend = re.findall(r"^backend\s+(\S+)\s*$", text, re.MULTILINE)
    servers = [m[1] for m in re.findall(_SERVER, text, re.MULTILINE)]
    if len(backend) != 1 or len(servers) < len(daemon_ports):
        pytest.fail(
            f"{CONFIG} should have one backend with at least {len(daemon_ports)} "
            "`server NAME 10.0.0.N:5000` lines; update tests/test_haproxy.py along with the config"
        )
    ports = dict(zip(servers, daemon_ports))

    def server(m: re.Match[str]) -> str:
        port = ports.get(m[2])
        return f"{m[1]}127.0.0.1:{port}{m[3]}" if port is not None else ""

    text = re.sub(_SERVER, server, text, flags=re.MULTILINE)
    if os.geteuid() != 0:
        for keyword in ("user", "group", "chroot"):
            text = _rewrite_line(
                text, rf"^\s*{keyword}\s+\S+\s*\n", lambda m: "", f"`{keyword}` line"
            )
    return text, backend[0], list(ports)


class HAProxy:
    """haproxy in the foreground (C{-db}) on a rewritten copy of the config."""

    def __init__(
        self,
        tmp_path: Path,
        daemons: list[Daemon],
        config: Path = CONFIG,
        edit: Callable[[str], str] = lambda text: text,
    ) -> None:
        self.port = free_port()
        self.socket = tmp_path / f"haproxy-{self.port}.sock"
        text, self.backend, self.servers = fleet_config(
            self.port, [d.port for d in daemons], self.socket, config
        )
        text = edit(text)
        self.config = tmp_path / f"haproxy-{self.port}.cfg"
        self.config.write_text(text)
        self.log = tmp_path / f"haproxy-{self.port}.log"
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                [haproxy_binary(), "-f", str(self.config), "-db"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def command(self, line: str) -> str:
        """One command on the runtime API (the UNIX stats socket)."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(self.socket))
            s.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def servers_stat(self) -> dict[str, dict[str, str]]:
        """C{show stat} for our backend's servers, by server name."""
        lines = self.command("show stat").splitlines()
        header = lines[0].lstrip("# ").split(",")
        rows = [dict(zip(header, line.split(","))) for line in lines[1:] if line]
        return {
            row["svname"]: row
            for row in rows
            if row["pxname"] == self.backend and row["svname"] in self.servers
        }

    def states(self) -> dict[str, tuple[str, str]]:
        """(status, check_status) of each server: C{("UP", "L7OK")}."""
        return {
            name: (row["status"], row["check_status"]) for name, row in self.servers_stat().items()
        }

    def wait_all_checked_up(self, timeout: float = 15) -> None:
        """Until every server has passed a protocol check (not only HAProxy's initial UP)."""

        def ready() -> bool:
            if self.process.poll() is not None:
                pytest.fail(f"haproxy exited with {self.process.returncode}:\n{self.log_text()}")
            if not self.socket.exists():
                return False
            states = self.states()
            return len(states) == len(self.servers) and all(
                s == ("UP", "L7OK") for s in states.values()
            )

        try:
            wait_for(ready, timeout, "every server to pass HAProxy's health check")
        except AssertionError:
            states = self.states() if self.socket.exists() else "no stats socket"
            raise AssertionError(f"servers: {states}\nhaproxy log:\n{self.log_text()}") from None

    def stop(self) -> None:
        """Stop haproxy by its PID and wait."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


@pytest.fixture
def haproxy_factory(tmp_path: Path) -> Iterator[Callable[[list[Daemon]], HAProxy]]:
    """Start haproxy in front of daemons with C{factory(daemons)}; it is stopped after the test."""
    haproxy_binary()  # fail (or skip) before any daemon is started
    started: list[HAProxy] = []

    def factory(daemons: list[Daemon]) -> HAProxy:
        proxy = HAProxy(tmp_path, daemons)
        started.append(proxy)
        proxy.wait_all_checked_up()
        return proxy

    yield factory
    for proxy in started:
        proxy.stop()




def write_random(path: Path, size: int) -> str:
    """Fill C{path} with C{size} random bytes; return their SHA-256."""
    hasher = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(size // (8 * MiB)):
            chunk = os.urandom(8 * MiB)
            hasher.update(chunk)
            f.write(chunk)
    return hasher.hexdigest()


def sha256_of(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            hasher.update(chunk)
    return hasher.hexdigest()


def test_committed_config_is_valid() -> None:
    """deploy/haproxy.cfg as committed (documentation addresses and all) passes `haproxy -c`."""
    result = subprocess.run(
        [haproxy_binary(), "-c", "-f", str(CONFIG)],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_download_fails_over_to_the_other_daemon_and_resumes(
    shared: Path,
    daemon_factory: DaemonFactory,
    haproxy_factory: Callable[[list[Daemon]], HAProxy],
    tmp_path: Path,
) -> None:
    """
    The daemon serving a download through HAProxy is killed mid-file: the
    client reconnects through HAProxy, lands on the other daemon, resumes
    from its .part (HASH, then GET with an offset) and ends with the source's
    SHA-256.
    """
    size = 200 * MiB
    digest = write_random(shared / "big.bin", size)
    daemons = [daemon_factory(shared, *DAEMON_ARGS, port=DAEMON_PORT), daemon_factory(shared, *DAEMON_ARGS, port=DAEMON_PORT)]
    proxy = haproxy_factory(daemons)
    out = tmp_path / "out"
    part = out / ".big.bin.filecache-part"
    client = subprocess.Popen(
        [
            tool("filecache-client"),
            "127.0.0.1",
            str(proxy.port),
            "get",
            "big.bin",
            "-o",
            str(out),
            "--retries",
            "5",
            "--quiet",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(
            lambda: part.exists() and part.stat().st_size >= 20 * MiB,
            30,
            "the .part to pass 20 MiB",
        )
        client.send_signal(signal.SIGSTOP)
        # With the client stopped the serving daemon fills the socket buffers
        # and waits: the transfer is surely mid-file.
        time.sleep(0.3)
        assert client.poll() is None, "the download ended before it could be interrupted"
        # Which daemon serves it: HAProxy's current sessions per server
        # (checks are not sessions), confirmed by the daemon's own count
        # (the transfer plus our STATS connection; bytes_sent cannot tell, it
        # grows only when a reply is complete).
        sessions = {name: int(row["scur"]) for name, row in proxy.servers_stat().items()}
        serving = [name for name, count in sessions.items() if count > 0]
        assert len(serving) == 1 and sessions[serving[0]] == 1, f"sessions per server: {sessions}"
        victim = daemons[proxy.servers.index(serving[0])]
        survivor = daemons[1 - daemons.index(victim)]
        assert stats(victim.port, proxied=True)["connections_active"] >= 2
        victim.stop(signal.SIGKILL)
        client.send_signal(signal.SIGCONT)
        _, stderr = client.communicate(timeout=60)
    finally:
        if client.poll() is None:
            client.send_signal(signal.SIGCONT)
            client.kill()
            client.wait(10)
    assert client.returncode == 0, f"client: {stderr}\nhaproxy log:\n{proxy.log_text()}"
    assert sha256_of(out / "big.bin") == digest
    assert sorted(p.name for p in out.iterdir()) == ["big.bin"]
    assert "connection lost" in stderr and "retrying in" in stderr, stderr
    # The survivor resumed: it was asked HASH, then GET from an offset past
    # the 20 MiB the client had, and sent exactly the rest.
    log = survivor.log_text()
    assert "HASH big.bin OK" in log, log
    resumed = re.findall(r" GET big\.bin (\d+) OK ", log)
    assert len(resumed) == 1, log
    offset = int(resumed[0])
    assert offset >= 20 * MiB
    assert stats(survivor.port, proxied=True)["bytes_sent"] == size - offset
    assert " GET big.bin OK " not in log, "the survivor sent the whole file again"


def test_health_check_marks_a_dead_daemon_down(
    shared: Path,
    daemon_factory: DaemonFactory,
    haproxy_factory: Callable[[list[Daemon]], HAProxy],
    tmp_path: Path,
) -> None:
    """
    HAProxy's check speaks the protocol (STATS answered OK) and shows both
    daemons UP; one is killed and within inter x fall it is DOWN while the
    other stays UP; downloads through HAProxy go on working, both right after
    the kill (HAProxy retries the refused connection elsewhere) and after.
    """
    files = {f"f{i}.bin": os.urandom(256 * 1024 + i) for i in range(3)}
    for name, content in files.items():
        (shared / name).write_bytes(content)
    daemons = [daemon_factory(shared, *DAEMON_ARGS, port=DAEMON_PORT), daemon_factory(shared, *DAEMON_ARGS, port=DAEMON_PORT)]
    proxy = haproxy_factory(daemons)
    assert proxy.states() == {name: ("UP", "L7OK") for name in proxy.servers}
    for daemon in daemons:
        assert re.search(r" STATS OK ", daemon.log_text()), "the check did not send STATS"
    dead_name, live_name = proxy.servers
    daemons[0].stop(signal.SIGKILL)
    killed = time.monotonic()

    # Before the check has noticed: a refused connection is redispatched.
    result = run_client(
        "127.0.0.1",
        str(proxy.port),
        "get",
        "f0.bin",
        "-o",
        str(tmp_path / "early"),
        "--retries",
        "0",
        "--quiet",
        timeout=30,
    )
    assert result.returncode == 0, f"{result.stderr}\nhaproxy log:\n{proxy.log_text()}"
    assert (tmp_path / "early" / "f0.bin").read_bytes() == files["f0.bin"]

    # inter 2s x fall 3 in the committed file: about 6 s, allow for slack.
    wait_for(
        lambda: proxy.states()[dead_name][0] == "DOWN", 15, f"HAProxy to mark {dead_name} DOWN"
    )
    took = time.monotonic() - killed
    assert took < 12, f"marked DOWN only after {took:.1f} s"
    assert proxy.states()[live_name] == ("UP", "L7OK")
    assert re.search(rf"Server \S+/{dead_name} is DOWN", proxy.log_text()), proxy.log_text()

    for name, content in files.items():
        dest = tmp_path / "late"
        result = run_client(
            "127.0.0.1",
            str(proxy.port),
            "get",
            name,
            "-o",
            str(dest),
            "--retries",
            "0",
            "--quiet",
            timeout=30,
        )
        assert result.returncode == 0, result.stderr
        assert (dest / name).read_bytes() == content
    log = daemons[1].log_text()
    assert all(f" GET {name} OK " in log for name in files), log


def _proxy_only_config(listen: int, daemon_port: int) -> str:
    """A TCP-mode HAProxy that tells one daemon each client's address with the PROXY protocol v2."""
    return f"""
global
    maxconn 256
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend clients
    bind 127.0.0.1:{listen}
    default_backend daemons
backend daemons
    server one 127.0.0.1:{daemon_port} send-proxy-v2
"""


def _connect_from(source: str, port: int) -> socket.socket:
    s = socket.socket()
    s.settimeout(10)
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    return s


def _ask(s: socket.socket, request: bytes) -> bytes:
    """Send C{request} and read until the peer's reply is complete or it hangs up."""
    s.sendall(request)
    data = b""
    while not (data.startswith(b"OK ") and data.count(b"\r\n") >= 2 and data.endswith(b"\r\n")):
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_real_haproxy_send_proxy_v2_gives_the_daemon_each_clients_address(
    tmp_path: Path, daemon_factory: DaemonFactory
) -> None:
    """
    Through the real haproxy with send-proxy-v2 to a haproxy: port: --allow
    refuses a client by its own address (127.0.0.2, not haproxy's
    127.0.0.1), --max-per-ip counts per client address and frees it when
    they close, and the access log names the clients.
    """
    folder = tmp_path / "shared"
    folder.mkdir()
    (folder / "a.txt").write_bytes(b"hello")
    daemon = daemon_factory(
        folder, "--allow", "127.0.0.1/32,127.0.0.3/32", "--max-per-ip", "2",
        port="haproxy:tcp:0:interface=127.0.0.1",
    )
    listen = free_port()
    config = tmp_path / "proxy.cfg"
    config.write_text(_proxy_only_config(listen, daemon.port))
    log = tmp_path / "haproxy-proxy.log"
    with open(log, "wb") as out:
        haproxy = subprocess.Popen(
            [haproxy_binary(), "-f", str(config), "-db"], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        def listening() -> bool:
            try:
                socket.create_connection(("127.0.0.1", listen), 0.2).close()
            except OSError:
                return False
            return True

        wait_for(listening, 10, "haproxy to listen")
        get = b"GET a.txt 0\r\n"
        with _connect_from("127.0.0.2", listen) as refused:
            assert _ask(refused, get) == b"", "127.0.0.2 is outside --allow"
        for _round in range(2):
            first, second = _connect_from("127.0.0.3", listen), _connect_from("127.0.0.3", listen)
            assert _ask(first, get).startswith(b"OK 5 ") and _ask(second, get).startswith(b"OK 5 ")
            with _connect_from("127.0.0.3", listen) as third:
                assert _ask(third, get).startswith(b"ERR busy "), "the third from 127.0.0.3"
            with _connect_from("127.0.0.1", listen) as other:
                assert _ask(other, get).startswith(b"OK 5 "), "another client is not held back"
            first.close()
            second.close()
            # Their slots are free once the daemon has seen them close (the
            # STATS connection, through haproxy too, is the one left).
            wait_for(lambda: stats(listen)["connections_active"] == 1, 10, "the daemon to see them close")
        text = daemon.log.read_text(errors="replace")
        assert "refused connection from 127.0.0.2: not in --allow" in text
        assert re.search(r"127\.0\.0\.3:\d+ GET a\.txt 0 OK 5 ", text), text
        assert re.search(r"127\.0\.0\.1:\d+ GET a\.txt 0 OK 5 ", text)
    finally:
        haproxy.send_signal(signal.SIGTERM)
        haproxy.wait(10)
