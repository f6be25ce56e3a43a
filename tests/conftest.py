"""
Shared fixtures: start the real daemon with twistd on a free loopback port,
and talk to it with raw sockets; every process started here is stopped here.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, TypeVar

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from typing_extensions import Self

from filecache.client.protocol import FileCacheClientProtocol

_T = TypeVar("_T")

BIN = Path(sys.executable).parent

# Tests that start processes or open real sockets are marked "system", so
# that `pytest -m "not system"` runs the in-memory tier alone.
_SYSTEM_FIXTURES = frozenset({"daemon", "daemon_factory", "raw"})
_SYSTEM_MODULES = frozenset(
    {
        "test_integration",
        "test_faults",
        "test_haproxy",
        "test_systemd",
        "test_drain",
        "test_resume",
        "test_workers",
        "test_tls",
        "test_packaging",
        "test_client_faults",
        "test_cli",
        "test_attacks",
        "test_startup",
        "test_benchmark_harness",
        "test_metrics_prometheus",
    }
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        module = item.module.__name__.rpartition(".")[2] if item.module else ""  # type: ignore[attr-defined]
        fixtures = set(getattr(item, "fixturenames", ()))
        if module in _SYSTEM_MODULES or fixtures & _SYSTEM_FIXTURES:
            item.add_marker(pytest.mark.system)


def tool(name: str) -> str:
    """The console script C{name} installed beside this Python, else on PATH."""
    candidate = BIN / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} is not installed: pip install -e '.[test]'")
    return found


_PORT_LINE = re.compile(rb"starting on (\d+)")


@dataclass
class Daemon:
    """A filecache daemon running under twistd in a subprocess."""

    process: subprocess.Popen[bytes]
    log: Path
    port: int = 0
    stopped: bool = field(default=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        """Stop the daemon (by its PID) and wait; return its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.stopped = True
        return self.process.returncode


def launch_daemon(
    folder: Path, log: Path, *extra: str, port: str = "tcp:0:interface=127.0.0.1"
) -> Daemon:
    """Start C{twistd -n filecache} serving C{folder}; do not wait (see L{wait_listening})."""
    args = [
        tool("twistd"),
        "--nodaemon",
        "--pidfile=",
        f"--logfile={log}",
        "filecache",
        "--port",
        port,
        "--dir",
        str(folder),
        *extra,
    ]
    # What twistd says before its log opens (an option it refuses, a plugin
    # it cannot load) goes beside the log, for wait_listening to show.
    with log.with_suffix(".out").open("wb") as out:
        process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    return Daemon(process, log)


def wait_listening(daemon: Daemon, timeout: float = 20) -> Daemon:
    """Wait until C{daemon} says it listens, and note its port; stop it and fail if it does not."""
    log, process = daemon.log, daemon.process
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists():
            match = _PORT_LINE.search(log.read_bytes())
            if match:
                daemon.port = int(match.group(1))
                return daemon
        if process.poll() is not None:
            break
        time.sleep(0.01)  # a daemon starts in 0.3 s: poll finely, about a hundred are started
    daemon.stop(signal.SIGKILL)
    text = log.read_text(errors="replace") if log.exists() else ""
    early = log.with_suffix(".out")
    said = early.read_text(errors="replace") if early.exists() else ""
    raise RuntimeError(f"daemon did not start (status {process.returncode}):\n{said}{text}")


def start_daemon(
    folder: Path, log: Path, *extra: str, port: str = "tcp:0:interface=127.0.0.1"
) -> Daemon:
    """Start C{twistd -n filecache} serving C{folder}; wait until it listens."""
    return wait_listening(launch_daemon(folder, log, *extra, port=port))


class DaemonPool:
    """
    Daemons for the C{daemon} fixture, each started while the test before it
    runs: a twistd takes 0.3 s to start (more on a loaded machine) and forty
    tests ask for one.  Each test still gets a daemon of its own, with
    default options, serving an empty folder of its own, started before the
    test's first line as before, only earlier.
    """

    def __init__(self, root: Path, items: list[pytest.Item]) -> None:
        self._root = root
        # The tests that will ask, in the order they run (after any shuffle).
        self._order = [item.nodeid for item in items if "daemon" in getattr(item, "fixturenames", ())]
        self._ahead: dict[str, Daemon] = {}

    def _folder(self, nodeid: str) -> Path:
        return self._root / str(self._order.index(nodeid)) / "shared"

    def folder_for(self, nodeid: str) -> Path | None:
        """The folder the daemon started ahead for test C{nodeid} serves, if one was."""
        return self._folder(nodeid) if nodeid in self._ahead else None

    def take(self, nodeid: str) -> Daemon | None:
        """The daemon started ahead for test C{nodeid}, listening; C{None} if none was."""
        daemon = self._ahead.pop(nodeid, None)
        return None if daemon is None else wait_listening(daemon)

    def start_next(self, nodeid: str) -> None:
        """Start the daemon of the next test that asks for one, after test C{nodeid}."""
        if nodeid not in self._order:
            return
        following = self._order[self._order.index(nodeid) + 1 :]
        if not following or following[0] in self._ahead:
            return
        folder = self._folder(following[0])
        folder.mkdir(parents=True)
        self._ahead[following[0]] = launch_daemon(folder, folder.parent / "daemon.log")

    def close(self) -> None:
        """Stop every daemon started for a test that never came (skipped, deselected, interrupted)."""
        for daemon in self._ahead.values():
            daemon.stop()
        self._ahead.clear()


@pytest.fixture(scope="session")
def daemon_pool(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonPool]:
    pool = DaemonPool(tmp_path_factory.mktemp("daemons-ahead"), request.session.items)
    yield pool
    pool.close()


@pytest.fixture
def shared(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """
    An empty folder to share: C{tmp_path/shared}, or for a test that asks
    for C{daemon} the folder of the daemon started ahead for it.
    """
    if "daemon" in request.fixturenames:
        pool: DaemonPool = request.getfixturevalue("daemon_pool")
        ahead = pool.folder_for(request.node.nodeid)
        if ahead is not None:
            return ahead
    folder = tmp_path / "shared"
    folder.mkdir()
    return folder


class DaemonFactory(Protocol):
    """The C{daemon_factory} fixture: start a daemon serving C{folder} with C{extra} options."""

    def __call__(self, folder: Path, *extra: str, port: str = ...) -> Daemon: ...


class Reaper:
    """
    Stops daemons after their test without holding up the next one: each is
    given to a thread that stops it as L{Daemon.stop} does (SIGTERM, then
    SIGKILL after 15 s), and the session waits for every thread at its end.
    A daemon takes about 70 ms to exit, and a hundred are stopped.
    """

    def __init__(self) -> None:
        self._threads: list[threading.Thread] = []

    def stop(self, daemon: Daemon) -> None:
        if daemon.stopped:
            return
        thread = threading.Thread(target=daemon.stop, name=f"stopping daemon {daemon.pid}")
        thread.start()
        self._threads.append(thread)

    def join(self) -> None:
        for thread in self._threads:
            thread.join(30)
        self._threads.clear()


@pytest.fixture(scope="session")
def reaper() -> Iterator[Reaper]:
    stopping = Reaper()
    yield stopping
    stopping.join()


@pytest.fixture
def daemon_factory(tmp_path: Path, reaper: Reaper) -> Iterator[DaemonFactory]:
    """Start daemons with C{factory(folder, *args)}; all are stopped after the test."""
    started: list[Daemon] = []

    def factory(folder: Path, *extra: str, **kw: str) -> Daemon:
        log = tmp_path / f"daemon-{len(started)}.log"
        daemon = start_daemon(folder, log, *extra, **kw)
        started.append(daemon)
        return daemon

    yield factory
    for daemon in started:
        reaper.stop(daemon)


@pytest.fixture
def daemon(
    request: pytest.FixtureRequest,
    shared: Path,
    daemon_factory: DaemonFactory,
    daemon_pool: DaemonPool,
    reaper: Reaper,
) -> Iterator[Daemon]:
    """A daemon serving C{shared} with default options."""
    ahead = daemon_pool.take(request.node.nodeid)
    daemon_pool.start_next(request.node.nodeid)  # it starts while this test runs
    if ahead is None:
        yield daemon_factory(shared)
        return
    assert ahead.log.parent == shared.parent
    yield ahead
    reaper.stop(ahead)


class RawClient:
    """A blocking socket speaking the wire protocol by hand."""

    def __init__(
        self, port: int, host: str = "127.0.0.1", timeout: float = 10, source: str | None = None
    ) -> None:
        self.sock = socket.create_connection(
            (host, port), timeout=timeout, source_address=(source, 0) if source else None
        )
        # A bytearray grows in place and drops a prefix without copying the
        # rest: taking a 60 MiB body or 200,000 LIST rows stays linear.
        self.buffer = bytearray()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            return False
        self.buffer += chunk
        return True

    def _take(self, n: int) -> bytes:
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data

    def line(self) -> bytes:
        """The next line, with its C{\\r\\n}."""
        scanned = 0
        while (end := self.buffer.find(b"\n", scanned)) < 0:
            scanned = len(self.buffer)
            if not self._fill():
                raise EOFError(bytes(self.buffer))
        return self._take(end + 1)

    def exactly(self, n: int) -> bytes:
        while len(self.buffer) < n:
            if not self._fill():
                raise EOFError(len(self.buffer))
        return self._take(n)

    def get(self, path: bytes, offset: int | None = None) -> tuple[bytes, bytes, bytes]:
        """Send a GET; return (status line, body, END line)."""
        self.send(b"GET " + path + (b" %d" % offset if offset is not None else b"") + b"\r\n")
        return self.read_get()

    def read_get(self) -> tuple[bytes, bytes, bytes]:
        status = self.line()
        if not status.startswith(b"OK "):
            return status, b"", b""
        size = int(status.split()[1])
        body = self.exactly(size)
        return status, body, self.line()

    def rows(self, request: bytes) -> tuple[bytes, list[bytes]]:
        """
        Send a LIST or STATS request; return (status line, rows).  A LIST
        reply's rows run up to its C{END <n>} line, which must count them.
        """
        self.send(request + b"\r\n")
        status = self.line()
        if status == b"OK\r\n":
            rows: list[bytes] = []
            while True:
                line = self.line()
                if line.startswith(b"END "):
                    assert int(line.split()[1]) == len(rows), line
                    return status, rows
                if line.startswith(b"ERR "):
                    return line, rows
                rows.append(line)
        if not status.startswith(b"OK "):
            return status, []
        return status, [self.line() for _ in range(int(status.split()[1]))]

    def closed_by_peer(self) -> bool:
        """Whether the server closes the connection (EOF or reset) before the timeout."""
        try:
            while self._fill():
                pass
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        self.sock.close()


class LoopbackServer:
    """
    The frame of a fake server in a thread, for client tests: a listener on
    a free loopback port, a C{stopping} event, and a context manager that
    always stops the thread and closes the listener.  Subclasses write
    C{_run}, which must poll C{stopping} (the listener times out every
    C{poll} seconds).
    """

    def __init__(self, name: str, poll: float = 0.1) -> None:
        self.stopping = threading.Event()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(8)
        self._listener.settimeout(poll)
        self.port: int = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stopping.set()
        # Wake an accept() under way at once (it fails with EINVAL) rather
        # than after its poll timeout: a tenth of a second per test.
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._thread.join(10)
        self._listener.close()
        assert not self._thread.is_alive(), f"the {self._thread.name} thread did not stop"


def crlf_lines(reply: bytes) -> list[bytes]:
    """Split a reply on CRLF, as a client reading lines would, dropping the final empty piece."""
    assert reply.endswith(b"\r\n")
    return reply[:-2].split(b"\r\n")


def connected_client(
    timeout: float | None = None, clock: Clock | None = None
) -> tuple[FileCacheClientProtocol, StringTransport]:
    """A client protocol on a StringTransport, for in-memory client tests."""
    proto = FileCacheClientProtocol(timeout=timeout, clock=clock)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on just now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> float:
    """Poll C{condition} until it is true; return the seconds it took."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.02)
    return time.monotonic() - start


def cpu_ticks(pid: int) -> int:
    """The CPU time process C{pid} has used so far (user and system), in clock ticks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])


def wait_until_idle(
    pid: int, timeout: float, what: str, quiet: float = 0.3, *, fail: bool = True
) -> float:
    """
    Poll until process C{pid} has used no CPU for C{quiet} seconds (a tick
    is 10 ms: that is under 4% of a core); return the seconds it took.  For
    a daemon whose work pauses under backpressure: once it is idle, what it
    holds is what it will hold.  After C{timeout} seconds, fail, or with
    C{fail=False} return (the end of a fixed window, cut short when the
    daemon is done earlier).
    """
    start = time.monotonic()
    last, since = cpu_ticks(pid), start
    while time.monotonic() - since < quiet:
        if time.monotonic() - start >= timeout:
            assert not fail, f"{what}: still busy after {timeout} s"
            break
        time.sleep(0.05)
        now = cpu_ticks(pid)
        if now != last:
            last, since = now, time.monotonic()
    return time.monotonic() - start


@contextmanager
def ram_folder(fallback: pytest.TempPathFactory) -> Iterator[Path]:
    """
    A new folder on /dev/shm (a tmpfs), removed afterwards, or a pytest
    temporary folder where there is none: for trees of many small files.
    Making 200,000 empty files took 36 s on this machine's disk while other
    jobs kept it busy, and 0.4 s in memory.
    """
    if not (os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK)):
        yield fallback.mktemp("ram")
        return
    folder = Path(tempfile.mkdtemp(prefix="filecache-test-", dir="/dev/shm"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def make_empty_files(folder: Path, names: Iterable[str]) -> None:
    """Create empty regular files (mode 0644 less the umask) in C{folder}, one system call each."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in names:
            os.mknod(name, 0o644 | stat.S_IFREG, dir_fd=fd)
    finally:
        os.close(fd)


def stats(port: int, host: str = "127.0.0.1", *, proxied: bool = False) -> dict[str, int]:
    """A daemon's integer STATS, over a connection of its own (to a PROXY protocol port: C{proxied})."""
    client = RawClient(port, host=host)
    if proxied:
        client.send(b"PROXY TCP4 127.0.0.1 127.0.0.1 40000 5000\r\n")
    try:
        _, rows = client.rows(b"STATS")
    finally:
        client.close()
    pairs = (row.decode().split() for row in rows)
    return {k: int(v) for k, v in pairs if v.lstrip("-").isdigit()}


def open_fds(pid: int) -> int:
    """How many descriptors process C{pid} has open."""
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.fixture
def raw(daemon: Daemon) -> Iterator[RawClient]:
    client = RawClient(daemon.port)
    yield client
    client.close()


def run_client(*args: str, cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the real C{filecache-client}; capture its output."""
    return subprocess.run(
        [tool("filecache-client"), *args],
        check=False,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


@dataclass(frozen=True)
class TlsFiles:
    """A throwaway CA and a server certificate it signed, as PEM files."""

    ca: Path
    cert: Path
    key: Path


def make_tls_files(folder: Path, hostname: str = "localhost") -> TlsFiles:
    """Generate a CA and a certificate for C{hostname} (no IP address in it)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "filecache test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    files = TlsFiles(folder / "ca.pem", folder / "cert.pem", folder / "key.pem")
    files.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return files


class QueuedSteps:
    """A run_blocking (disk work) that runs nothing until the test says so, and counts."""

    def __init__(self) -> None:
        self.queue: list[tuple[Callable[[], Any], Deferred[Any]]] = []
        self.ran = 0

    def __call__(self, work: Callable[[], _T]) -> Deferred[_T]:
        d: Deferred[_T] = Deferred()
        self.queue.append((work, d))
        return d

    def run_one(self) -> None:
        work, d = self.queue.pop(0)
        if d.called:
            return  # cancelled
        self.ran += 1
        d.callback(work())

    def run_all(self) -> None:
        while self.queue:
            self.run_one()


def rss_kib(pid: int, key: str = "VmRSS") -> int:
    """A line of /proc/PID/status in KiB (VmRSS now, VmHWM the peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {key} for {pid}")
