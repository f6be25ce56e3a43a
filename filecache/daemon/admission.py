"""
Who may connect, and how many at once: the allow-list, the connection
limits and their refusal, the connection figures, and the drain at shutdown.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any
from typing import Protocol as TypingProtocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime, ITransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from filecache import wire
from filecache.daemon.httphead import MAX_HEADER_LINE, is_request_line, starts_like_http
from filecache.daemon.httpreply import DateCache, error_response

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def parse_allow(text: str) -> list[Network]:
    """
    Networks from C{10.0.0.0/8,192.168.1.7,::1}.  IPv4-mapped IPv6 entries
    (C{::ffff:10.0.0.0/104}) are turned into the IPv4 networks they stand
    for, as peers on a dual-stack socket are, so both meet in one form.

    @raise ValueError: on anything that is not an address or network.
    """
    networks: list[Network] = []
    for part in text.split(","):
        part = part.strip()
        if part:
            networks.extend(_normalised(ipaddress.ip_network(part, strict=False)))
    if not networks:
        raise ValueError("empty allow-list")
    return networks


def _normalised(network: Network) -> list[Network]:
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


class Connection(TypingProtocol):
    """What admission needs of a connection it let in."""

    transport: Any

    @property
    def replying(self) -> bool:
        """Whether a reply is under way (the drain lets it finish)."""


REFUSAL_WAIT = 1.0
"""Seconds a refused connection is given to send its first line, so that it
is refused in its own protocol (HTTP or native)."""

REFUSALS_WAITING = 64
"""Refused connections waiting for their first line at once, at most; past
this, a refusal is the native one at once."""


class Refusal(Protocol):
    """
    The answer past a connection limit, then hang up: C{ERR busy ...} at
    once; or, with C{waiting} (HTTP is served too), in the protocol of the
    connection's first line once it arrives: C{503} for HTTP, C{ERR busy}
    otherwise (and after L{REFUSAL_WAIT} seconds without one).
    """

    transport: ITransport

    def __init__(self, message: str, waiting: _Waiting | None = None) -> None:
        self._message = message
        self._waiting = waiting
        self._buffer = b""
        self._timer: IDelayedCall | None = None
        self._answered = False

    def connectionMade(self) -> None:
        waiting = self._waiting
        if waiting is None or waiting.count >= REFUSALS_WAITING:
            self._answer(http=False)
            return
        waiting.count += 1
        self._timer = waiting.clock.callLater(REFUSAL_WAIT, self._answer, False)

    def dataReceived(self, data: bytes) -> None:
        if self._answered:
            return
        self._buffer += data
        line, newline, _ = self._buffer.partition(b"\n")
        if newline:
            self._answer(is_request_line(line))
        elif len(self._buffer) > MAX_HEADER_LINE:
            self._answer(starts_like_http(self._buffer))

    def _answer(self, http: bool) -> None:
        if self._answered:
            return
        self._answered = True
        self._stop_waiting()
        if http:
            assert self._waiting is not None
            self.transport.write(
                error_response(
                    503,
                    self._message,
                    date=self._waiting.dates.now(),
                    close=True,
                    extra=[("Retry-After", "1")],
                )
            )
        else:
            self.transport.write(wire.format_error(wire.BUSY, self._message))
        self.transport.loseConnection()

    def _stop_waiting(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None:
            if timer.active():
                timer.cancel()
            assert self._waiting is not None
            self._waiting.count -= 1

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._answered = True
        self._stop_waiting()


class _Waiting:
    """The refused connections waiting for their first line, and the clock they wait on."""

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self.dates = DateCache(clock.seconds)
        self.count = 0


def _host_of(connection: Connection) -> str:
    return getattr(connection.transport.getPeer(), "host", None) or "local"


class Admission:
    """
    Lets connections in within the allow-list and the limits, counts them,
    and drains them at shutdown.  A protocol adapter's factory asks
    L{build}; its connections report L{opened} and L{closed}.
    """

    _log = Logger()
    _REMEMBERED_REFUSALS = 10_000

    def __init__(
        self,
        clock: IReactorTime,
        *,
        max_connections: int = 1024,
        max_per_ip: int = 64,
        allow: Sequence[Network] | None = None,
        http: bool = False,
    ) -> None:
        self._clock = clock
        self._waiting = _Waiting(clock) if http else None
        self.max_connections = max_connections
        self.max_per_ip = max_per_ip
        self.allow = list(allow) if allow is not None else None
        self.connections_active = 0
        self.connections_total = 0
        self.draining = False
        self._per_host: Counter[str] = Counter()
        self._refused_hosts: set[str] = set()
        self._live: set[Connection] = set()
        self._drained: Deferred[None] | None = None

    def allowed(self, host: str) -> bool:
        """Whether C{host} (an address as text) is in the allow-list."""
        if self.allow is None:
            return True
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(address in network for network in self.allow)

    def build(self, addr: IAddress | None, make: Callable[[], Protocol | None]) -> Protocol | None:
        """
        C{make()} for a connection from C{addr} that may come in; a
        L{Refusal} past a limit; C{None} (closed with no reply) outside the
        allow-list.
        """
        host = getattr(addr, "host", None)
        if host is not None and not self.allowed(host):
            if host not in self._refused_hosts:
                # Once per address, so a flood cannot flood the log too.
                if len(self._refused_hosts) < self._REMEMBERED_REFUSALS:
                    self._refused_hosts.add(host)
                self._log.warn("refused connection from {host}: not in --allow", host=host)
            return None
        if self.connections_active >= self.max_connections:
            return Refusal("too many connections; try again later", self._waiting)
        if self._per_host[host or "local"] >= self.max_per_ip:
            return Refusal("too many connections from your address; try again later", self._waiting)
        return make()

    def opened(self, connection: Connection) -> None:
        self._live.add(connection)
        self.connections_active += 1
        self.connections_total += 1
        self._per_host[_host_of(connection)] += 1

    def closed(self, connection: Connection) -> None:
        self._live.discard(connection)
        if self._drained is not None and not self._live:
            drained, self._drained = self._drained, None
            drained.callback(None)
        self.connections_active -= 1
        key = _host_of(connection)
        self._per_host[key] -= 1
        if self._per_host[key] <= 0:
            del self._per_host[key]

    def figures(self) -> list[tuple[str, int]]:
        """The STATS rows that belong to connections."""
        return [
            ("connections_active", self.connections_active),
            ("connections_total", self.connections_total),
        ]

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
        for connection in list(self._live):
            if connection.replying:
                busy += 1
            else:
                connection.transport.loseConnection()
        self._log.info(
            "draining: {busy} replies in flight, up to {timeout} s", busy=busy, timeout=timeout
        )

        def give_up() -> None:
            if self._live:
                self._log.warn(
                    "drain timeout: aborting {count} connections", count=len(self._live)
                )
            for connection in list(self._live):
                connection.transport.abortConnection()

        call = self._clock.callLater(timeout, give_up)

        def done(result: None) -> None:
            if call.active():
                call.cancel()

        drained.addCallback(done)
        return drained
