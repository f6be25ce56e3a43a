"""
Start-up errors: a --port that cannot work, or a listen that fails, ends the
daemon with one line on stderr saying what is wrong and exit status 1, under
twistd and twist, with no traceback and no pidfile left behind.
"""

from __future__ import annotations

import errno
import io
import re
import socket
import subprocess
from pathlib import Path

import pytest
from conftest import Daemon, RawClient, tool
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure
from zope.interface import implementer

from filecache.daemon.startup import CannotStart, ConfigError, StartupEndpoint
from filecache.daemon.tap import Options

# --- in memory -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("port", "message"),
    [
        ("99999", "filecache: --port 99999: '99999' is not a port number (0 to 65535)"),
        ("tcp:65536", "filecache: --port tcp:65536: '65536' is not a port number (0 to 65535)"),
        ("tcp:-1", "filecache: --port tcp:-1: '-1' is not a port number (0 to 65535)"),
        ("tcp:5x", "filecache: --port tcp:5x: '5x' is not a port number (0 to 65535)"),
        ("tcp:port=70000", "filecache: --port tcp:port=70000: '70000' is not a port number (0 to 65535)"),
        ("tcp:", "filecache: --port tcp:: '' is not a port number (0 to 65535)"),
        ("haproxy:tcp:99999", "filecache: --port haproxy:tcp:99999: '99999' is not a port number (0 to 65535)"),
        ("ssl:99999:privateKey=k.pem", "filecache: --port ssl:99999:privateKey=k.pem: '99999' is not a port number (0 to 65535)"),
        (
            "tcp:5601:interface=256.1.1.1",
            "filecache: --port tcp:5601:interface=256.1.1.1: '256.1.1.1' is not an IP address",
        ),
    ],
)
def test_options_refuse_a_port_that_is_not_one(tmp_path: Path, port: str, message: str) -> None:
    """A port number outside 0-65535, or not a number, or an IPv4 interface that is not one, is refused by the options, in one line."""
    with pytest.raises(ConfigError) as caught:
        Options().parseOptions(["--dir", str(tmp_path), "--port", port])
    assert str(caught.value) == message


@pytest.mark.parametrize("kind", ["tpc", "TCP", "http", ""])
def test_options_refuse_an_unknown_endpoint_type(tmp_path: Path, kind: str) -> None:
    """A typo in the endpoint type is named, with the types this Twisted knows."""
    with pytest.raises(ConfigError) as caught:
        Options().parseOptions(["--dir", str(tmp_path), "--port", f"{kind}:5601"])
    assert re.fullmatch(
        rf"filecache: --port {kind}:5601: unknown endpoint type '{kind}' \(known: [a-z0-9, ]*\btcp\b[a-z0-9, ]*; or a bare port number\)",
        str(caught.value),
    ), str(caught.value)


def test_options_refuse_an_argument_the_endpoint_does_not_take(tmp_path: Path) -> None:
    """Twisted's own complaint about an endpoint's arguments comes as one line too."""
    for port in ("tcp:5000:backlog=many", "tcp:5000:colour=red"):
        with pytest.raises(ConfigError) as caught:
            Options().parseOptions(["--dir", str(tmp_path), "--port", port])
        assert str(caught.value).startswith(f"filecache: --port {port}: ")
        assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "port",
    ["5000", "0", "tcp:65535", "tcp:0:interface=127.0.0.1", r"tcp6:5000:interface=\:\:1",
     "tcp:port=5000", "haproxy:tcp:5000", "tcp:5000:interface=localhost", "unix:/run/fc.sock"],
)
def test_options_accept_good_ports(tmp_path: Path, port: str) -> None:
    """The checks refuse nothing that can work: bare numbers, 0 (any port), host names, escaped IPv6."""
    options = Options()
    options.parseOptions(["--dir", str(tmp_path), "--port", port])
    assert options.config.port_text == port


@implementer(IStreamServerEndpoint)
class _Endpoint:
    """An endpoint whose listen returns the Deferred it was given."""

    def __init__(self, result: Deferred[IListeningPort]) -> None:
        self.result = result

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        return self.result


@pytest.mark.parametrize(
    ("error", "why"),
    [
        (
            CannotListenError("", 5600, OSError(errno.EADDRINUSE, "Address already in use")),
            "address already in use",
        ),
        (CannotListenError("", 80, OSError(errno.EACCES, "Permission denied")), "permission denied"),
        (
            CannotListenError("192.0.2.1", 5600, OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address")),
            "no interface of this machine has the address '192.0.2.1'",
        ),
        (
            CannotListenError("nowhere.invalid", 5600, socket.gaierror(-2, "Name or service not known")),
            "bad interface address 'nowhere.invalid' (name or service not known)",
        ),
        (
            FileNotFoundError(errno.ENOENT, "No such file or directory", "123", None, "/no/dir/fc.sock.lock"),
            "no such file or directory (/no/dir/fc.sock.lock)",
        ),
    ],
)
def test_a_listen_that_fails_at_once_raises_cannot_start(error: Exception, why: str) -> None:
    """
    StartupEndpoint turns a listen that failed at once into one line on
    stderr and CannotStart: a SystemExit with status 1 (no traceback) that
    is also an Exception (so twistd removes its pidfile).
    """
    stderr = io.StringIO()
    endpoint = StartupEndpoint(_Endpoint(fail(error)), "tcp:5600", stderr=stderr)
    with pytest.raises(CannotStart) as caught:
        endpoint.listen(Factory())
    assert stderr.getvalue() == f"filecache: cannot listen on tcp:5600: {why}\n"
    assert caught.value.code == 1
    assert isinstance(caught.value, SystemExit) and isinstance(caught.value, Exception)


def test_a_listen_that_succeeds_or_fails_later_is_passed_on() -> None:
    """Only a failure at once is turned into CannotStart; a port, or a later failure, reaches the caller."""
    port = object()
    results: list[object] = []
    StartupEndpoint(_Endpoint(succeed(port)), "tcp:1").listen(Factory()).addCallback(results.append)  # type: ignore[arg-type]
    assert results == [port]
    later: Deferred[IListeningPort] = Deferred()
    stderr = io.StringIO()
    d = StartupEndpoint(_Endpoint(later), "tcp:1", stderr=stderr).listen(Factory())
    later.errback(CannotListenError("", 1, OSError(errno.EADDRINUSE, "Address already in use")))
    d.addErrback(results.append)
    assert isinstance(results[-1], Failure)
    assert isinstance(results[-1].value, CannotListenError)
    assert stderr.getvalue() == ""


# --- real processes ----------------------------------------------------------------


RUNNERS = {
    "twistd": lambda tmp: [tool("twistd"), "-n", "--pidfile=", "filecache"],
    "twistd-pidfile": lambda tmp: [tool("twistd"), "-n", f"--pidfile={tmp / 'fc.pid'}", "filecache"],
    "twist": lambda tmp: [tool("twist"), "filecache"],
}


def start_failing(runner: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Start the daemon with C{args} under C{runner}, expecting it to stop at once."""
    folder = tmp_path / "shared"
    folder.mkdir(exist_ok=True)
    return subprocess.run(
        [*RUNNERS[runner](tmp_path), "--dir", str(folder), *args],
        check=False,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=20,  # it kills the process when it expires
    )


def assert_one_line(result: subprocess.CompletedProcess[str], expected: str | re.Pattern[str]) -> None:
    """Exit status 1, and stderr is exactly one line, the expected one; no traceback anywhere."""
    assert result.returncode == 1, (result.returncode, result.stderr, result.stdout)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and result.stderr.endswith("\n"), result.stderr
    if isinstance(expected, str):
        assert lines[0] == expected
    else:
        assert expected.fullmatch(lines[0]), lines[0]
    assert "Traceback" not in result.stdout


@pytest.mark.system
@pytest.mark.parametrize("runner", ["twistd", "twist"])
def test_unknown_endpoint_type(tmp_path: Path, runner: str) -> None:
    """--port tpc:5601 (a typo) says so in one line and exits 1."""
    result = start_failing(runner, tmp_path, "--port", "tpc:5601")
    assert_one_line(
        result,
        re.compile(r"filecache: --port tpc:5601: unknown endpoint type 'tpc' \(known: [a-z0-9, ]+; or a bare port number\)"),
    )


@pytest.mark.system
@pytest.mark.parametrize("runner", ["twistd", "twist"])
def test_port_out_of_range(tmp_path: Path, runner: str) -> None:
    """--port 99999 says it is not a port number in one line and exits 1."""
    result = start_failing(runner, tmp_path, "--port", "99999")
    assert_one_line(result, "filecache: --port 99999: '99999' is not a port number (0 to 65535)")


@pytest.mark.system
@pytest.mark.parametrize("runner", ["twistd", "twist"])
def test_interface_that_is_no_address(tmp_path: Path, runner: str) -> None:
    """--port tcp:5601:interface=256.1.1.1 says the interface is no IP address, in one line, exit 1."""
    result = start_failing(runner, tmp_path, "--port", "tcp:5601:interface=256.1.1.1")
    assert_one_line(
        result, "filecache: --port tcp:5601:interface=256.1.1.1: '256.1.1.1' is not an IP address"
    )


@pytest.mark.system
@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("runner", ["twistd", "twistd-pidfile", "twist"])
def test_port_in_use(tmp_path: Path, daemon: Daemon, runner: str, workers: str) -> None:
    """
    A second daemon on the port of a running one says "address already in
    use" in one line and exits 1, with or without --workers (which used to
    log a traceback and then idle without a port), leaves no pidfile, and
    the first daemon goes on serving.
    """
    port = f"tcp:{daemon.port}:interface=127.0.0.1"
    result = start_failing(runner, tmp_path, "--port", port, "--workers", workers)
    assert_one_line(result, f"filecache: cannot listen on {port}: address already in use")
    assert not (tmp_path / "fc.pid").exists()
    client = RawClient(daemon.port)
    try:
        assert client.rows(b"LIST")[0].startswith(b"OK")
    finally:
        client.close()


@pytest.mark.system
@pytest.mark.parametrize("runner", ["twistd", "twistd-pidfile", "twist"])
def test_interface_not_on_this_machine(tmp_path: Path, runner: str) -> None:
    """
    An interface address no interface here has (192.0.2.1, TEST-NET-1) is
    found only by the listen: one line, exit 1, no pidfile left.
    """
    port = "tcp:0:interface=192.0.2.1"
    result = start_failing(runner, tmp_path, "--port", port)
    assert_one_line(
        result, f"filecache: cannot listen on {port}: no interface of this machine has the address '192.0.2.1'"
    )
    assert not (tmp_path / "fc.pid").exists()
