"""
The daemon's configuration: one frozen, typed value made from the plugin's
options, and the options that make it again for a worker process.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from typing import Any

from filecache.daemon.admission import Network

DEFAULT_BACKLOG = 1024

_SIZE = re.compile(r"(\d+)\s*([kmgt]?)(?:i?b)?\Z", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


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


def _option(name: str) -> Any:
    """Field metadata: the option that carries this field to a worker."""
    return {"option": name}


# Fields a worker never gets from its parent's argv: the listener is the
# parent's, and the worker's own number and socket are added by the pool.
_NOT_FOR_WORKERS = frozenset(
    {
        "ports",
        "port_texts",
        "workers",
        "inherit_fds",
        "worker_index",
        "allow",
        "trusted_proxies",
        "metrics",
        "metrics_text",
        "metrics_dir",
    }
)

METRICS_OFF = "off"


@dataclass(frozen=True)
class DaemonConfig:
    """
    Everything the daemon is told at start.  Each field a worker needs
    names its option in its metadata; L{to_argv} writes them all.
    """

    dir: str = field(metadata=_option("--dir"))
    cache_size: int = field(default=64 << 20, metadata=_option("--cache-size"))
    cache_policy: str = field(default="fifo", metadata=_option("--cache-policy"))
    idle_timeout: float | None = field(default=120.0, metadata=_option("--idle-timeout"))
    drain_timeout: float = field(default=30.0, metadata=_option("--drain-timeout"))
    max_connections: int = field(default=1024, metadata=_option("--max-connections"))
    max_per_ip: int = field(default=64, metadata=_option("--max-per-ip"))
    allow_text: str | None = field(default=None, metadata=_option("--allow"))
    trusted_proxy_text: str | None = field(default=None, metadata=_option("--trusted-proxy"))
    access_log: bool = field(default=True, metadata=_option("--no-access-log"))
    http: bool = field(default=True, metadata=_option("--no-http"))
    freshness: str = field(default="watch", metadata=_option("--freshness"))
    ports: tuple[str, ...] = ("tcp:5000:backlog=1024",)
    port_texts: tuple[str, ...] = ("tcp:5000",)
    workers: int = 1
    allow: tuple[Network, ...] | None = None
    trusted_proxies: tuple[Network, ...] | None = None
    # Inherited listening sockets: descriptor, address family, PROXY protocol or not.
    inherit_fds: tuple[tuple[int, int, bool], ...] = ()
    worker_index: int = 0
    # Where /metrics is served: None, the HTTP side of every --port;
    # METRICS_OFF, nowhere; else an endpoint description of its own listener.
    metrics: str | None = None
    metrics_text: str | None = None
    # With --workers: the folder of the processes' metrics snapshots.
    metrics_dir: str | None = None

    @property
    def proxied(self) -> tuple[bool, ...]:
        """For each listener, whether it reads a PROXY protocol header first (C{haproxy:...})."""
        return tuple(port.split(":", 1)[0].lower() == "haproxy" for port in self.ports)

    @property
    def port(self) -> str:
        """The first listener's endpoint description."""
        return self.ports[0]

    @property
    def port_text(self) -> str:
        """The first C{--port}, as given."""
        return self.port_texts[0]

    @property
    def metrics_on_ports(self) -> bool:
        """Whether /metrics is served on the HTTP side of the daemon's own ports."""
        return self.metrics is None and self.http

    def worker_metrics_argv(self, metrics_dir: str | None) -> list[str]:
        """
        The metrics options of a worker: it serves /metrics on the shared
        ports if its parent does (never on C{--metrics}'s own listener, which
        is the parent's), and writes its snapshots in C{metrics_dir}.
        """
        argv = [] if self.metrics is None else ["--metrics", METRICS_OFF]
        if metrics_dir is not None:
            argv += ["--metrics-dir", metrics_dir]
        return argv

    def to_argv(self) -> list[str]:
        """The plugin's options that make this configuration again, for a worker."""
        argv: list[str] = []
        for f in fields(self):
            option = f.metadata.get("option")
            if option is None:
                assert f.name in _NOT_FOR_WORKERS, f"{f.name}: no option carries it to workers"
                continue
            value = getattr(self, f.name)
            if f.name in ("access_log", "http"):
                # Flags that turn a default off.
                if not value:
                    argv.append(option)
            elif f.name == "dir":
                argv += [option, os.path.abspath(value)]
            elif f.name == "idle_timeout":
                argv += [option, str(value or 0)]
            elif value is not None:
                argv += [option, str(value)]
        return argv
