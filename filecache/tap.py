"""
The twistd/twist plugin's options and service: C{twistd -n filecache --port
5000 --dir ./shared}.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.threadpool import ThreadPool

from filecache.cache import FifoCache
from filecache.folder import SharedFolder
from filecache.protocol import FileCacheFactory, parse_allow
from filecache.server import FileCacheServer
from filecache.workers import AdoptedPortService, WorkerPool

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
        if self["inherit-fd"] is not None:
            try:
                fd, family = (int(part) for part in self["inherit-fd"].split(":"))
            except ValueError:
                raise ConfigError("--inherit-fd takes FD:FAMILY") from None
            self["inherit-fd"] = (fd, family)


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


class ThreadPoolService(Service):
    """A thread pool for blocking disk work, started and stopped with us."""

    def __init__(self, pool: ThreadPool, reactor: Any) -> None:
        self.pool = pool
        self._reactor = reactor

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        self.pool.stop()
        return None

    def run(self, work: Callable[[], T]) -> Deferred[T]:
        return deferToThreadPool(self._reactor, self.pool, work)


class DrainService(Service):
    """
    On shutdown, waits for the factory's connections to finish their
    replies.  SIGTERM stops the reactor as a request to shut down, not as a
    fatal signal, so a drained daemon exits with status 0.
    """

    _log = Logger()

    def __init__(self, factory: FileCacheFactory, timeout: float, reactor: Any) -> None:
        self._factory = factory
        self._timeout = timeout
        self._reactor = reactor

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
        return self._factory.drain(self._timeout)


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
    pool = ThreadPoolService(ThreadPool(minthreads=0, maxthreads=4, name="filecache-disk"), reactor)
    pool.setServiceParent(top)
    server = FileCacheServer(
        SharedFolder(config["dir"]),
        FifoCache(config["cache-size"]),
        run_blocking=pool.run,
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
    if config["inherit-fd"] is not None:
        fd, family = config["inherit-fd"]
        listener = AdoptedPortService(reactor, fd, family, factory)
    elif config["workers"] > 1:
        listener = WorkerPool(
            reactor,
            serverFromString(reactor, config["port"]),
            factory,
            config["workers"] - 1,
            worker_arguments(config),
            stop_timeout=config["drain-timeout"] + 5,
        )
    else:
        endpoint_service = StreamServerEndpointService(
            serverFromString(reactor, config["port"]), factory
        )
        # Fail at start-up (port in use, say) rather than log and idle.
        endpoint_service._raiseSynchronously = True
        listener = endpoint_service
    listener.setServiceParent(top)
    DrainService(factory, config["drain-timeout"], reactor).setServiceParent(top)
    _Announcer(config).setServiceParent(top)
    return top
