"""
The servers measured (filecache, nginx tuned and default, twistd web, and for
HTTP http.server and rclone): their command lines, nginx's two configurations,
and Server, which starts one and waits until it listens.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.console import BenchError, say
from benchmarks.dataset import DataSet
from benchmarks.processes import LOOPBACK, Processes, exit_status, free_port, wait_listening

CACHE_SIZE = "64M"
CACHE_BYTES = 64 << 20
MAX_PER_IP = 1024

FILECACHE = "filecache"
TWISTD_WEB = "twistd-web"
# nginx in issue 13's two configurations, both measured wherever nginx is:
# tuned (open_file_cache on, as issue 10 set it up for static files) is the
# anchor of issue 13's ratios; default (open_file_cache off) is the nginx
# issue 4's targets were set against.
NGINX_TUNED = "nginx-tuned"
NGINX_DEFAULT = "nginx-default"
NGINX_OPEN_FILE_CACHE = {NGINX_TUNED: "max=10000", NGINX_DEFAULT: "off"}
SERVER_NAMES = (FILECACHE, NGINX_TUNED, NGINX_DEFAULT, TWISTD_WEB)  # the native workloads'
HTTP_SERVER = "http.server"
RCLONE = "rclone"
HTTP_SERVER_NAMES = (*SERVER_NAMES, HTTP_SERVER, RCLONE)  # the HTTP workloads' (issue 10)
# What --servers takes: "nginx" stands for both configurations.
NGINX = "nginx"
SERVER_CHOICES = (FILECACHE, NGINX, NGINX_TUNED, NGINX_DEFAULT, TWISTD_WEB, HTTP_SERVER, RCLONE)
# How the reports name each server.
SERVER_LABELS = {
    FILECACHE: "filecache",
    NGINX_TUNED: "nginx tuned",
    NGINX_DEFAULT: "nginx default",
    TWISTD_WEB: "twistd web",
    HTTP_SERVER: "python3 -m http.server",
    RCLONE: "rclone serve http",
}


def wait_workers(log: Path, offset: int, workers: str, timeout: float = 30) -> None:
    """
    With --workers, the parent listens before its workers are up: wait until
    every process has logged that it listens, so a run measures them all.
    """
    count = (os.cpu_count() or 1) if workers == "auto" else int(workers)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(log, "rb") as f:
            f.seek(offset)
            if f.read().count(b"FileCacheFactory starting on") >= count:
                return
        time.sleep(0.05)
    raise BenchError(f"the filecache workers did not all start within {timeout:g} s; see {log}")


@dataclass
class Server:
    name: str
    proto: str  # "fc" or "http"
    argv: Callable[[int], list[str]]  # port -> command line
    log: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    restarts: list[str] = field(default_factory=list)
    config: Path | None = None  # a configuration file written for it, shown in the report
    proxy_header: bool = False  # a PROXY protocol port: clients send the header first

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, procs: Processes) -> None:
        self.port = free_port()
        argv = self.argv(self.port)
        with open(self.log, "a") as f:
            f.write(f"\n# {datetime.datetime.now().isoformat()} {' '.join(argv)}\n")
            offset = f.tell()
        self.proc = procs.start(argv, self.log)
        wait_listening(self.proc, self.port, self.name, self.log)
        if "--workers" in argv:
            wait_workers(self.log, offset, argv[argv.index("--workers") + 1])

    def stop(self, procs: Processes) -> None:
        if self.proc is not None:
            procs.stop(self.proc)
            self.proc = None

    def alive(self) -> bool:
        return self.proc is not None and exit_status(self.proc) is None


def installed_script(name: str) -> str | None:
    """
    The console script C{name} of the Python running the benchmark (a
    virtualenv's bin/), else the first on PATH: a venv's python run by its
    full path leaves PATH alone, and the first twistd or filecache-client
    there may belong to another install of filecache.
    """
    beside = os.path.join(os.path.dirname(sys.executable), name)
    if os.access(beside, os.X_OK):
        return beside
    return shutil.which(name)


def twistd() -> str:
    path = installed_script("twistd")
    if not path:
        raise BenchError("twistd not found: pip install -e . (in the repository)")
    return path


def filecache_options() -> str:
    """The daemon's --help text, to see which options this version has."""
    done = subprocess.run(
        [twistd(), "filecache", "--help"], check=False, capture_output=True, text=True, timeout=60
    )
    return done.stdout


def filecache_argv(port: int, folder: Path, args: argparse.Namespace) -> list[str]:
    argv = [
        twistd(),
        "-n",
        "--pidfile=",
        "filecache",
        "--port",
        f"tcp:{port}:interface={LOOPBACK}",
        "--dir",
        str(folder),
        "--cache-size",
        CACHE_SIZE,
        "--no-access-log",
    ]
    if args.workers:
        argv += ["--workers", str(args.workers)]
    if "--max-per-ip" in args.filecache_help:
        # Every benchmark client comes from 127.0.0.1: a per-address limit
        # meant for the internet would refuse workload 4's 200 connections.
        argv += ["--max-per-ip", str(MAX_PER_IP)]
    return argv + list(args.daemon_arg)


def twistd_web_argv(port: int, folder: Path, access_log: Path) -> list[str]:
    """
    twistd web serving C{folder}.  Its access log (web's --logfile) rotates at
    1 MB by renaming the file and creating a new one in its place, so it must
    be a regular file of ours: given /dev/null, a run as root renamed the
    device away and left a regular file in its place (issue 8, item 23).
    """
    return [
        twistd(),
        "-n",
        "--pidfile=",
        "web",
        "--path",
        str(folder),
        "--listen",
        f"tcp:{port}:interface={LOOPBACK}:backlog=1024",
        "--logfile",
        str(access_log),
    ]


def find_nginx() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )


NGINX_CONF = """\
# Written by benchmarks/run.py for one run; not a system configuration.
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 1000000000;
    keepalive_timeout 600s;
    open_file_cache {open_file_cache};
    default_type application/octet-stream;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    server {{
        listen {addr}:{{port}};
        root {root};
        location /listdir/ {{
            alias {listdir}/;
            autoindex on;
        }}
    }}
}}
"""


def http_server_argv(port: int, folder: Path) -> list[str]:
    """python3 -m http.server as a user starts it: its defaults (HTTP/1.0, so a connection per request)."""
    return [
        sys.executable,
        "-m",
        "http.server",
        str(port),
        "--bind",
        LOOPBACK,
        "--directory",
        str(folder),
    ]


def rclone_argv(port: int, folder: Path, work: Path) -> list[str]:
    """rclone serve http, read-only, with its configuration and cache under C{work}."""
    rclone = shutil.which("rclone")
    assert rclone is not None
    return [
        rclone,
        "serve",
        "http",
        str(folder),
        "--addr",
        f"{LOOPBACK}:{port}",
        "--read-only",
        "--config",
        str(work / "rclone" / "rclone.conf"),
        "--cache-dir",
        str(work / "rclone" / "cache"),
    ]


def nginx_server(
    name: str, nginx: str, ds: DataSet, open_file_cache: str, logs: Path, work: Path
) -> Server:
    """nginx in the foreground, with a configuration and prefix of its own under C{work}/C{name}."""
    prefix = work / name
    if prefix.exists():
        shutil.rmtree(prefix)
    prefix.mkdir(parents=True)
    conf_template = NGINX_CONF.format(
        prefix=prefix,
        addr=LOOPBACK,
        root=ds.root,
        listdir=ds.listdir,
        open_file_cache=open_file_cache,
    )
    conf = prefix / "nginx.conf"

    def nginx_argv(port: int) -> list[str]:
        conf.write_text(conf_template.replace("{port}", str(port)))
        # -e: the error log before the configuration is read.
        return [
            nginx,
            "-p",
            str(prefix),
            "-e",
            str(prefix / "error.log"),
            "-c",
            str(conf),
            "-g",
            "daemon off;",
        ]

    return Server(name, "http", nginx_argv, logs / f"{name}.log", config=conf)


def make_servers(
    ds: DataSet, args: argparse.Namespace, logs: Path, work: Path
) -> dict[str, Server]:
    """
    The servers the selected workloads measure (args.only: native workload
    numbers, args.http: HTTP workload names), those of args.servers; every
    file they write is under C{work} or C{logs}.
    """
    servers: dict[str, Server] = {}
    wanted = set(args.servers)
    needed: set[str] = set()
    if args.only:
        needed.update(SERVER_NAMES)
    if getattr(args, "http", None):
        needed.update(HTTP_SERVER_NAMES)
    if NGINX in wanted:
        wanted.update(NGINX_OPEN_FILE_CACHE)
    wanted &= needed

    if FILECACHE in wanted:
        servers[FILECACHE] = Server(
            FILECACHE,
            "fc",
            lambda port: filecache_argv(port, ds.root, args),
            logs / "filecache.log",
        )

    nginx = find_nginx()
    if nginx is None and wanted & set(NGINX_OPEN_FILE_CACHE):
        say("nginx not installed: apt-get install -y nginx")
    for name, open_file_cache in NGINX_OPEN_FILE_CACHE.items():
        if nginx is not None and name in wanted:
            servers[name] = nginx_server(name, nginx, ds, open_file_cache, logs, work)

    if TWISTD_WEB in wanted:
        servers[TWISTD_WEB] = Server(
            TWISTD_WEB,
            "http",
            lambda port: twistd_web_argv(port, ds.root, logs / "twistd-web-access.log"),
            logs / "twistd-web.log",
        )

    if HTTP_SERVER in wanted:
        servers[HTTP_SERVER] = Server(
            HTTP_SERVER,
            "http",
            lambda port: http_server_argv(port, ds.root),
            logs / "http.server.log",
        )

    if RCLONE in wanted:
        if shutil.which("rclone") is None:
            say("rclone not installed (apt-get install -y rclone): measured without it")
        else:
            (work / "rclone").mkdir(parents=True, exist_ok=True)
            conf = work / "rclone" / "rclone.conf"
            conf.touch()  # empty: no remotes, a local folder is served
            servers[RCLONE] = Server(
                RCLONE, "http", lambda port: rclone_argv(port, ds.root, work), logs / "rclone.log"
            )
    return servers
