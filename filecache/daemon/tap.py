"""
The twistd/twist plugin's options and service: C{twistd -n filecache --port
5000 --dir ./shared}.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import re
import signal
import socket
import sys
from typing import Any, ClassVar, TextIO, TypeVar

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService, Service
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
from twisted.python import usage
from twisted.python.failure import Failure
from zope.interface import implementer

from filecache.daemon.admission import parse_allow
from filecache.daemon.cache import FifoCache
from filecache.daemon.diskwork import DiskWork
from filecache.daemon.folder import SharedFolder
from filecache.daemon.native import FileCacheFactory
from filecache.daemon.responder import Responder
from filecache.daemon.workers import AdoptedPortService, WorkerPool

T = TypeVar("T")

DEFAULT_BACKLOG = 1024

_SIZE = re.compile(r"(\d+)\s*([kmgt]?)(?:i?b)?\Z", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


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


def parse_size(text: str) -> int:
    """
    Bytes from C{123}, C{64K}, C{64M}, C{1G} (binary units; C{KiB}, C{MB}
    and lower case accepted too).

    @raise ValueError: for anything else.
    """
    match = _SIZE.match(text.strip())
    if not match:
        raise ValueError(f"not a size: {text!r} (use bytes or a K/M/G suffix)")
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


def endpoint_description(port: str, backlog: int = DEFAULT_BACKLOG) -> str:
    """
    A server endpoint description from C{--port}: a bare number means TCP,
    and a TCP listener gets a deep backlog unless it sets one.
    """
    port = port.strip()
    if port.isdigit():
        port = f"tcp:{port}"
    kind = port.split(":", 1)[0].lower()
    if kind in ("tcp", "tcp6", "ssl") and "backlog=" not in port:
        port += f":backlog={backlog}"
    return port


_FIELD = re.compile(r"(?<!\\):")  # endpoint fields: a colon not escaped by a backslash
# serverFromString's own endpoint types; the others are plugins.
_BUILT_IN_ENDPOINTS = frozenset({"tcp", "unix", "ssl"})
_DOTTED = re.compile(r"[0-9.]+")


def check_endpoint(text: str, description: str, reactor: Any = None) -> None:
    """
    Refuse a C{--port} that cannot work, before anything starts: an unknown
    endpoint type, a port that is not a number from 0 to 65535, an interface
    like C{256.1.1.1}, an argument the endpoint does not take, a missing TLS
    key (C{serverFromString} reads it), no socket from systemd.  What only a
    listen can tell (port in use, permission) is L{StartupEndpoint}'s.

    @param text: C{--port} as given, for the message.
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
                f"--port {text}: unknown endpoint type {kind!r} "
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
            raise ConfigError(f"--port {text}: {port!r} is not a port number (0 to 65535)")
        # Digits and dots are meant as an IPv4 address; anything else may be a host name.
        interface = named.get("interface", "")
        if _DOTTED.fullmatch(interface) and not _is_ip_address(interface):
            raise ConfigError(f"--port {text}: {interface!r} is not an IP address")
    if reactor is None:
        from twisted.internet import reactor
    try:
        serverFromString(reactor, description)
    except IndexError:
        if kind != "systemd":
            raise
        raise ConfigError(
            f"--port {text}: systemd passed no socket at that index "
            "(start the .socket unit, not the service alone)"
        ) from None
    except (ValueError, TypeError, OSError) as e:
        raise ConfigError(f"--port {text}: {e}") from None


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


class Options(usage.Options):
    synopsis = "--dir DIRECTORY [--port ENDPOINT] [--cache-size SIZE]"
    longdesc = (
        "Share every regular file under DIRECTORY (recursively, dotfiles "
        "excepted) with many clients at once, keeping recently read files in "
        "a first-in first-out memory cache.  See docs/protocol.md."
    )
    # Read by usage.Options from the class; never changed.
    optParameters: ClassVar[list[list[str | None]]] = [
        [
            "port",
            "p",
            "tcp:5000",
            (
                "Where to listen: a Twisted endpoint description (tcp:5000:"
                "interface=127.0.0.1, unix:/run/fc.sock, ssl:5443:privateKey=..., "
                "systemd:domain=INET:index=0) or a bare port number."
            ),
        ],
        ["dir", "d", None, "The folder to share (required; must exist)."],
        [
            "cache-size",
            "c",
            "64M",
            (
                "Memory cache budget: bytes, or a number with K, M or G (binary "
                "units). Files larger than this are streamed from disk, never cached."
            ),
        ],
        [
            "idle-timeout",
            None,
            "120",
            (
                "Close a connection that sends no request for this many seconds, "
                "and abort a reply the client accepts no bytes of for as long. 0: never."
            ),
        ],
        [
            "drain-timeout",
            None,
            "30",
            (
                "On SIGTERM, stop accepting at once and let replies in flight finish "
                "for up to this many seconds, then abort the rest and exit 0."
            ),
        ],
        [
            "workers",
            "w",
            "1",
            (
                "Processes serving the port: N, or auto for one per core. Each has "
                "its own cache of --cache-size and its own --max-connections and "
                "--max-per-ip; STATS answers for the process that took the connection."
            ),
        ],
        [
            "inherit-fd",
            None,
            None,
            (
                "Internal, used by --workers: serve the listening socket FD:FAMILY "
                "inherited from the parent instead of --port."
            ),
        ],
        [
            "worker-index",
            None,
            "0",
            "Internal, used by --workers: this worker's number, which STATS reports.",
        ],
        [
            "max-connections",
            None,
            "1024",
            "Connections served at once; one more is answered ERR busy and closed.",
        ],
        [
            "max-per-ip",
            None,
            "64",
            (
                "Connections served at once from one client address; one more is "
                "answered ERR busy and closed."
            ),
        ],
        [
            "allow",
            None,
            None,
            (
                "Serve only clients in these networks: CIDR[,CIDR...] such as "
                "10.0.0.0/8,192.168.1.7,::1 (default: everyone). Others are closed "
                "before a byte is read."
            ),
        ],
    ]
    optFlags: ClassVar[list[list[str | None]]] = [
        ["no-access-log", None, "Do not log a line for every reply."],
    ]

    def postOptions(self) -> None:
        directory = self["dir"]
        if not directory:
            raise ConfigError("--dir is required: the folder to share")
        if not os.path.isdir(directory):
            raise ConfigError(f"--dir {directory}: not an existing directory")
        try:
            self["cache-size"] = parse_size(str(self["cache-size"]))
        except ValueError as e:
            raise ConfigError(f"--cache-size: {e}") from None
        self["port-text"] = self["port"]
        self["port"] = endpoint_description(self["port"])
        self["idle-timeout"] = _number("--idle-timeout", self["idle-timeout"], float) or None
        self["drain-timeout"] = _number("--drain-timeout", self["drain-timeout"], float)
        for name in ("max-connections", "max-per-ip"):
            self[name] = _number(f"--{name}", self[name], int)
            if self[name] < 1:
                raise ConfigError(f"--{name} must be at least 1")
        self["allow-text"] = self["allow"]
        if self["allow"] is not None:
            try:
                self["allow"] = parse_allow(self["allow"])
            except ValueError as e:
                raise ConfigError(f"--allow: {e}") from None
        workers = str(self["workers"]).strip().lower()
        self["workers"] = os.cpu_count() or 1 if workers == "auto" else _number("--workers", workers, int)
        if self["workers"] < 1:
            raise ConfigError("--workers must be at least 1")
        if self["workers"] > 1 and self["port"].split(":", 1)[0].lower() == "ssl":
            raise ConfigError(
                "--workers with an ssl: port is not supported: run one worker, "
                "or end TLS in front (HAProxy) and serve tcp: behind it"
            )
        self["worker-index"] = _number("--worker-index", self["worker-index"], int)
        if self["inherit-fd"] is not None:
            try:
                fd, family = (int(part) for part in self["inherit-fd"].split(":"))
            except ValueError:
                raise ConfigError("--inherit-fd takes FD:FAMILY") from None
            self["inherit-fd"] = (fd, family)
        # Last: it may read files (TLS keys) that an error above makes moot.
        check_endpoint(self["port-text"], self["port"])


def worker_arguments(config: Options) -> list[str]:
    """The options a worker process gets, to serve exactly as its parent does."""
    args = [
        "--dir", os.path.abspath(config["dir"]),
        "--cache-size", str(config["cache-size"]),
        "--idle-timeout", str(config["idle-timeout"] or 0),
        "--max-connections", str(config["max-connections"]),
        "--max-per-ip", str(config["max-per-ip"]),
        "--drain-timeout", str(config["drain-timeout"]),
    ]
    if config["allow-text"] is not None:
        args += ["--allow", config["allow-text"]]
    if config["no-access-log"]:
        args.append("--no-access-log")
    return args


def _number(option: str, text: str, kind: type) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise ConfigError(f"{option}: not a number: {text!r}") from None
    if value < 0:
        raise ConfigError(f"{option} must not be negative")
    return value


class DiskWorkService(Service):
    """The disk threads, started with the daemon and stopped once it has drained."""

    def __init__(self, disk: DiskWork) -> None:
        self.disk = disk

    def startService(self) -> None:
        super().startService()
        self.disk.start()


class DrainService(Service):
    """
    On shutdown, waits for the factory's connections to finish their
    replies.  SIGTERM stops the reactor as a request to shut down, not as a
    fatal signal, so a drained daemon exits with status 0.
    """

    _log = Logger()

    def __init__(
        self, factory: FileCacheFactory, timeout: float, reactor: Any, disk: DiskWork | None = None
    ) -> None:
        self._factory = factory
        self._timeout = timeout
        self._reactor = reactor
        self._disk = disk

    def startService(self) -> None:
        super().startService()
        # After the reactor's own handlers are in place, so ours wins.
        self._reactor.callWhenRunning(self._handle_sigterm)

    def _handle_sigterm(self) -> None:
        def on_sigterm(signum: int, frame: object) -> None:
            self._reactor.callFromThread(self._shutdown)

        signal.signal(signal.SIGTERM, on_sigterm)

    def _shutdown(self) -> None:
        self._log.info("received SIGTERM: draining, then stopping")
        if self._reactor.running:
            self._reactor.stop()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        drained = self._factory.drain(self._timeout)
        disk = self._disk
        if disk is not None:
            # Only once no reply needs them: steps not yet started are
            # dropped, and the one under way in each thread is short.
            drained.addBoth(lambda result: disk.stop())
        return drained


class _Announcer(Service):
    _log = Logger()

    def __init__(self, config: Options) -> None:
        self._config = config

    def startService(self) -> None:
        super().startService()
        c = self._config
        if c["inherit-fd"] is not None:
            return
        self._log.info(
            "filecache serving {dir} on {port}, cache {cache_size} bytes, {workers} worker(s)",
            dir=os.path.realpath(c["dir"]),
            port=c["port"],
            cache_size=c["cache-size"],
            workers=c["workers"],
        )

    def stopService(self) -> None:
        super().stopService()
        self._log.info("filecache stopping")


def makeService(config: Options, reactor: Any = None) -> IService:
    """The daemon: a listener, its factory, and a pool for disk work."""
    if reactor is None:
        from twisted.internet import reactor
    top = MultiService()
    disk = DiskWork(reactor)
    DiskWorkService(disk).setServiceParent(top)
    server = Responder(
        SharedFolder(config["dir"]),
        FifoCache(config["cache-size"]),
        run_blocking=disk,
        reactor=reactor,
        worker=config["worker-index"],
    )
    factory = FileCacheFactory(
        server,
        clock=reactor,
        access_log=not config["no-access-log"],
        idle_timeout=config["idle-timeout"],
        max_connections=config["max-connections"],
        max_per_ip=config["max-per-ip"],
        allow=config["allow"],
    )
    listener: Service
    endpoint = StartupEndpoint(serverFromString(reactor, config["port"]), config["port-text"])
    if config["inherit-fd"] is not None:
        fd, family = config["inherit-fd"]
        listener = AdoptedPortService(reactor, fd, family, factory)
    elif config["workers"] > 1:
        listener = WorkerPool(
            reactor,
            endpoint,
            factory,
            config["workers"] - 1,
            worker_arguments(config),
            stop_timeout=config["drain-timeout"] + 5,
        )
    else:
        listener = StreamServerEndpointService(endpoint, factory)
    listener.setServiceParent(top)
    DrainService(factory, config["drain-timeout"], reactor, disk).setServiceParent(top)
    _Announcer(config).setServiceParent(top)
    return top
