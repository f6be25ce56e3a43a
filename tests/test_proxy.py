"""
PROXY protocol ports (haproxy:...) in memory: connections admitted, counted
and logged by the client's address the header gives, through Twisted's own
PROXY wrapper; the proxies that may send one; and the direct write path
beneath the wrapper.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransportWithDisconnection
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.protocols.haproxy import proxyEndpoint
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

from filecache.daemon.admission import parse_allow
from filecache.daemon.cache import FifoCache
from filecache.daemon.folder import SharedFolder
from filecache.daemon.native import FileCacheFactory
from filecache.daemon.responder import Responder
from filecache.daemon.sockets import unwrapped

PROXY = IPv4Address("TCP", "10.9.9.9", 40000)


@implementer(IStreamServerEndpoint)
class CapturingEndpoint:
    """An endpoint that only keeps the factory it is asked to listen with."""

    factory: Any = None

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        self.factory = factory
        return succeed(None)  # type: ignore[arg-type]


def proxy_port(factory: FileCacheFactory) -> Any:
    """The factory Twisted's haproxy: endpoint puts in front of ours (the public way to get it)."""
    endpoint = CapturingEndpoint()
    proxyEndpoint(endpoint).listen(factory.behind_proxy())
    return endpoint.factory


class Transport(StringTransportWithDisconnection):
    def abortConnection(self) -> None:
        self.loseConnection()


def header(client: str, port: int = 5555) -> bytes:
    return f"PROXY TCP4 {client} 10.0.0.1 {port} 5000\r\n".encode()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "a.txt").write_bytes(b"hello")
    return shared


def make(root: Path, **kwargs: Any) -> FileCacheFactory:
    clock = Clock()
    responder = Responder(SharedFolder(str(root)), FifoCache(1 << 20), reactor=clock, settle=0)
    return FileCacheFactory(responder, clock=clock, access_log=False, **kwargs)


def connect(port: Any, peer: IPv4Address = PROXY) -> tuple[Any, Transport]:
    proto = port.buildProtocol(peer)
    transport = Transport()
    transport.peerAddr = peer
    transport.protocol = proto
    proto.makeConnection(transport)
    return proto, transport


@pytest.fixture
def logged() -> Iterator[list[str]]:
    lines: list[str] = []

    @implementer(ILogObserver)
    def observe(event: LogEvent) -> None:
        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


def test_each_client_is_counted_under_its_own_address_and_uncounted_under_it(root: Path) -> None:
    """
    The defect: a connection was counted under the proxy's address when it
    opened and uncounted under the client's when it closed, so the proxy's
    count only grew and, after a few, everyone was refused for good.  Now
    --max-per-ip 2 holds per client behind the proxy, and closing frees it.
    """
    factory = make(root, max_per_ip=2)
    port = proxy_port(factory)
    for _ in range(3):  # rounds: nothing is left counted after a round
        ours = [connect(port) for _ in range(2)]
        for _, t in ours:
            t.protocol.dataReceived(header("192.0.2.7") + b"GET a.txt 0\r\n")
            assert t.value().startswith(b"OK 5 "), t.value()
        third, t3 = connect(port)
        third.dataReceived(header("192.0.2.7") + b"GET a.txt 0\r\n")
        assert t3.value().startswith(b"ERR busy "), t3.value()
        other, t4 = connect(port)
        other.dataReceived(header("192.0.2.8") + b"GET a.txt 0\r\n")
        assert t4.value().startswith(b"OK 5 ")
        assert factory.admission.connections_active == 3
        for _, t in [*ours, (third, t3), (other, t4)]:
            t.loseConnection()
        assert factory.admission.connections_active == 0
        assert dict(factory.admission._per_host) == {}


def test_an_http_client_past_the_limit_behind_the_proxy_gets_503(root: Path) -> None:
    """The refusal behind a proxy speaks the protocol of the first line, as a direct one does."""
    factory = make(root, max_per_ip=1)
    port = proxy_port(factory)
    first, t1 = connect(port)
    first.dataReceived(header("192.0.2.7") + b"GET /a.txt HTTP/1.1\r\nHost: x\r\n\r\n")
    assert t1.value().startswith(b"HTTP/1.1 200 ")
    second, t2 = connect(port)
    second.dataReceived(header("192.0.2.7") + b"GET /a.txt HTTP/1.1\r\nHost: x\r\n\r\n")
    assert t2.value().startswith(b"HTTP/1.1 503 ") and b"Retry-After: 1\r\n" in t2.value()
    assert not t2.connected


def test_allow_refuses_by_the_clients_address(root: Path, logged: list[str]) -> None:
    """--allow behind a proxy: the client's address decides, not the proxy's; refusals logged once."""
    factory = make(root, allow=parse_allow("192.0.2.0/24"))
    port = proxy_port(factory)
    for _ in range(2):
        proto, t = connect(port)
        proto.dataReceived(header("198.51.100.1") + b"GET a.txt 0\r\n")
        assert t.value() == b"" and not t.connected
    proto, t = connect(port)
    proto.dataReceived(header("192.0.2.7") + b"GET a.txt 0\r\n")
    assert t.value().startswith(b"OK 5 ")
    refusals = [line for line in logged if "198.51.100.1" in line]
    assert refusals == ["refused connection from 198.51.100.1: not in --allow"]
    assert factory.admission.connections_active == 1


def test_the_peer_in_logs_is_the_client(root: Path) -> None:
    """What the access log names as the peer is the client the header gave."""
    factory = make(root)
    port = proxy_port(factory)
    proto, _t = connect(port)
    proto.dataReceived(header("192.0.2.7", 4242) + b"GET a.txt 0\r\n")
    assert proto.wrappedProtocol.peer == "192.0.2.7:4242"


def test_no_valid_header_is_closed_and_logged_once_per_address(root: Path, logged: list[str]) -> None:
    """A connection to a PROXY port without a valid header is closed, uncounted, logged once."""
    factory = make(root)
    port = proxy_port(factory)
    for data in (b"GET a.txt 0\r\n", b"PROXY TCP4 nonsense\r\n", b""):
        proto, t = connect(port)
        if data:
            proto.dataReceived(data)
        t.loseConnection()
        assert t.value() == b""
    assert factory.admission.connections_active == 0
    noted = [line for line in logged if "PROXY" in line]
    assert noted == ["closed connection from 10.9.9.9: no valid PROXY protocol header"]


def test_only_trusted_proxies_may_send_a_header(root: Path, logged: list[str]) -> None:
    """--trusted-proxy: a peer outside it is closed at once, its header never read."""
    factory = make(root, trusted_proxies=parse_allow("10.9.9.0/24"))
    port = proxy_port(factory)
    stranger = IPv4Address("TCP", "203.0.113.5", 40000)
    proto, t = connect(port, stranger)
    assert not t.connected
    proto, t = connect(port)
    proto.dataReceived(header("192.0.2.7") + b"GET a.txt 0\r\n")
    assert t.value().startswith(b"OK 5 ")
    assert [line for line in logged if "203.0.113.5" in line] == [
        "refused connection from 203.0.113.5: not a --trusted-proxy"
    ]


def test_the_direct_path_looks_beneath_the_proxy_wrapper_but_not_tls() -> None:
    """unwrapped(): through a PROXY wrapper (writes pass unchanged) to its transport; never through TLS."""
    factory = make(Path("."))
    proto, t = connect(proxy_port(factory))
    assert isinstance(proto, ProtocolWrapper)
    assert unwrapped(proto) is t

    class Changing(ProtocolWrapper):
        """A wrapper that changes what is written, as TLS does."""

        def write(self, data: bytes) -> None:
            super().write(data.upper())

    changing = Changing(proto.factory, proto.wrappedProtocol)
    changing.transport = t
    assert unwrapped(changing) is changing
    assert TLSMemoryBIOProtocol.write is not ProtocolWrapper.write  # so TLS is never looked beneath
