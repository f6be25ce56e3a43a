"""
The twistd/twist plugin's options and service: C{twistd -n filecache --port
5000 --dir ./shared}.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import tempfile
from typing import Any, ClassVar, TypeVar

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage

from filecache.daemon.admission import Network, parse_allow
from filecache.daemon.cache import POLICIES as CACHE_POLICIES
from filecache.daemon.cache import make_cache
from filecache.daemon.config import METRICS_OFF, DaemonConfig, endpoint_description, parse_size
from filecache.daemon.diskwork import DiskWork
from filecache.daemon.folder import SharedFolder
from filecache.daemon.freshness import MODES as FRESHNESS_MODES
from filecache.daemon.freshness import choose_freshness
from filecache.daemon.metrics import (
    DaemonMetrics,
    MetricsListener,
    SnapshotFolder,
    SnapshotService,
    metrics_site,
)
from filecache.daemon.native import FileCacheFactory
from filecache.daemon.responder import Responder
from filecache.daemon.startup import ConfigError, StartupEndpoint, check_endpoint
from filecache.daemon.workers import AdoptedPortService, WorkerPool

T = TypeVar("T")

DEFAULT_BACKLOG = 1024

_SIZE = re.compile(r"(\d+)\s*([kmgt]?)(?:i?b)?\Z", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class Options(usage.Options):
    synopsis = "--dir DIRECTORY [--port ENDPOINT] [--cache-size SIZE]"
    longdesc = (
        "Share every regular file under DIRECTORY (recursively, dotfiles "
        "excepted) with many clients at once, keeping recently read files in "
        "a memory cache (first-in first-out unless --cache-policy says "
        "otherwise).  See docs/protocol.md."
    )
    # Read by usage.Options from the class; never changed.
    optParameters: ClassVar[list[list[str | None]]] = [
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
            "cache-policy",
            None,
            "fifo",
            (
                "Which files the cache evicts first: fifo (in order of reading), "
                "s3fifo (new files on probation, files read again kept: resists a "
                "scan such as a mirror of the whole folder) or sieve (one queue, a "
                "file read again survives one more pass). See docs/operations.md."
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
            "freshness",
            None,
            "watch",
            (
                "How a cache hit is known to be current: watch (inotify tells of "
                "changes; a stat where it cannot see them: network and FUSE file "
                "systems, symlinked paths, hard links) or stat (one stat per hit). "
                "See docs/operations.md."
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
                "before a byte is read. On a PROXY protocol port (haproxy:...) the "
                "client's address is the one the header gives."
            ),
        ],
        [
            "metrics",
            None,
            None,
            (
                "Where to serve the Prometheus metrics: an endpoint of their own "
                "(tcp:9100:interface=127.0.0.1; then only there), or off. Default: "
                "GET /metrics on the HTTP side of every --port. See docs/operations.md."
            ),
        ],
        [
            "metrics-dir",
            None,
            None,
            "Internal, used by --workers: the folder where each process writes its metrics snapshot.",
        ],
        [
            "trusted-proxy",
            None,
            None,
            (
                "On PROXY protocol ports (haproxy:...), accept connections only from "
                "these proxies: CIDR[,CIDR...] (default: any peer may send the header, "
                "so keep such a port where only the proxy can reach it)."
            ),
        ],
    ]
    optFlags: ClassVar[list[list[str | None]]] = [
        ["no-access-log", None, "Do not log a line for every reply."],
        ["no-http", None, "Speak only the native protocol (no HTTP/1.1 on the same port)."],
    ]

    config: DaemonConfig

    def __init__(self) -> None:
        super().__init__()
        self["port"] = []
        self["inherit-fd"] = []

    def opt_port(self, value: str) -> None:
        """
        Where to listen: a Twisted endpoint description (tcp:5000:interface=
        127.0.0.1, unix:/run/fc.sock, ssl:5443:privateKey=..., systemd:domain=
        INET:index=0) or a bare port number. Give it again to listen on
        several (every one speaks both protocols). Default: tcp:5000.
        """
        self["port"].append(value)

    opt_p = opt_port

    def opt_inherit_fd(self, value: str) -> None:
        """
        Internal, used by --workers: serve the listening socket FD:FAMILY
        inherited from the parent instead of --port (once per port).
        """
        self["inherit-fd"].append(value)

    def postOptions(self) -> None:
        """Check every option and make L{config}; the option values are left as given."""
        directory = self["dir"]
        if not directory:
            raise ConfigError("--dir is required: the folder to share")
        if not os.path.isdir(directory):
            raise ConfigError(f"--dir {directory}: not an existing directory")
        try:
            cache_size = parse_size(str(self["cache-size"]))
        except ValueError as e:
            raise ConfigError(f"--cache-size: {e}") from None
        cache_policy = _choice("--cache-policy", self["cache-policy"], CACHE_POLICIES)
        port_texts = tuple(self["port"]) or ("tcp:5000",)
        ports = tuple(endpoint_description(text) for text in port_texts)
        limits = {}
        for name in ("max-connections", "max-per-ip"):
            limits[name] = _number(f"--{name}", self[name], int)
            if limits[name] < 1:
                raise ConfigError(f"--{name} must be at least 1")
        allow = _networks("--allow", self["allow"])
        text = str(self["workers"]).strip().lower()
        workers = os.cpu_count() or 1 if text == "auto" else _number("--workers", text, int)
        if workers < 1:
            raise ConfigError("--workers must be at least 1")
        if workers > 1 and any(port.split(":", 1)[0].lower() == "ssl" for port in ports):
            raise ConfigError(
                "--workers with an ssl: port is not supported: run one worker, "
                "or end TLS in front (HAProxy) and serve tcp: behind it"
            )
        freshness = _choice("--freshness", self["freshness"], FRESHNESS_MODES)
        inherit_fds = []
        for text in self["inherit-fd"]:
            fields = text.split(":")
            proxied = fields[2:] == ["proxy"]
            try:
                if len(fields) != 2 and not proxied:
                    raise ValueError(text)
                fd, family = int(fields[0]), int(fields[1])
            except ValueError:
                raise ConfigError("--inherit-fd takes FD:FAMILY or FD:FAMILY:proxy") from None
            inherit_fds.append((fd, family, proxied))
        trusted = _networks("--trusted-proxy", self["trusted-proxy"])
        metrics_text = self["metrics"]
        metrics = None
        if metrics_text is not None:
            metrics_text = metrics_text.strip()
            metrics = METRICS_OFF if metrics_text.lower() == METRICS_OFF else endpoint_description(metrics_text)
        self.config = DaemonConfig(
            dir=directory,
            cache_size=cache_size,
            cache_policy=cache_policy,
            idle_timeout=_number("--idle-timeout", self["idle-timeout"], float) or None,
            drain_timeout=_number("--drain-timeout", self["drain-timeout"], float),
            max_connections=limits["max-connections"],
            max_per_ip=limits["max-per-ip"],
            allow_text=self["allow"],
            trusted_proxy_text=self["trusted-proxy"],
            trusted_proxies=trusted,
            access_log=not self["no-access-log"],
            http=not self["no-http"],
            freshness=freshness,
            ports=ports,
            port_texts=port_texts,
            workers=workers,
            allow=allow,
            inherit_fds=tuple(inherit_fds),
            worker_index=_number("--worker-index", self["worker-index"], int),
            metrics=metrics,
            metrics_text=metrics_text,
            metrics_dir=self["metrics-dir"],
        )
        # Last: it may read files (TLS keys) that an error above makes moot.
        for text, port in zip(port_texts, ports):
            check_endpoint(text, port)
        if metrics is not None and metrics != METRICS_OFF:
            assert metrics_text is not None
            check_endpoint(metrics_text, metrics, option="--metrics")


def _choice(option: str, text: object, choices: tuple[str, ...]) -> str:
    """C{text} (any case) if it is one of C{choices}; else a one-line error."""
    value = str(text).strip().lower()
    if value not in choices:
        raise ConfigError(f"{option} must be one of {', '.join(choices)}, not {value!r}")
    return value


def _networks(option: str, text: str | None) -> tuple[Network, ...] | None:
    """The networks of a CIDR[,CIDR...] option, or C{None} if it was not given."""
    if text is None:
        return None
    try:
        return tuple(parse_allow(text))
    except ValueError as e:
        raise ConfigError(f"{option}: {e}") from None


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

    def __init__(self, config: DaemonConfig, freshness: str) -> None:
        self._config = config
        self._freshness = freshness

    def startService(self) -> None:
        super().startService()
        c = self._config
        if c.inherit_fds:
            return
        self._log.info("freshness: {how}", how=self._freshness)
        self._log.info(
            "filecache serving {dir} on {port}{http}, cache {cache_size} bytes ({policy}), {workers} worker(s)",
            dir=os.path.realpath(c.dir),
            port=" and ".join(c.ports),
            http=" (native and HTTP/1.1)" if c.http else " (native protocol only)",
            cache_size=c.cache_size,
            policy=c.cache_policy,
            workers=c.workers,
        )

    def stopService(self) -> None:
        super().stopService()
        self._log.info("filecache stopping")


_log = Logger()


def _remove_if_orphaned(path: str, parent: int) -> None:
    if os.getppid() != parent:
        shutil.rmtree(path, True)


def _metrics_folder(config: DaemonConfig) -> str | None:
    """
    The folder of the processes' metrics snapshots: a worker's is given;
    a parent of workers makes one, removed when it exits; else none.
    """
    if config.metrics_dir is not None or config.inherit_fds:
        if config.metrics_dir is not None:
            # A parent killed outright (SIGKILL) removes nothing: the workers
            # it leaves behind stop on their own, and remove the folder then.
            atexit.register(_remove_if_orphaned, config.metrics_dir, os.getppid())
        return config.metrics_dir
    if config.workers < 2 or config.metrics == METRICS_OFF:
        return None
    path = tempfile.mkdtemp(prefix="filecache-metrics-")
    # At exit, not at reactor shutdown: a start that fails never runs the reactor.
    atexit.register(shutil.rmtree, path, True)
    _log.info("metrics snapshots of the workers in {path}", path=path)
    return path


def makeService(options: Options, reactor: Any = None) -> IService:
    """The daemon: a listener, its factory, and the disk threads."""
    if reactor is None:
        from twisted.internet import reactor
    config = options.config
    top = MultiService()
    disk = DiskWork(reactor)
    DiskWorkService(disk).setServiceParent(top)
    folder = SharedFolder(config.dir)
    freshness, why = choose_freshness(config.freshness, folder.root)
    responder = Responder(
        folder,
        make_cache(config.cache_policy, config.cache_size),
        run_blocking=disk,
        reactor=reactor,
        worker=config.worker_index,
        freshness=freshness,
    )
    factory = FileCacheFactory(
        responder,
        clock=reactor,
        access_log=config.access_log,
        idle_timeout=config.idle_timeout,
        max_connections=config.max_connections,
        max_per_ip=config.max_per_ip,
        allow=config.allow,
        http=config.http,
        trusted_proxies=config.trusted_proxies,
    )
    metrics_dir = _metrics_folder(config)
    metrics_listener: Service | None = None
    if config.metrics != METRICS_OFF or metrics_dir is not None:
        snapshots = SnapshotFolder(metrics_dir) if metrics_dir is not None else None
        metrics = DaemonMetrics(responder, factory.admission, factory.replies, clock=reactor, snapshots=snapshots)
        if config.metrics_on_ports:
            factory.metrics = metrics
        if snapshots is not None:
            SnapshotService(metrics, reactor).setServiceParent(top)
        if config.metrics not in (None, METRICS_OFF) and not config.inherit_fds:
            assert config.metrics is not None and config.metrics_text is not None
            own = StartupEndpoint(serverFromString(reactor, config.metrics), config.metrics_text)
            metrics_listener = MetricsListener(own, metrics_site(metrics))
    # A PROXY protocol port's connections are admitted by the header's address.
    factories = [factory.behind_proxy() if proxied else factory for proxied in config.proxied]
    # Not strports.service: it makes its endpoint from the string itself, so
    # StartupEndpoint (one line and status 1 when the listen fails) cannot
    # wrap it, and the workers' pool needs the endpoints anyway.
    endpoints = [
        StartupEndpoint(serverFromString(reactor, port), text)
        for port, text in zip(config.ports, config.port_texts)
    ]
    listeners: list[Service]
    if config.inherit_fds:
        listeners = [
            AdoptedPortService(reactor, fd, family, factory.behind_proxy() if proxied else factory, proxied=proxied)
            for fd, family, proxied in config.inherit_fds
        ]
    elif config.workers > 1:
        listeners = [
            WorkerPool(
                reactor,
                endpoints,
                factories,
                config.workers - 1,
                config.to_argv() + config.worker_metrics_argv(metrics_dir),
                stop_timeout=config.drain_timeout + 5,
                proxied=config.proxied,
            )
        ]
    else:
        listeners = [StreamServerEndpointService(endpoint, f) for endpoint, f in zip(endpoints, factories)]
    if metrics_listener is not None:
        # After the ports: the log's first "starting on" line is the daemon's port.
        listeners.append(metrics_listener)
    for listener in listeners:
        listener.setServiceParent(top)
    DrainService(factory, config.drain_timeout, reactor, disk).setServiceParent(top)
    _Announcer(config, why).setServiceParent(top)
    return top
