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


async def connect(reactor: Any, inv: Invocation, err: IO[str]) -> FileCacheClientProtocol:
    from twisted.internet.endpoints import HostnameEndpoint, connectProtocol, wrapClientTLS

    endpoint: Any = HostnameEndpoint(reactor, inv.host, inv.port, timeout=inv.timeout or 30)
    if inv.tls:
        endpoint = wrapClientTLS(tls_creator(inv, err), endpoint)
    protocol = FileCacheClientProtocol(timeout=inv.timeout)
    await connectProtocol(endpoint, protocol)
    return protocol
