"""
HTTP/1.1 for the system tests of the HTTP side (docs/http.md): a raw client
whose every response is parsed by h11, a relay that parses what real clients
(curl, wget, aria2, Chromium, urllib) receive the same way, and SHA-256s.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import os
import queue
import random
import socket
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import h11
from typing_extensions import Self

Headers = Sequence[tuple[str, str]]

MiB = 1 << 20


# Files and digests


def sha256_file(path: Path) -> str:
    """The hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def assert_same_file(got: Path, expected: Path) -> None:
    """C{got} holds exactly the bytes of C{expected} (compared by size, then SHA-256)."""
    assert got.is_file(), f"{got} was not written"
    assert got.stat().st_size == expected.stat().st_size, (
        f"{got}: {got.stat().st_size} bytes, {expected.name} has {expected.stat().st_size}"
    )
    assert sha256_file(got) == sha256_file(expected), f"{got}: SHA-256 differs from {expected}"


def repr_digest(path: Path) -> str:
    """The C{Repr-Digest} value RFC 9530 gives the file's bytes: C{sha-256=:<base64>:}."""
    digest = hashlib.sha256(path.read_bytes()).digest()
    return "sha-256=:" + base64.b64encode(digest).decode("ascii") + ":"


def http_date(seconds: float) -> str:
    """An IMF-fixdate, as C{Last-Modified} carries it."""
    return email.utils.formatdate(seconds, usegmt=True)


def write_pattern(path: Path, size: int, seed: int = 0) -> Path:
    """C{size} pseudo-random, repeatable bytes (fast: one 1 MiB block, varied per MiB)."""
    block = random.Random(seed).randbytes(MiB)
    with open(path, "wb") as f:
        written = 0
        n = 0
        while written < size:
            piece = n.to_bytes(8, "big") + block[8:]
            piece = piece[: size - written]
            f.write(piece)
            written += len(piece)
            n += 1
    return path


def url_path(relative: str) -> str:
    """The request target of a shared file: C{/} and its path, percent-encoded."""
    return "/" + urllib.parse.quote(relative, safe="/")


def request_bytes(
    method: str,
    target: str,
    headers: Headers = (),
    *,
    host: str | None = "127.0.0.1",
    version: str = "HTTP/1.1",
) -> bytes:
    """One request head as a well-behaved client writes it (C{Host} first unless C{host} is None)."""
    lines = [f"{method} {target} {version}"]
    if host is not None:
        lines.append(f"Host: {host}")
    lines.extend(f"{name}: {value}" for name, value in headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")


# The raw client


@dataclass
class Response:
    """One response as h11 parsed it: header names lower case, values as text."""

    status: int
    reason: str
    http_version: str
    headers: list[tuple[str, str]]
    body: bytes

    def values(self, name: str) -> list[str]:
        name = name.lower()
        return [value for key, value in self.headers if key == name]

    def header(self, name: str) -> str | None:
        """The one value of header C{name}, or None; a repeated header fails the test."""
        found = self.values(name)
        assert len(found) <= 1, f"{name} sent {len(found)} times: {found}"
        return found[0] if found else None

    def __getitem__(self, name: str) -> str:
        value = self.header(name)
        assert value is not None, f"no {name} header in {self.status} {self.reason}: {self.headers}"
        return value

    def connection_tokens(self) -> set[str]:
        return {
            token.strip().lower() for value in self.values("connection") for token in value.split(",")
        }

    def __repr__(self) -> str:
        body = self.body if len(self.body) <= 200 else self.body[:200] + b"..."
        return f"<{self.http_version} {self.status} {self.reason} {self.headers} {body!r}>"


class ServerClosed(AssertionError):
    """The server closed the connection where a response was expected."""


class HttpConnection:
    """
    A blocking HTTP/1.1 connection written by hand, so that tests can send
    anything (pipelined, malformed, hostile) while every byte that comes
    back goes through h11's client-side parser.  Any framing or header
    error h11 reports fails the test, as does a response that arrives when
    none was asked for or bytes after a response that announced a close.
    """

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
        self.port = port
        self.timeout = timeout
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.host = f"{host}:{port}"
        self._h11 = h11.Connection(our_role=h11.CLIENT)
        self._pending: deque[tuple[str, bool]] = deque()
        self._received = bytearray()
        self.eof = False
        self.reset = False

    # Sending

    def send(self, data: bytes) -> None:
        """Raw bytes; say what they ask with C{expect} unless they are one plain GET."""
        self.sock.sendall(data)

    def expect(self, method: str = "GET", close: bool = False) -> None:
        """The next response answers a C{method} request (C{close}: it asked to close)."""
        self._pending.append((method, close))

    def request(
        self,
        method: str = "GET",
        target: str = "/",
        headers: Headers = (),
        *,
        version: str = "HTTP/1.1",
        host: bool = True,
    ) -> None:
        close = any(k.lower() == "connection" and "close" in v.lower() for k, v in headers)
        self.send(request_bytes(method, target, headers, host=self.host if host else None, version=version))
        self.expect(method, close)

    def get(self, target: str, headers: Headers = (), *, version: str = "HTTP/1.1") -> Response:
        self.request("GET", target, headers, version=version)
        return self.read_response()

    def head(self, target: str, headers: Headers = (), *, version: str = "HTTP/1.1") -> Response:
        self.request("HEAD", target, headers, version=version)
        return self.read_response()

    # Receiving

    def _fill(self, timeout: float | None = None) -> bytes:
        self.sock.settimeout(self.timeout if timeout is None else timeout)
        try:
            data = self.sock.recv(1 << 20)
        except ConnectionResetError:
            self.reset = True
            data = b""
        if not data:
            self.eof = True
        elif len(self._received) < (1 << 16):
            self._received += data[: (1 << 16) - len(self._received)]
        return data

    def _context(self) -> str:
        return f"first bytes received on this connection: {bytes(self._received[:2000])!r}"

    def read_response(self) -> Response:
        """The next response, in order; a pipelined client calls it once per request sent."""
        conn = self._h11
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        if conn.their_state is h11.MUST_CLOSE or conn.their_state is h11.CLOSED:
            raise ServerClosed(f"the previous response announced a close; {self._context()}")
        method, close = self._pending.popleft() if self._pending else ("GET", False)
        headers = [("Host", self.host)] + ([("Connection", "close")] if close else [])
        conn.send(h11.Request(method=method, target="/", headers=headers))
        conn.send(h11.EndOfMessage())
        head: h11.Response | None = None
        body: list[bytes] = []
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as e:
                raise AssertionError(f"h11 rejected the response: {e}; {self._context()}") from e
            if event is h11.NEED_DATA:
                try:
                    data = self._fill()
                except TimeoutError:
                    raise AssertionError(
                        f"no whole response within {self.timeout} s; {self._context()}"
                    ) from None
                conn.receive_data(data)
            elif isinstance(event, h11.InformationalResponse):
                raise AssertionError(f"unexpected 1xx response {event}")
            elif isinstance(event, h11.Response):
                head = event
            elif isinstance(event, h11.Data):
                body.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                return Response(
                    status=head.status_code,
                    reason=head.reason.decode("latin-1"),
                    http_version="HTTP/" + head.http_version.decode("ascii"),
                    headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in head.headers],
                    body=b"".join(body),
                )
            elif isinstance(event, h11.ConnectionClosed):
                raise ServerClosed(
                    f"connection closed{' (reset)' if self.reset else ''} before a whole response "
                    f"to {method}; {self._context()}"
                )
            else:
                raise AssertionError(f"unexpected h11 event {event!r}")

    def pipeline(self, requests: Iterable[tuple[str, str, Headers]]) -> list[Response]:
        """Send all C{(method, target, headers)} requests at once, then read their responses in order."""
        batch = list(requests)
        data = b"".join(request_bytes(m, t, h, host=self.host) for m, t, h in batch)
        self.send(data)
        for method, _target, headers in batch:
            self.expect(method, any(k.lower() == "connection" and "close" in v.lower() for k, v in headers))
        return [self.read_response() for _ in batch]

    def rest(self, timeout: float = 5.0) -> bytes:
        """
        Whatever the server sends after the responses read so far, up to its
        close; fails when it does not close within C{timeout} seconds.
        """
        data = bytearray(self._h11.trailing_data[0])
        deadline = time.monotonic() + timeout
        while not self.eof:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"the server kept the connection open {timeout} s (sent {bytes(data[:500])!r})"
                )
            try:
                data += self._fill(left)
            except TimeoutError:
                continue
        return bytes(data)

    def assert_closed(self, timeout: float = 5.0) -> None:
        """The server closes the connection, sending nothing after the last response."""
        extra = self.rest(timeout)
        assert extra == b"", f"bytes after the last response: {extra[:500]!r}"

    def assert_open(self, wait: float = 0.3) -> None:
        """Nothing more arrives within C{wait} seconds and the connection stays open."""
        assert self._h11.trailing_data[0] == b"", f"unasked bytes: {self._h11.trailing_data[0][:500]!r}"
        assert not self.eof, "the server closed the connection"
        try:
            data = self._fill(wait)
        except TimeoutError:
            return
        assert data, "the server closed the connection"
        raise AssertionError(f"unasked bytes: {data[:500]!r}")

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def fetch(port: int, target: str, headers: Headers = (), method: str = "GET") -> Response:
    """One request on a connection of its own."""
    with HttpConnection(port) as conn:
        conn.request(method, target, headers)
        return conn.read_response()


# The relay that checks real clients


@dataclass
class Exchange:
    """
    One request a real client sent through an H11Tap and the response h11
    read back (C{complete} once its whole body went by; a client may leave
    before, as aria2 does at the end of its segment).
    """

    connection: int
    method: str
    target: str
    status: int
    headers: list[tuple[str, str]]
    body_bytes: int = 0
    complete: bool = False

    def header(self, name: str) -> str | None:
        found = [v for k, v in self.headers if k == name.lower()]
        return found[0] if found else None


@dataclass
class _Relay:
    number: int
    client: socket.socket
    upstream: socket.socket
    requests: queue.Queue[tuple[str, str]] = field(default_factory=queue.Queue)
    threads: list[threading.Thread] = field(default_factory=list)
    client_left: bool = False


class H11Tap:
    """
    A TCP relay on a free loopback port in front of the daemon: real clients
    talk to it as to the daemon, and every byte the daemon sends back is
    also parsed by h11 (the request methods, needed to frame the responses,
    are read from what the client sends).  Leaving the context fails the
    test if h11 reported any error; C{exchanges} and C{connections} say
    what the clients did.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self._listener.settimeout(0.1)
        self.port: int = self._listener.getsockname()[1]
        self.errors: list[str] = []
        self.exchanges: list[Exchange] = []
        self.connections = 0
        self._relays: list[_Relay] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._forced = False
        self._acceptor = threading.Thread(target=self._accept, name="h11-tap", daemon=True)

    def url(self, target: str) -> str:
        return f"http://127.0.0.1:{self.port}{target}"

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            with self._lock:
                self.connections += 1
                relay = _Relay(self.connections, client, upstream)
                self._relays.append(relay)
            for target in (self._client_to_server, self._server_to_client):
                thread = threading.Thread(target=target, args=(relay,), daemon=True)
                relay.threads.append(thread)
                thread.start()

    def _client_to_server(self, relay: _Relay) -> None:
        pending = bytearray()
        in_head = False
        while True:
            try:
                data = relay.client.recv(1 << 16)
            except OSError:
                data = b""
            if not data:
                relay.client_left = True
                try:
                    relay.upstream.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            # Note each request line before the daemon can see it, so that
            # the other direction always knows what it is reading an answer to.
            pending += data
            while (end := pending.find(b"\n")) >= 0:
                line = bytes(pending[:end]).rstrip(b"\r")
                del pending[: end + 1]
                if not in_head:
                    if line:
                        method, _, rest = line.decode("latin-1").partition(" ")
                        relay.requests.put((method, rest.rpartition(" ")[0]))
                        in_head = True
                elif not line:
                    in_head = False
            try:
                relay.upstream.sendall(data)
            except OSError:
                return

    def _error(self, relay: _Relay, what: str, received: bytes) -> None:
        with self._lock:
            if not self._forced and not relay.client_left:
                self.errors.append(f"connection {relay.number}: {what}; first bytes: {received[:1000]!r}")

    def _server_to_client(self, relay: _Relay) -> None:
        parser = _ResponseReader(self, relay)
        while True:
            try:
                data = relay.upstream.recv(1 << 18)
            except OSError:
                data = b""
            # Parse before forwarding: an error is on record before the
            # client can react to the bytes (and leave).
            parser.feed(data)
            if not data:
                break
            try:
                relay.client.sendall(data)
            except OSError:
                # The client left: what the daemon still sends is read by
                # no one, so stop it.
                relay.client_left = parser.broken = True
                try:
                    relay.upstream.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        try:
            relay.client.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def __enter__(self) -> Self:
        self._acceptor.start()
        return self

    def settle(self, timeout: float = 5.0) -> None:
        """Wait until every relayed connection has ended on both sides."""
        deadline = time.monotonic() + timeout
        for relay in list(self._relays):
            for thread in relay.threads:
                thread.join(max(0.0, deadline - time.monotonic()))

    def check(self) -> None:
        """Fail the test on any error h11 reported so far."""
        with self._lock:
            errors = list(self.errors)
        assert not errors, "h11 found errors in what the daemon sent:\n" + "\n".join(errors)

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.settle(3)
        with self._lock:
            self._forced = True
        self._stopping.set()
        self._acceptor.join(5)
        self._listener.close()
        for relay in self._relays:
            for sock in (relay.client, relay.upstream):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            for thread in relay.threads:
                thread.join(5)
            relay.client.close()
            relay.upstream.close()
        if kind is None:
            self.check()


class _ResponseReader:
    """h11's reading of one relayed connection's responses, for an H11Tap."""

    def __init__(self, tap: H11Tap, relay: _Relay) -> None:
        self.tap = tap
        self.relay = relay
        self.conn = h11.Connection(our_role=h11.CLIENT)
        self.received = bytearray()
        self.broken = False
        self.current: tuple[str, str] = ("", "")
        self.exchange: Exchange | None = None

    def _error(self, what: str) -> None:
        self.tap._error(self.relay, what, bytes(self.received))
        self.broken = True

    def feed(self, data: bytes) -> None:
        if self.broken:
            return
        if len(self.received) < 4096:
            self.received += data[:4096]
        conn = self.conn
        conn.receive_data(data)
        try:
            self._events()
        except h11.ProtocolError as e:
            self._error(f"h11: {e} (answering {self.current[0]} {self.current[1]})")
            return
        if not data and conn.their_state not in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.IDLE):
            self._error(f"closed in the middle of a response to {self.current[0]} {self.current[1]}")

    def _events(self) -> None:
        conn = self.conn
        while True:
            if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                conn.start_next_cycle()
            if conn.our_state is h11.IDLE:
                if not conn.trailing_data[0]:
                    return
                try:
                    self.current = self.relay.requests.get(timeout=10)
                except queue.Empty:
                    self._error("a response that no request asked for")
                    return
                conn.send(h11.Request(method=self.current[0], target="/", headers=[("Host", "tap")]))
                conn.send(h11.EndOfMessage())
            event = conn.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
                return
            if isinstance(event, h11.Response):
                self.exchange = Exchange(
                    self.relay.number,
                    self.current[0],
                    self.current[1],
                    event.status_code,
                    [(k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers],
                )
                with self.tap._lock:
                    self.tap.exchanges.append(self.exchange)
            elif isinstance(event, h11.InformationalResponse):
                self._error(f"unexpected {event}")
                return
            elif isinstance(event, h11.Data):
                assert self.exchange is not None
                self.exchange.body_bytes += len(event.data)
            elif isinstance(event, h11.EndOfMessage):
                assert self.exchange is not None
                self.exchange.complete = True


def files_under(root: Path) -> dict[str, str]:
    """Every regular file under C{root} outside dot-folders, not a dotfile: relative path -> SHA-256."""
    found: dict[str, str] = {}
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            path = Path(folder) / name
            if not name.startswith(".") and path.is_file() and not path.is_symlink():
                found[path.relative_to(root).as_posix()] = sha256_file(path)
    return found
