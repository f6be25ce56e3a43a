"""
What the daemon asks of a connection's socket beneath Twisted: whether it
may write to it directly, and how much the kernel still has to send.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import termios
from typing import Any

from twisted.internet import tcp
from twisted.internet.interfaces import IAddress, ISSLTransport
from twisted.protocols.policies import ProtocolWrapper


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


def unsent_bytes(sock: socket.socket | None, tcp: bool | None = None) -> int | None:
    """
    The bytes still waiting in the kernel's send queue of C{sock}
    (C{SIOCOUTQ}, Linux), or C{None} where that cannot be asked or the
    connection is no longer open (after a reset the kernel still reports
    the bytes it will never send: whoever waits for them to drain must
    write instead, and learn that the peer has gone).  When it shrinks,
    the peer is taking bytes, even while the socket is not yet reported
    writable again.
    """
    if sock is None:
        return None
    if tcp is None:
        tcp = is_tcp(sock)
    try:
        if tcp and _TCP_INFO is not None and sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 1)[0] not in _OPEN:
            return None
        raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except (OSError, ValueError):
        return None
    value: int = struct.unpack("i", raw)[0]
    return value


def set_cork(sock: socket.socket, on: bool) -> bool:
    """Set or clear C{TCP_CORK} (Linux) on a TCP socket; whether that was done."""
    if _TCP_CORK is None or not is_tcp(sock):
        return False
    try:
        sock.setsockopt(socket.IPPROTO_TCP, _TCP_CORK, 1 if on else 0)
    except OSError:
        return False  # the peer has gone: the transfer fails on its own
    return True


_TCP_CORK: int | None = getattr(socket, "TCP_CORK", None)


def is_tcp(sock: socket.socket) -> bool:
    """Whether C{sock} is a TCP socket (asked once per connection: the family is an enum made per call)."""
    return sock.family in (socket.AF_INET, socket.AF_INET6)


_TCP_INFO: int | None = getattr(socket, "TCP_INFO", None)
# tcpi_state, the first byte of struct tcp_info: ESTABLISHED and CLOSE_WAIT
# (the peer has sent FIN, we may still send).
_OPEN = frozenset({1, 8})


def unwrapped(transport: Any) -> Any:
    """
    The transport beneath C{transport}'s pass-through wrappers: those that
    hand every write on unchanged (the PROXY protocol's, which only reads a
    header first), so writing beneath them sends the same bytes.  TLS and
    any wrapper that changes what is written are kept.
    """
    while (
        isinstance(transport, ProtocolWrapper)
        and type(transport).write is ProtocolWrapper.write
        and type(transport).writeSequence is ProtocolWrapper.writeSequence
        and not ISSLTransport.providedBy(transport)
        and transport.transport is not None
    ):
        transport = transport.transport
    return transport


def direct_socket(transport: object) -> socket.socket | None:
    """
    The socket under C{transport} if we may write to it directly: a plain
    TCP or UNIX stream connection, not TLS, whose Twisted buffer we can see
    into (beneath a pass-through wrapper, L{unwrapped}: then C{transport}
    must be the unwrapped one for L{buffer_empty} and L{write_now}).
    Checked once per connection: if a Twisted release renames what
    L{buffer_empty} reads, this says C{None} and every byte goes through
    C{transport.write}, slower but correct.
    """
    transport = unwrapped(transport)
    if (
        isinstance(transport, tcp.Connection)
        and not ISSLTransport.providedBy(transport)
        and not getattr(transport, "TLS", False)
        and _buffer_readable(transport)
    ):
        sock = getattr(transport, "socket", None)
        if isinstance(sock, socket.socket):
            return sock
    return None


def _buffer_readable(transport: object) -> bool:
    # The private parts of Twisted's FileDescriptor that buffer_empty reads.
    return (
        isinstance(getattr(transport, "_tempDataLen", None), int)
        and isinstance(getattr(transport, "dataBuffer", None), (bytes, bytearray, memoryview))
        and isinstance(getattr(transport, "offset", None), int)
        and callable(getattr(transport, "startWriting", None))
    )


def buffer_empty(transport: Any) -> bool:
    """Whether Twisted holds no unsent bytes for C{transport} (one L{direct_socket} found)."""
    # Twisted's FileDescriptor keeps unsent bytes in dataBuffer (from
    # offset on) and _tempDataBuffer; both empty means nothing is queued.
    empty: bool = transport._tempDataLen == 0 and len(transport.dataBuffer) == transport.offset
    return empty


def write_now(transport: Any, data: bytes, sock: socket.socket | None) -> None:
    """
    Write C{data} to C{transport}, straight to its socket C{sock} (from
    L{direct_socket}, or C{None}) when nothing is queued before it: a reply
    that fits in the socket buffer then costs one C{send} and no
    write-readiness round trip through the reactor.
    """
    if sock is not None and buffer_empty(transport):
        try:
            sent = sock.send(data)
        except OSError:
            # Would block, or the peer left: Twisted's own path handles both.
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


def plain_socket(transport: object) -> socket.socket | None:
    """The socket under a TCP transport, TLS or not, if it has one."""
    for candidate in (transport, getattr(transport, "transport", None)):
        sock = getattr(candidate, "socket", None)
        if isinstance(sock, socket.socket):
            return sock
    return None
