"""
The daemon's side of the connection: a thin adapter that turns request lines
into calls on L{Responder} and streams its replies back, one at a time.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import socket
import struct
import termios
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import (
    IAddress,
    IConsumer,
    IDelayedCall,
    IPushProducer,
    IReactorTime,
    ITCPTransport,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from filecache import wire
from filecache.daemon.listing import ListBody, ListResult
from filecache.daemon.responder import (
    DiskBody,
    MemoryBody,
    Reply,
    Responder,
    error_reply,
)
from filecache.daemon.transfer import (
    TransferFailed,
    TransferResult,
    direct_socket,
    send_file,
    send_memory,
    write_now,
)


def describe_peer(address: IAddress) -> str:
    """C{host:port} of a TCP peer, or the address's own text for others."""
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is not None and port is not None:
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    name = getattr(address, "name", None)
    if isinstance(name, bytes):
        name = os.fsdecode(name)
    return name or type(address).__name__


def unsent_bytes(sock: socket.socket | None) -> int | None:
    """
    The bytes still waiting in the kernel's send queue of C{sock}
    (C{SIOCOUTQ}, Linux), or C{None} where that cannot be asked.  When it
    shrinks, the peer is taking bytes, even while the socket is not yet
    reported writable again.
    """
    if sock is None:
        return None
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except (OSError, ValueError):
        return None
    value: int = struct.unpack("i", raw)[0]
    return value


class _IConnection(ITCPTransport, IConsumer):
    """
    What a daemon connection's transport is, for the type checker: TCP, UNIX
    and TLS transports all have the methods of both interfaces.
    """


@implementer(IPushProducer)
class _SendBufferGate:
    """
    Registered on the transport between streamed replies, so that a client
    who sends requests without reading the replies is no longer read from
    once Twisted's send buffer fills.
    """

    def __init__(self, protocol: FileCacheProtocol) -> None:
        self._protocol = protocol

    def pauseProducing(self) -> None:
        self._protocol._set_backpressure(True)

    def resumeProducing(self) -> None:
        self._protocol.resetTimeout()
        self._protocol._set_backpressure(False)

    def stopProducing(self) -> None:
        pass


class FileCacheProtocol(LineReceiver, TimeoutMixin):
    """
    One client connection of the filecache daemon.

    Its timer runs for the factory's C{idle_timeout}: it is reset by every
    byte received and by every step a reply makes; when it fires, an idle
    connection is closed and a stuck reply is aborted.
    """

    delimiter = b"\n"
    # A request line may be MAX_LINE bytes plus the \r of a \r\n.
    MAX_LENGTH = wire.MAX_LINE + 1

    factory: FileCacheFactory
    # Set by makeConnection, before any of our methods that use it run.
    transport: _IConnection
    _log = Logger()

    def __init__(self) -> None:
        self._replying = False
        self._backpressure = False
        self._lines = 0
        self._socket: socket.socket | None = None
        # The plain socket under the transport (TLS included), for asking
        # the kernel whether a slow reader is still reading.
        self._queue_socket: socket.socket | None = None
        self._unsent: int | None = None
        self._pending: Deferred[Reply] | None = None
        self._gate = _SendBufferGate(self)
        self.peer = "-"

    # Reading, paused while a reply is under way or the send buffer is full.

    def _set_backpressure(self, on: bool) -> None:
        self._backpressure = on
        self._update_reading()

    def _set_replying(self, on: bool) -> None:
        self._replying = on
        if not on and self.factory.draining:
            # Shutting down: this reply was the last one.
            self.transport.loseConnection()
            return
        self._update_reading()

    @property
    def replying(self) -> bool:
        """Whether a reply is under way (waited for or being sent)."""
        return self._replying

    def _update_reading(self) -> None:
        hold = self._replying or self._backpressure
        if hold and not self.paused:
            self.pauseProducing()
        elif not hold and self.paused and self.transport is not None:
            self.resumeProducing()

    # Connection events

    def connectionMade(self) -> None:
        factory = self.factory
        self._socket = direct_socket(self.transport)
        self._queue_socket = _plain_socket(self.transport)
        self.peer = describe_peer(self.transport.getPeer())
        factory.connection_made(self)
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            # A status line, a body sent by the kernel and an END line are
            # separate segments: Nagle would hold the last one back.
            try:
                set_no_delay(True)
            except OSError:
                pass
        self.transport.registerProducer(self._gate, True)
        self.setTimeout(factory.idle_timeout)

    def callLater(self, period: float, func: Callable[[], object]) -> IDelayedCall:
        # TimeoutMixin's timer runs on the factory's clock.
        return self.factory.clock.callLater(period, func)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.connected = False
        self.setTimeout(None)
        pending, self._pending = self._pending, None
        if pending is not None:
            # Disk work for a client who has gone is dropped before it runs.
            pending.cancel()
        self.factory.connection_lost(self)

    def dataReceived(self, data: bytes) -> None:
        # Bytes that only lengthen an unfinished line do not postpone the
        # timer: a request line must arrive whole within the timeout, so a
        # client sending a byte a second cannot hold a connection forever.
        lines = self._lines
        super().dataReceived(data)
        if self._lines != lines or not self._buffer:
            self.resetTimeout()

    def _progressed(self) -> None:
        """A reply made a step: restart the timer, note the kernel's queue."""
        self.resetTimeout()
        self._unsent = unsent_bytes(self._queue_socket)

    def timeoutConnection(self) -> None:
        stuck = self._replying or self._backpressure
        if stuck and self._pending is None:
            unsent = unsent_bytes(self._queue_socket)
            if unsent is not None and self._unsent is not None and unsent < self._unsent:
                # The kernel's queue shrank: the client is reading, only
                # slower than the socket reports writability.
                self._unsent = unsent
                self.setTimeout(self.factory.idle_timeout)
                return
        self._log.info(
            "{peer}: {what} for {seconds} s; closing",
            peer=self.peer,
            what="reply not read" if stuck else "idle",
            seconds=self.factory.idle_timeout,
        )
        if stuck:
            # A polite close would wait on a send buffer that never drains.
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()

    def lineLengthExceeded(self, line: bytes) -> None:
        self.factory.responder.counters.requests += 1
        reply = error_reply(wire.TOO_LONG, f"request line longer than {wire.MAX_LINE} bytes")
        self.transport.write(reply.data)
        self._access(b"(too long)", reply, self.factory.clock.seconds())
        self.transport.loseConnection()

    def lineReceived(self, line: bytes) -> None:
        self._lines += 1
        factory = self.factory
        factory.responder.counters.requests += 1
        started = factory.clock.seconds() if factory.access_log else 0.0
        try:
            request = wire.parse_request(line)
        except wire.WireError as e:
            self._finish_simple(line, error_reply(e.code, e.message), started)
            if e.code == wire.TOO_LONG:
                self.transport.loseConnection()
            return
        if isinstance(request, wire.QuitRequest):
            self.transport.loseConnection()
            return
        try:
            reply = factory.responder.respond(request)
        except Exception:  # noqa: BLE001 - logged, and the client told
            self._log.failure("Error answering {request!r}", request=line[:200])
            reply = error_reply(wire.UNAVAILABLE, "internal error")
        if isinstance(reply, Deferred):
            self._set_replying(True)
            self._pending = reply
            reply.addCallbacks(
                self._deliver,
                self._internal_error,
                callbackArgs=(line, started),
                errbackArgs=(line, started),
            )
        else:
            self._deliver(reply, line, started)

    def _internal_error(self, reason: Failure, line: bytes, started: float) -> None:
        self._pending = None
        if reason.check(CancelledError):
            return  # the client left while its answer was being worked out
        self._log.failure("Error answering {request!r}", reason, request=wire.printable_bytes(line[:200]))
        self._deliver(error_reply(wire.UNAVAILABLE, "internal error"), line, started)

    # Replies

    def _deliver(self, reply: Reply, line: bytes, started: float) -> None:
        self._pending = None
        if reply.body is None:
            self._finish_simple(line, reply, started)
            return
        if self.transport is None or not self.connected:
            self.factory.responder.body_failed(reply.body)
            return
        self._set_replying(True)
        transport = self.transport
        # The gate comes off before the status line is written: a pause the
        # transport gave it now would never be lifted (the body's producer
        # is resumed instead), and reading is held by _replying meanwhile.
        transport.unregisterProducer()
        self._backpressure = False
        transport.write(reply.data)
        self._progressed()
        body = reply.body
        if isinstance(body, ListBody):
            body.send(
                transport,
                on_progress=self._progressed,
                unsent=lambda: unsent_bytes(self._queue_socket),
                call_later=self.factory.clock.callLater,
            ).addCallbacks(
                self._list_sent,
                self._body_failed,
                callbackArgs=(reply, line, started),
                errbackArgs=(body, reply, line, started),
            )
            return
        d: Deferred[TransferResult]
        if isinstance(body, MemoryBody):
            d = send_memory(
                transport, body.data, body.start, on_progress=self._progressed
            ).addCallback(TransferResult)
        else:
            d = send_file(
                transport,
                body.opened.fd,
                body.start,
                body.length,
                digest_known=body.digest is not None,
                collect=body.fill,
                on_progress=self._progressed,
            )
        d.addCallbacks(
            self._body_sent,
            self._body_failed,
            callbackArgs=(body, reply, line, started),
            errbackArgs=(body, reply, line, started),
        )

    def _finish_simple(self, line: bytes, reply: Reply, started: float) -> None:
        if self.transport is None or not self.connected:
            return
        write_now(self.transport, reply.data, self._socket)
        self.factory.responder.counters.bytes_sent += reply.size
        self._access(line, reply, started)
        if self._replying:
            self.resetTimeout()
            self._set_replying(False)

    def _list_sent(self, result: ListResult, reply: Reply, line: bytes, started: float) -> None:
        self.transport.registerProducer(self._gate, True)
        status = "OK" if result.error is None else "ERR " + wire.UNAVAILABLE
        self._access(line, reply, started, status, result.sent)
        self.resetTimeout()
        self._set_replying(False)

    def _body_sent(
        self,
        result: TransferResult,
        body: MemoryBody | DiskBody,
        reply: Reply,
        line: bytes,
        started: float,
    ) -> None:
        responder = self.factory.responder
        digest = responder.body_sent(body, result)
        if digest is None:
            # Changed on disk while being sent: cut the reply short rather
            # than end it with a digest the client would take as good.
            self._log.warn(
                "{path} changed while being sent to {peer}; connection dropped",
                path=line[4:200],
                peer=self.peer,
            )
            responder.counters.bytes_sent += result.sent
            self._access(line, reply, started, "cut", result.sent)
            self.transport.abortConnection()
            return
        responder.counters.bytes_sent += result.sent
        self.transport.registerProducer(self._gate, True)
        self.transport.write(wire.format_end(digest))
        self._access(line, reply, started)
        self.resetTimeout()
        self._set_replying(False)

    def _body_failed(
        self,
        reason: Failure,
        body: MemoryBody | DiskBody | ListBody,
        reply: Reply,
        line: bytes,
        started: float,
    ) -> None:
        self.factory.responder.body_failed(body)
        sent = reason.value.sent if isinstance(reason.value, TransferFailed) else 0
        if not isinstance(body, ListBody):
            self.factory.responder.counters.bytes_sent += sent
        self._access(line, reply, started, "cut", sent)
        if self.transport is not None and self.connected:
            self.transport.abortConnection()

    def _access(
        self, line: bytes, reply: Reply, started: float, status: str = "", size: int | None = None
    ) -> None:
        factory = self.factory
        if not factory.access_log:
            return
        self._log.info(
            "{peer} {request} {status} {size} {seconds:.6f} {cache}",
            peer=self.peer,
            # Escaped: a request line must not be able to forge log lines.
            request=wire.printable_bytes(line[:200].rstrip(b"\r")),
            status=status or reply.status,
            size=reply.size if size is None else size,
            seconds=factory.clock.seconds() - started,
            cache=reply.cache,
        )


def _plain_socket(transport: object) -> socket.socket | None:
    """The socket under a TCP transport, TLS or not, if it has one."""
    for candidate in (transport, getattr(transport, "transport", None)):
        sock = getattr(candidate, "socket", None)
        if isinstance(sock, socket.socket):
            return sock
    return None


class _Refusal(Protocol):
    """Says C{ERR busy ...} and hangs up: the answer past a connection limit."""

    transport: ITransport

    def __init__(self, message: str) -> None:
        self._message = message

    def connectionMade(self) -> None:
        self.transport.write(wire.format_error(wire.BUSY, self._message))
        self.transport.loseConnection()


_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def parse_allow(text: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """
    Networks from C{10.0.0.0/8,192.168.1.7,::1}.  IPv4-mapped IPv6 entries
    (C{::ffff:10.0.0.0/104}) are turned into the IPv4 networks they stand
    for, as peers on a dual-stack socket are, so both meet in one form.

    @raise ValueError: on anything that is not an address or network.
    """
    networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for part in text.split(","):
        part = part.strip()
        if part:
            networks.extend(_normalised(ipaddress.ip_network(part, strict=False)))
    if not networks:
        raise ValueError("empty allow-list")
    return networks


def _normalised(
    network: ipaddress.IPv4Network | ipaddress.IPv6Network,
) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    if isinstance(network, ipaddress.IPv4Network):
        return [network]
    if network.subnet_of(_MAPPED):
        mapped = network.network_address.ipv4_mapped
        assert mapped is not None
        return [ipaddress.IPv4Network((mapped, network.prefixlen - 96))]
    if network.supernet_of(_MAPPED):
        # ::/0 and the like hold every mapped address: all of IPv4 too.
        return [network, ipaddress.IPv4Network("0.0.0.0/0")]
    return [network]


if TYPE_CHECKING:
    _ProtocolFactory = Factory[Protocol]
else:
    # Twisted 23.10, the oldest we support, cannot subscript Factory at run
    # time; newer releases type it by the protocols it builds.
    _ProtocolFactory = Factory


class FileCacheFactory(_ProtocolFactory):
    """
    Builds L{FileCacheProtocol}s that share one L{Responder}, within
    the connection limits and the allow-list.
    """

    protocol = FileCacheProtocol
    noisy = False
    _log = Logger()
    _REMEMBERED_REFUSALS = 10_000

    def __init__(
        self,
        responder: Responder,
        *,
        clock: IReactorTime | None = None,
        access_log: bool = True,
        idle_timeout: float | None = 120,
        max_connections: int = 1024,
        max_per_ip: int = 64,
        allow: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network] | None = None,
    ) -> None:
        if clock is None:
            from twisted.internet import reactor

            clock = reactor
        self.responder = responder
        self.clock: IReactorTime = clock
        self.access_log = access_log
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.max_per_ip = max_per_ip
        self.allow = list(allow) if allow is not None else None
        self._per_host: Counter[str] = Counter()
        self._refused_hosts: set[str] = set()
        self._live: set[FileCacheProtocol] = set()
        self.draining = False
        self._drained: Deferred[None] | None = None

    def _allowed(self, host: str) -> bool:
        assert self.allow is not None
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(address in network for network in self.allow)

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        host = getattr(addr, "host", None)
        if self.allow is not None and host is not None and not self._allowed(host):
            if host not in self._refused_hosts:
                # Once per address, so a flood cannot flood the log too.
                if len(self._refused_hosts) < self._REMEMBERED_REFUSALS:
                    self._refused_hosts.add(host)
                self._log.warn("refused connection from {host}: not in --allow", host=host)
            return None
        key = host or "local"
        if self.responder.counters.connections_active >= self.max_connections:
            return _Refusal("too many connections; try again later")
        if self._per_host[key] >= self.max_per_ip:
            return _Refusal("too many connections from your address; try again later")
        return super().buildProtocol(addr)

    def connection_made(self, protocol: FileCacheProtocol) -> None:
        self._live.add(protocol)
        counters = self.responder.counters
        counters.connections_active += 1
        counters.connections_total += 1
        self._per_host[self._host_of(protocol)] += 1

    def connection_lost(self, protocol: FileCacheProtocol) -> None:
        self._live.discard(protocol)
        if self._drained is not None and not self._live:
            drained, self._drained = self._drained, None
            drained.callback(None)
        self.responder.counters.connections_active -= 1
        key = self._host_of(protocol)
        self._per_host[key] -= 1
        if self._per_host[key] <= 0:
            del self._per_host[key]

    @staticmethod
    def _host_of(protocol: FileCacheProtocol) -> str:
        return getattr(protocol.transport.getPeer(), "host", None) or "local"

    def drain(self, timeout: float) -> Deferred[None]:
        """
        Close idle connections now, and the others as soon as their reply
        is sent; abort whatever is left after C{timeout} seconds.  Fires when
        no connection is left.
        """
        self.draining = True
        if not self._live:
            return succeed(None)
        drained: Deferred[None] = Deferred()
        self._drained = drained
        busy = 0
        for protocol in list(self._live):
            if protocol.replying:
                busy += 1
            else:
                protocol.transport.loseConnection()
        self._log.info(
            "draining: {busy} replies in flight, up to {timeout} s", busy=busy, timeout=timeout
        )

        def give_up() -> None:
            if self._live:
                self._log.warn(
                    "drain timeout: aborting {count} connections", count=len(self._live)
                )
            for protocol in list(self._live):
                protocol.transport.abortConnection()

        call = self.clock.callLater(timeout, give_up)

        def done(result: None) -> None:
            if call.active():
                call.cancel()

        drained.addCallback(done)
        return drained
