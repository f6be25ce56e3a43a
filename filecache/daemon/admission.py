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
        self.transport.write(refusal_reply(self._message, self._waiting.dates if http and self._waiting else None))
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


def refusal_reply(message: str, dates: DateCache | None) -> bytes:
    """The answer past a limit: C{503} with C{Retry-After} given C{dates} (to an HTTP client), else C{ERR busy}."""
    if dates is not None:
        return error_response(503, message, date=dates.now(), close=True, extra=[("Retry-After", "1")])
    return wire.format_error(wire.BUSY, message)


class _Waiting:
    """The refused connections waiting for their first line, and the clock they wait on."""

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self.dates = DateCache(clock.seconds)
        self.count = 0


def host_of(address: IAddress) -> str:
    """The key a connection from C{address} is counted under: its host, or C{local}."""
    return getattr(address, "host", None) or "local"


def _in_networks(host: str, networks: Sequence[Network]) -> bool:
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


NOT_ALLOWED = "not allowed"
"""L{Admission.refusal} of an address outside the allow-list: closed with no reply."""


class _Closer(Protocol):
    """A connection from a proxy that may not send a PROXY header: closed at once, unread."""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.loseConnection()


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
        trusted_proxies: Sequence[Network] | None = None,
    ) -> None:
        self._clock = clock
        self._waiting = _Waiting(clock) if http else None
        self.max_connections = max_connections
        self.max_per_ip = max_per_ip
        self.allow = list(allow) if allow is not None else None
        self.trusted_proxies = list(trusted_proxies) if trusted_proxies is not None else None
        self.connections_active = 0
        self.connections_total = 0
        self.draining = False
        self._per_host: Counter[str] = Counter()
        # Refused connections by reason (the metrics' refusal labels).
        self.refusals: Counter[str] = Counter()
        self._noted: set[tuple[str, str]] = set()
        # Each connection let in, with the address it is counted under:
        # taken once, so it is uncounted under the same one.
        self._live: dict[Connection, str] = {}
        self._drained: Deferred[None] | None = None

    def allowed(self, host: str) -> bool:
        """Whether C{host} (an address as text) is in the allow-list."""
        return self.allow is None or _in_networks(host, self.allow)

    def refusal(self, host: str | None) -> str | None:
        """
        Why a connection from C{host} may not come in now: L{NOT_ALLOWED}
        (outside the allow-list: logged once per address), the message of a
        limit, or C{None}: it may.
        """
        if host is not None and not self.allowed(host):
            self._note_once(host, "refused connection from {host}: not in --allow")
            self.refusals["not_allowed"] += 1
            return NOT_ALLOWED
        if self.connections_active >= self.max_connections:
            self.refusals["too_many_connections"] += 1
            return "too many connections; try again later"
        if self._per_host[host or "local"] >= self.max_per_ip:
            self.refusals["too_many_per_address"] += 1
            return "too many connections from your address; try again later"
        return None

    def _note_once(self, host: str, message: str) -> None:
        key = (message, host)
        if key not in self._noted:
            # Once per address, so a flood cannot flood the log too.
            if len(self._noted) < self._REMEMBERED_REFUSALS:
                self._noted.add(key)
            self._log.warn(message, host=host)

    def build(
        self, addr: IAddress | None, make: Callable[[], Protocol | None], *, proxied: bool = False
    ) -> Protocol | None:
        """
        C{make()} for a connection from C{addr} that may come in; a
        L{Refusal} past a limit; C{None} (closed with no reply) outside the
        allow-list.  With C{proxied} (a PROXY protocol port), C{addr} is the
        proxy's: only L{trusted_proxies} is checked now, and the connection
        itself asks L{refusal} once the header has said who the client is.
        """
        host = getattr(addr, "host", None)
        if proxied:
            if host is not None and not self.trusted(host):
                self._note_once(host, "refused connection from {host}: not a --trusted-proxy")
                self.refusals["untrusted_proxy"] += 1
                return _Closer()
            return make()
        why = self.refusal(host)
        if why is NOT_ALLOWED:
            return None
        if why is not None:
            return Refusal(why, self._waiting)
        return make()

    def trusted(self, host: str) -> bool:
        """Whether C{host} may send a PROXY header (L{trusted_proxies}; everyone when unset)."""
        return self.trusted_proxies is None or _in_networks(host, self.trusted_proxies)

    def bad_proxy_header(self, host: str) -> None:
        """A connection to a PROXY port from C{host} ended before a valid header (logged once per address)."""
        self._note_once(host, "closed connection from {host}: no valid PROXY protocol header")
        self.refusals["bad_proxy_header"] += 1

    def opened(self, connection: Connection, host: str) -> None:
        """C{connection} came in from C{host}: counted under that address until L{closed}."""
        self._live[connection] = host
        self.connections_active += 1
        self.connections_total += 1
        self._per_host[host] += 1

    def closed(self, connection: Connection) -> None:
        """C{connection} ended: uncounted under the address it was counted under, if it was."""
        host = self._live.pop(connection, None)
        if host is None:
            return  # never let in (a PROXY connection that sent no header)
        if self._drained is not None and not self._live:
            drained, self._drained = self._drained, None
            drained.callback(None)
        self.connections_active -= 1
        self._per_host[host] -= 1
        if self._per_host[host] <= 0:
            del self._per_host[host]

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
