"""
The benchmark harness (benchmarks/run.py and the package it is part of) leaves
the machine as it found it: the servers it starts write only under its work
folder, never to a device.
"""

from __future__ import annotations

import http.client
import os
import stat
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# benchmarks/ is a folder of the checkout, not an installed package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.dataset import DataSet
from benchmarks.processes import Processes, tail
from benchmarks.run import parse_args
from benchmarks.servers import (
    FILECACHE,
    NGINX,
    NGINX_HTTP,
    RCLONE,
    TWISTD_WEB,
    Server,
    filecache_options,
    installed_script,
    make_servers,
    twistd_web_argv,
)

# twistd's LogFile (which twisted.web's access log uses) rotates at this size.
ROTATE_LENGTH = 1_000_000


def _device_paths(argv: list[str]) -> list[str]:
    """The arguments (or C{--opt=VALUE} values) that name something under /dev."""
    found = []
    for arg in argv:
        for candidate in {arg, arg.partition("=")[2]}:
            if candidate.startswith("/") and (
                os.path.realpath(candidate).startswith("/dev/") or candidate == os.devnull
            ):
                found.append(arg)
    return found


def _is_char_device(path: str) -> bool:
    return stat.S_ISCHR(os.stat(path).st_mode)


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A work folder laid out like benchmarks/work: a data set and a logs folder."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "hello.txt").write_bytes(b"hello\n")
    (tmp_path / "listdir").mkdir()
    (tmp_path / "logs").mkdir()
    return tmp_path


def _servers(work: Path, filecache_help: str) -> dict[str, Server]:
    """
    The servers as the benchmark's main() makes them for a run of every
    workload, native and HTTP, in a work folder of our own.
    """
    ds = DataSet(
        work / "data", work / "listdir", work / "lists" / "small.txt", work / "lists" / "cold.txt"
    )
    args = parse_args(["--only", "1,2,3,4,5,6,7", "--http"])
    args.filecache_help = filecache_help
    return make_servers(ds, args, work / "logs", work)


def _access_log(argv: list[str]) -> Path | None:
    """twistd web's access log: the value of the --logfile given after "web"."""
    if "web" not in argv:
        return None
    rest = argv[argv.index("web") :]
    return Path(rest[rest.index("--logfile") + 1]) if "--logfile" in rest else None


def test_no_server_is_given_a_device_path(work: Path) -> None:
    """
    No command line the benchmark builds for a server (filecache, both
    nginx configurations, twistd web, http.server, rclone, and twistd web on
    the listing folder) names a device: twistd rotates a log file by renaming
    it, and /dev/null was renamed away that way.
    """
    servers = _servers(work, filecache_help="")
    argvs = {name: server.argv(5000) for name, server in servers.items()}
    argvs["twistd-web-list"] = twistd_web_argv(5000, work / "listdir", work / "logs" / "x.log")
    assert {name: _device_paths(argv) for name, argv in argvs.items()} == {
        name: [] for name in argvs
    }
    for name, argv in argvs.items():
        log = _access_log(argv)
        if log is not None:
            assert log.is_relative_to(work), (name, argv)


def _refuse_devices(argv_of: Callable[[int], list[str]]) -> Callable[[int], list[str]]:
    """
    The same command line, checked before anything starts with it: a server
    given a device to log to is never started here, as root it would break
    this machine's /dev/null.  On the old harness this test fails here.
    """

    def checked(port: int) -> list[str]:
        argv = argv_of(port)
        devices = _device_paths(argv)
        if devices:
            pytest.fail(f"refusing to start {argv[:4]}...: it would write to {devices}")
        return argv

    return checked


def _log_past_rotation(port: int, access_log: Path, deadline: float) -> None:
    """
    Requests with long paths (404s, logged like any other) until twistd web's
    access log has rotated at least once.
    """
    # One access line is about 12 KB: some 90 requests pass 1 MB.
    path = "/" + "x" * 12_000
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        sent = 0
        while not Path(f"{access_log}.1").exists():
            assert time.monotonic() < deadline, f"{access_log} did not rotate after {sent} requests"
            conn.request("GET", path)
            response = conn.getresponse()
            response.read()
            sent += 1
    finally:
        conn.close()
    assert sent * len(path) > ROTATE_LENGTH


@pytest.fixture
def processes() -> Iterator[Processes]:
    """The harness's own process registry; whatever it started is stopped after the test."""
    procs = Processes()
    yield procs
    procs.stop_all()


@pytest.mark.system
@pytest.mark.parametrize(
    "name", ["filecache", "nginx", "nginx-http", "twistd-web", "http.server", "rclone"]
)
def test_server_leaves_dev_null_a_character_device(
    work: Path, processes: Processes, name: str
) -> None:
    """
    Each of the benchmark's servers, started as the benchmark starts it
    (twistd web made to log past its rotation size), leaves /dev/null a
    character device and adds nothing beside it; twistd web's rotated access
    log is in the work folder.  Run as root with the old `--logfile
    /dev/null`, the rotation renamed the device to /dev/null.1 and created a
    regular file in its place.
    """
    if not _is_char_device(os.devnull):
        pytest.skip(f"{os.devnull} is already not a character device: nothing to check")
    before = sorted(Path(os.devnull).parent.glob("null*"))
    deadline = time.monotonic() + 30
    help_text = filecache_options() if name == FILECACHE else ""
    servers = _servers(work, filecache_help=help_text)
    if name not in servers:
        assert name in (NGINX, NGINX_HTTP, RCLONE)
        package = "rclone" if name == RCLONE else "nginx"
        pytest.skip(f"{package} is not installed (apt-get install -y {package}): not checked")
    server = servers[name]
    server.argv = _refuse_devices(server.argv)
    server.start(processes)
    access_log = _access_log(server.argv(server.port)) if name == TWISTD_WEB else None
    if access_log is not None:
        assert access_log.is_relative_to(work)
        _log_past_rotation(server.port, access_log, deadline)
    assert server.alive(), tail(server.log)
    server.stop(processes)
    assert _is_char_device(os.devnull), f"{os.devnull} is no longer a character device"
    assert sorted(Path(os.devnull).parent.glob("null*")) == before


def test_the_benchmarks_run_the_scripts_of_their_own_python(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    A venv's python run by its full path leaves PATH alone: the benchmarks
    take twistd and filecache-client from beside that python, not the first
    on PATH (another install of filecache); without one there, from PATH.
    """
    venv, elsewhere = tmp_path / "venv" / "bin", tmp_path / "elsewhere"
    for folder in (venv, elsewhere):
        folder.mkdir(parents=True)
        for name in ("filecache-client", "twistd"):
            (folder / name).write_text("#!/bin/sh\n")
            (folder / name).chmod(0o755)
    (elsewhere / "only-here").write_text("#!/bin/sh\n")
    (elsewhere / "only-here").chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(venv / "python3"))
    monkeypatch.setenv("PATH", str(elsewhere))
    assert installed_script("filecache-client") == str(venv / "filecache-client")
    assert installed_script("twistd") == str(venv / "twistd")
    assert installed_script("only-here") == str(elsewhere / "only-here")


def test_the_client_report_shows_each_rounds_ratio_beside_the_ratio_of_medians() -> None:
    """
    The medians of (a) and (b) can come from different rounds (0.63 x
    here, though the rounds' own ratios were 0.55, 0.94 and 0.82): the
    report says the ratio of each round too.
    """
    from benchmarks import clientbench

    args = clientbench.parse_args([])
    tools = [
        clientbench.Tool("(a) filecache-client get -r", None, lambda dest, port: [], True),
        clientbench.Tool("(b) rclone copy", None, lambda dest, port: [], True),
    ]
    results = {
        tools[0].label: clientbench.Timing([1.18, 1.13, 1.54], [0.42, 0.42, 0.52]),
        tools[1].label: clientbench.Timing([2.13, 1.20, 1.88], [0.42, 0.33, 0.32]),
    }
    report = clientbench.render(args, [("date", "today")], tools, results, {})
    assert "| (a) <= 0.7 x (b) | 0.63 x | yes |" in report
    assert "| (a) / (b), round by round | 0.55, 0.94, 0.82 |" in report
