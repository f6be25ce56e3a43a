"""
Start-up checks: a C{--port} that cannot work is refused before anything
starts, and a listen that fails at once is one line on stderr and status 1.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import re
import socket
import sys
from typing import Any, TextIO

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IStreamServerEndpoint,
    IStreamServerEndpointStringParser,
)
from twisted.logger import Logger
from twisted.plugin import getPlugins
from twisted.python.failure import Failure
from zope.interface import implementer


class ConfigError(SystemExit):
    """
    A bad option value.  twistd prints its whole help for a UsageError; this
    ends the process with status 1 and just the one line.
    """

    def __init__(self, message: str) -> None:
        super().__init__(f"filecache: {message}")


class CannotStart(SystemExit, Exception):
    """
    The daemon cannot start (it cannot listen, say); the one line saying why
    is already on stderr.  A SystemExit with status 1, so the process ends
    without a traceback; an Exception too, because twistd removes its pidfile
    only when an Exception ends the start-up.
    """

    def __init__(self, message: str) -> None:
        super().__init__(1)
        self.message = f"filecache: {message}"

    def __str__(self) -> str:
        return self.message


_FIELD = re.compile(r"(?<!\\):")  # endpoint fields: a colon not escaped by a backslash
# serverFromString's own endpoint types; the others are plugins.
_BUILT_IN_ENDPOINTS = frozenset({"tcp", "unix", "ssl"})
_DOTTED = re.compile(r"[0-9.]+")


def check_endpoint(text: str, description: str, reactor: Any = None, option: str = "--port") -> None:
    """
    Refuse a C{--port} that cannot work, before anything starts: an unknown
    endpoint type, a port that is not a number from 0 to 65535, an interface
    like C{256.1.1.1}, an argument the endpoint does not take, a missing TLS
    key (C{serverFromString} reads it), no socket from systemd.  What only a
    listen can tell (port in use, permission) is L{StartupEndpoint}'s.

    @param text: C{--port} as given, for the message.
    @param option: the option it was given to (C{--metrics} takes an endpoint too).
    @param description: the endpoint description made of it.
    @raise ConfigError: saying what is wrong.
    """
    fields = _FIELD.split(description)
    known = _BUILT_IN_ENDPOINTS | {
        parser.prefix for parser in getPlugins(IStreamServerEndpointStringParser)
    }
    while True:
        kind = fields[0]
        if kind not in known:
            raise ConfigError(
                f"{option} {text}: unknown endpoint type {kind!r} "
                f"(known: {', '.join(sorted(known))}; or a bare port number)"
            )
        if kind != "haproxy" or len(fields) == 1:
            break
        fields = fields[1:]  # haproxy:tcp:5000 wraps another endpoint
    if kind in ("tcp", "tcp6", "ssl"):
        named = dict(field.split("=", 1) for field in fields[1:] if "=" in field)
        positional = [field for field in fields[1:] if "=" not in field]
        port = named.get("port", positional[0] if positional else "")
        if not (port.isascii() and port.isdigit() and int(port) <= 65535):
            raise ConfigError(f"{option} {text}: {port!r} is not a port number (0 to 65535)")
        # Digits and dots are meant as an IPv4 address; anything else may be a host name.
        interface = named.get("interface", "")
        if _DOTTED.fullmatch(interface) and not _is_ip_address(interface):
            raise ConfigError(f"{option} {text}: {interface!r} is not an IP address")
    if reactor is None:
        from twisted.internet import reactor
    try:
        serverFromString(reactor, description)
    except IndexError:
        if kind != "systemd":
            raise
        raise ConfigError(
            f"{option} {text}: systemd passed no socket at that index "
            "(start the .socket unit, not the service alone)"
        ) from None
    except (ValueError, TypeError, OSError) as e:
        raise ConfigError(f"{option} {text}: {e}") from None


def _is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def listen_failure_text(error: BaseException | None) -> str:
    """Why a listen failed, in a few words: C{address already in use}."""
    if isinstance(error, CannotListenError):
        cause = error.socketError
        if isinstance(cause, socket.gaierror):
            return f"bad interface address {error.interface!r} ({str(cause.strerror).lower()})"
        if isinstance(cause, OSError) and cause.errno == errno.EADDRNOTAVAIL:
            return f"no interface of this machine has the address {error.interface!r}"
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror.lower()
    if isinstance(error, OSError) and error.strerror:
        # A UNIX socket's lock file, say: symlink(pid, PATH.lock) names PATH second.
        path = error.filename2 if error.filename2 is not None else error.filename
        if path is None:
            return error.strerror.lower()
        return f"{error.strerror.lower()} ({os.fsdecode(path)})"
    return str(error) or type(error).__name__


@implementer(IStreamServerEndpoint)
class StartupEndpoint:
    """
    An endpoint whose C{listen} raises L{CannotStart} when it fails at once
    (port in use, permission denied, bad interface address), after writing
    the one line that says why on stderr and in the log: twistd and twist
    then exit 1 instead of printing a traceback, or, with C{--workers},
    instead of idling without a port.
    """

    _log = Logger()

    def __init__(
        self, endpoint: IStreamServerEndpoint, text: str, stderr: TextIO | None = None
    ) -> None:
        self._endpoint = endpoint
        self._text = text
        self._stderr = stderr

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        d = self._endpoint.listen(factory)
        failed_at_once: list[Failure] = []
        listening = True

        def at_once(reason: Failure) -> Failure | None:
            if listening:
                failed_at_once.append(reason)
                return None
            return reason

        d.addErrback(at_once)
        listening = False
        if failed_at_once:
            error = failed_at_once[0].value
            why = f"cannot listen on {self._text}: {listen_failure_text(error)}"
            if isinstance(error, (CannotListenError, OSError)):
                self._log.error("{why}", why=why)
            else:
                self._log.failure(why, failed_at_once[0])
            failure = CannotStart(why)
            # twistd has sent sys.stderr to the log by now: the process's own stderr.
            stderr = self._stderr or sys.__stderr__ or sys.stderr
            stderr.write(failure.message + "\n")
            stderr.flush()
            raise failure
        return d


