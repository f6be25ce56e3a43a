"""
Connecting to the daemon: a TCP endpoint for the host and port, under TLS
when asked (verified against the system's CAs or --cafile, or not at all).
"""

from __future__ import annotations

from typing import IO, Any

from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from zope.interface import implementer

from filecache.client.arguments import Invocation
from filecache.client.errors import UsageError
from filecache.client.output import say
from filecache.client.protocol import FileCacheClientProtocol


def tls_creator(inv: Invocation, err: IO[str]) -> Any:
    """The TLS client settings for C{inv}: verified, against C{--cafile}, or not at all."""
    try:
        from twisted.internet import ssl
    except ImportError:  # pragma: no cover - depends on the install
        raise UsageError("--tls needs the TLS extra: pip install 'filecache[tls]'") from None
    if inv.insecure:
        say(err, "warning: --insecure: the server's certificate is not checked")
        return _UnverifiedTLS(inv.host)
    if inv.cafile:
        try:
            with open(inv.cafile, "rb") as f:
                trust: Any = ssl.Certificate.loadPEM(f.read())
        except OSError as e:
            raise UsageError(f"--cafile {inv.cafile}: {e.strerror}") from None
        except Exception as e:  # noqa: BLE001 - pyOpenSSL raises several kinds for bad PEM
            raise UsageError(f"--cafile {inv.cafile}: not a PEM certificate ({e})") from None
    else:
        trust = ssl.platformTrust()
    return ssl.optionsForClientTLS(inv.host, trustRoot=trust)


@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedTLS:
    """TLS with no certificate check at all (--insecure); SNI still sent."""

    def __init__(self, host: str) -> None:
        from twisted.internet import ssl

        self._host = host
        self._context = ssl.CertificateOptions(verify=False).getContext()

    def clientConnectionForTLS(self, tls_protocol: Any) -> Any:
        from OpenSSL import SSL

        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tls_protocol)
        try:
            connection.set_tlsext_host_name(self._host.encode("idna"))
        except (UnicodeError, ValueError):
            pass
        return connection


class Dialer:
    """
    Makes connections to the daemon C{inv} names, each sending up to
    C{pipeline} requests ahead; the TLS settings are made once (one
    --insecure warning however many connections).
    """

    def __init__(self, reactor: Any, inv: Invocation, err: IO[str], pipeline: int = 1) -> None:
        self._reactor = reactor
        self._inv = inv
        self._err = err
        self._pipeline = pipeline
        self._tls: Any = None

    async def __call__(self) -> FileCacheClientProtocol:
        from twisted.internet.endpoints import HostnameEndpoint, connectProtocol, wrapClientTLS

        inv = self._inv
        endpoint: Any = HostnameEndpoint(self._reactor, inv.host, inv.port, timeout=inv.timeout or 30)
        if inv.tls:
            if self._tls is None:
                self._tls = tls_creator(inv, self._err)
            endpoint = wrapClientTLS(self._tls, endpoint)
        protocol = FileCacheClientProtocol(timeout=inv.timeout, pipeline=self._pipeline)
        await connectProtocol(endpoint, protocol)
        return protocol


async def connect(reactor: Any, inv: Invocation, err: IO[str]) -> FileCacheClientProtocol:
    """One connection to the daemon C{inv} names, one request at a time."""
    return await Dialer(reactor, inv, err)()
