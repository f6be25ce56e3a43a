"""
Limits and timeouts in memory, on an injected clock: idle connections,
request lines that never end, stalled replies, connection limits, the
allow-list, and the options that set them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from filecache.daemon.admission import parse_allow
from filecache.daemon.cache import FifoCache
from filecache.daemon.config import endpoint_description, parse_size
from filecache.daemon.folder import SharedFolder
from filecache.daemon.native import FileCacheFactory
from filecache.daemon.responder import Responder
from filecache.daemon.startup import ConfigError
from filecache.daemon.tap import Options


class AbortableTransport(StringTransport):
    """A StringTransport that records an abort apart from a polite close."""

    aborted = False

    def abortConnection(self) -> None:
        self.aborted = True
        self.loseConnection()


def make_factory(root: Path, clock: Clock, **limits: object) -> FileCacheFactory:
    server = Responder(SharedFolder(str(root)), FifoCache(1 << 20), settle=0)
    return FileCacheFactory(server, clock=clock, access_log=False, **limits)  # type: ignore[arg-type]


def connect(
    factory: FileCacheFactory, host: str = "10.0.0.1", port: int = 1000
) -> tuple[Protocol, AbortableTransport]:
    address = IPv4Address("TCP", host, port)
    proto = factory.buildProtocol(address)
    # Every caller is let in: a peer outside the allow-list gets no protocol.
    assert proto is not None
    transport = AbortableTransport(peerAddress=address)
    proto.makeConnection(transport)
    return proto, transport


def test_idle_connection_is_closed_on_time(tmp_path: Path) -> None:
    """No request for idle_timeout seconds: a polite close, not before."""
    clock = Clock()
    factory = make_factory(tmp_path, clock, idle_timeout=120)
    _proto, transport = connect(factory)
    clock.advance(119)
    assert not transport.disconnecting
    clock.advance(1)
    assert transport.disconnecting and not transport.aborted


def test_each_request_restarts_the_idle_timer(tmp_path: Path) -> None:
    """A request every 100 s keeps a 120 s timeout from firing."""
    (tmp_path / "a.txt").write_bytes(b"a")
    clock = Clock()
    factory = make_factory(tmp_path, clock, idle_timeout=120)
    proto, transport = connect(factory)
    for _ in range(5):
        clock.advance(100)
        proto.dataReceived(b"GET a.txt\r\n")
    assert not transport.disconnecting
    clock.advance(120)
    assert transport.disconnecting


def test_a_line_dripped_byte_by_byte_does_not_keep_the_connection(tmp_path: Path) -> None:
    """Bytes that only lengthen an unfinished line do not postpone the timeout."""
    clock = Clock()
    factory = make_factory(tmp_path, clock, idle_timeout=10)
    proto, transport = connect(factory)
    for byte in b"GET aaaaaaaa":
        clock.advance(1)
        proto.dataReceived(bytes([byte]))
        if transport.disconnecting:
            break
    assert transport.disconnecting
    assert clock.seconds() == 10


def test_stalled_reply_is_aborted(tmp_path: Path) -> None:
    """A streamed reply the client takes nothing of is aborted after the timeout."""
    (tmp_path / "big.bin").write_bytes(b"x" * 1_000_000)
    clock = Clock()
    factory = make_factory(tmp_path, clock, idle_timeout=30)
    proto, transport = connect(factory)
    proto.dataReceived(b"GET big.bin\r\n")
    assert transport.producer is not None  # streaming, and nobody drives it
    clock.advance(29)
    assert not transport.aborted
    clock.advance(1)
    assert transport.aborted


def test_progress_of_a_reply_restarts_the_timer(tmp_path: Path) -> None:
    """Every chunk the client takes postpones the stall timeout."""
    (tmp_path / "big.bin").write_bytes(b"x" * 1_000_000)
    clock = Clock()
    factory = make_factory(tmp_path, clock, idle_timeout=30)
    proto, transport = connect(factory)
    proto.dataReceived(b"GET big.bin\r\n")
    steps = 0
    while b"END " not in transport.value() and steps < 1000:
        clock.advance(20)
        assert transport.producer is not None
        transport.producer.resumeProducing()
        steps += 1
    assert 5 < steps < 1000
    assert not transport.aborted
    assert transport.value().endswith(b"\r\n") and b"END " in transport.value()


def test_no_timeout_when_zero(tmp_path: Path) -> None:
    """idle_timeout None (--idle-timeout 0) never closes anything."""
    clock = Clock()
    factory = make_factory(tmp_path, clock, idle_timeout=None)
    _proto, transport = connect(factory)
    clock.advance(10**6)
    assert not transport.disconnecting
    assert clock.getDelayedCalls() == []


def test_max_connections_and_per_address(tmp_path: Path) -> None:
    """
    One over max_per_ip or max_connections gets ERR busy and is closed; a
    slot freed is reused.  With HTTP served too, the refusal answers the
    first line (docs/http.md); with --no-http, it comes at once.
    """
    clock = Clock()
    factory = make_factory(tmp_path, clock, max_connections=3, max_per_ip=2)
    a1 = connect(factory, "10.0.0.1", 1)
    connect(factory, "10.0.0.1", 2)
    refused, over = connect(factory, "10.0.0.1", 3)
    refused.dataReceived(b"GET a.txt\r\n")
    assert over.value() == b"ERR busy too many connections from your address; try again later\r\n"
    assert over.disconnecting
    connect(factory, "10.0.0.2", 1)
    _, full = connect(factory, "10.0.0.3", 1)
    assert full.value() == b""
    clock.advance(1)  # no line within a second: refused natively
    assert full.value() == b"ERR busy too many connections; try again later\r\n"
    native_only = make_factory(tmp_path, clock, max_connections=1, http=False)
    connect(native_only, "10.0.0.1", 1)
    _, at_once = connect(native_only, "10.0.0.1", 2)
    assert at_once.value() == b"ERR busy too many connections; try again later\r\n"
    assert factory.admission.connections_active == 3
    # FileCacheProtocol.connectionLost defaults its reason to None, but
    # declares it a Failure, as Protocol does.
    a1[0].connectionLost(None)  # type: ignore[arg-type]
    _proto, fresh = connect(factory, "10.0.0.1", 4)
    assert fresh.value() == b""
    assert not fresh.disconnecting


def test_allow_list(tmp_path: Path) -> None:
    """Addresses outside --allow get no protocol at all (closed unread); IPv4-mapped IPv6 counts as IPv4."""
    clock = Clock()
    factory = make_factory(tmp_path, clock, allow=parse_allow("10.0.0.0/8, 2001:db8::/32"))
    assert factory.buildProtocol(IPv4Address("TCP", "10.1.2.3", 1)) is not None
    assert factory.buildProtocol(IPv4Address("TCP", "192.168.1.1", 1)) is None
    assert factory.buildProtocol(IPv6Address("TCP", "2001:db8::1", 1)) is not None
    assert factory.buildProtocol(IPv6Address("TCP", "::ffff:10.9.9.9", 1)) is not None
    assert factory.buildProtocol(IPv6Address("TCP", "::1", 1)) is None
    # Not an IP peer: the allow-list does not apply.
    assert factory.buildProtocol(UNIXAddress(b"/run/fc.sock")) is not None


def test_option_parsing(tmp_path: Path) -> None:
    """Sizes, ports and limits are read as documented; bad values end with one line."""
    assert parse_size("64M") == 64 << 20
    assert parse_size("512k") == 512 << 10
    assert parse_size("1GiB") == 1 << 30
    assert parse_size("100") == 100
    with pytest.raises(ValueError):
        parse_size("lots")
    assert endpoint_description("5000") == "tcp:5000:backlog=1024"
    assert endpoint_description("tcp:5000:backlog=10") == "tcp:5000:backlog=10"
    assert endpoint_description("unix:/run/fc.sock") == "unix:/run/fc.sock"
    options = Options()
    options.parseOptions(["--dir", str(tmp_path), "--idle-timeout", "0", "--allow", "10.0.0.0/8"])
    config = options.config
    assert config.idle_timeout is None
    assert config.max_connections == 1024 and config.max_per_ip == 64
    assert config.drain_timeout == 30
    assert config.port == "tcp:5000:backlog=1024"
    with pytest.raises(ConfigError, match="--allow"):
        Options().parseOptions(["--dir", str(tmp_path), "--allow", "nonsense"])
    with pytest.raises(ConfigError, match="--cache-size"):
        Options().parseOptions(["--dir", str(tmp_path), "--cache-size", "big"])


def test_workers_get_every_option_from_the_config(tmp_path: Path) -> None:
    """
    config.to_argv() gives a worker exactly the parent's settings: parsed
    again (as a worker parses it), it makes the same configuration, but for
    the fields that belong to the parent alone (issue 9).
    """
    from dataclasses import replace

    options = Options()
    options.parseOptions([
        "--dir", str(tmp_path), "--cache-size", "3M", "--idle-timeout", "7.5",
        "--drain-timeout", "4", "--max-connections", "9", "--max-per-ip", "3",
        "--allow", "10.0.0.0/8,::ffff:127.0.0.1", "--no-access-log", "--workers", "3",
        "--port", "tcp:0:interface=127.0.0.1", "--trusted-proxy", "10.1.2.3",
        "--freshness", "stat",
    ])
    parent = options.config
    worker = Options()
    worker.parseOptions([*parent.to_argv(), "--inherit-fd", "5:2", "--inherit-fd", "6:10:proxy",
                         "--worker-index", "2"])
    assert worker.config == replace(
        parent, ports=worker.config.ports, port_texts=worker.config.port_texts, workers=1,
        inherit_fds=((5, 2, False), (6, 10, True)), worker_index=2,
    )
    assert worker.config.trusted_proxies is not None and worker.config.freshness == "stat"
    assert worker.config.cache_size == 3 << 20 and worker.config.access_log is False
