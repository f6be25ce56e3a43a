"""
The systemd units in systemd/, checked with systemd's own tools: they verify,
the service's sandbox scores well in `systemd-analyze security`, and the
daemon serves on a socket handed over the way systemd hands it over.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import RawClient, free_port, tool, wait_for

UNITS = Path(__file__).resolve().parent.parent / "systemd"
SERVICES = ("filecache.service", "filecache-activated.service")
ALL_UNITS = (*SERVICES, "filecache.socket")
MAX_EXPOSURE = 1.5


def system_tool(name: str) -> str:
    """
    The path of one of systemd's tools.  Missing, it fails the test (CI must
    run these), unless FILECACHE_ALLOW_SKIP_SYSTEM_TOOLS=1 allows a skip.
    """
    found = shutil.which(name)
    if found is not None:
        return found
    message = (
        f"{name} is not installed: .ci/run should install Debian's `systemd` package "
        "(apt-get install -y systemd), which provides systemd-analyze and "
        "systemd-socket-activate"
    )
    if os.environ.get("FILECACHE_ALLOW_SKIP_SYSTEM_TOOLS") == "1":
        pytest.skip(message)
    pytest.fail(message)


def unit_settings(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) for every setting in a unit file, in order."""
    settings = []
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.append((section, key.strip(), value.strip()))
    return settings


def setting(path: Path, section: str, key: str) -> list[str]:
    """Every value given to C{key} in C{section} of a unit file."""
    return [v for s, k, v in unit_settings(path) if (s, k) == (section, key)]


@pytest.fixture(scope="module")
def unit_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """
    A file system root for `systemd-analyze verify --root`: our units in
    /etc/systemd/system, an executable stub at the ExecStart path
    /opt/filecache/bin/twistd (verify checks that it exists), and a copy of the
    host's own units, because with --root every unit, sysinit.target and
    sockets.target included, is looked up inside the root.
    """
    root = tmp_path_factory.mktemp("root")
    stub = root / "opt/filecache/bin/twistd"
    stub.parent.mkdir(parents=True)
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    for host_units in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")):
        if host_units.is_dir():
            shutil.copytree(host_units, root / "usr/lib/systemd/system", symlinks=True)
            break
    system = root / "etc/systemd/system"
    system.mkdir(parents=True)
    for unit in ALL_UNITS:
        shutil.copy(UNITS / unit, system / unit)
    return root


def verify(root: Path, unit: str) -> tuple[int, list[str]]:
    """Run `systemd-analyze verify` on C{unit}; its status and output lines."""
    result = subprocess.run(
        [system_tool("systemd-analyze"), "verify", f"--root={root}", unit],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return result.returncode, (result.stdout + result.stderr).splitlines()


@pytest.mark.parametrize("unit", ALL_UNITS)
def test_unit_verifies(unit_root: Path, unit: str) -> None:
    """
    `systemd-analyze verify` accepts each unit without a single warning about
    our files (verify exits 0 on unknown keys and bad values, so the output is
    read too).
    """
    status, lines = verify(unit_root, unit)
    ours = [line for line in lines if "filecache" in line]
    assert status == 0, "\n".join(lines)
    assert ours == []


def test_verify_catches_a_missing_executable(unit_root: Path, tmp_path: Path) -> None:
    """
    The verify check above is not vacuous: with the ExecStart binary missing
    from the root, verify fails and names our unit.
    """
    root = tmp_path / "root"
    shutil.copytree(unit_root, root, symlinks=True)
    (root / "opt/filecache/bin/twistd").unlink()
    status, lines = verify(root, "filecache.service")
    assert status != 0
    assert any("/opt/filecache/bin/twistd" in line for line in lines), lines


@pytest.mark.parametrize("unit", SERVICES)
def test_security_exposure_is_low(unit: str) -> None:
    """
    `systemd-analyze security --offline=true` rates each service's sandbox at
    an overall exposure of 1.5 or lower (1.1 when written; what is left is
    network access itself, the IP allow list a site chooses, and the RTC
    device that ProtectClock= keeps readable).
    """
    result = subprocess.run(
        [
            system_tool("systemd-analyze"),
            "security",
            "--offline=true",
            "--no-pager",
            str(UNITS / unit),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout


def test_service_variants_agree() -> None:
    """
    The two services differ only in their unit relations and ExecStart (the
    sandbox is written twice), the activated one takes its socket from
    systemd, and the socket unit names and shapes that socket the way the
    daemon's systemd: endpoint expects it.
    """
    plain, activated = (UNITS / name for name in SERVICES)

    def service_part(path: Path) -> list[tuple[str, str]]:
        return [(k, v) for s, k, v in unit_settings(path) if s == "Service" and k != "ExecStart"]

    assert service_part(plain) == service_part(activated)

    socket_unit = UNITS / "filecache.socket"
    (exec_start,) = setting(activated, "Service", "ExecStart")
    assert "--port systemd:domain=INET:index=0 " in exec_start
    assert setting(socket_unit, "Socket", "FileDescriptorName") == ["filecache"]
    assert setting(socket_unit, "Socket", "Service") == ["filecache-activated.service"]
    # domain=INET needs an IPv4 socket; a bare port would make systemd open an
    # IPv6 one (see the comment in filecache.socket).
    (listen,) = setting(socket_unit, "Socket", "ListenStream")
    assert re.fullmatch(r"\d+\.\d+\.\d+\.\d+:\d+", listen), listen
    assert setting(activated, "Unit", "Requires") == ["filecache.socket"]


def log_shows(log: Path, text: str, process: subprocess.Popen[bytes], timeout: float = 15) -> bool:
    """Whether C{text} shows up in C{log} before C{process} exits or time runs out."""
    try:
        wait_for(lambda: text in log.read_text(errors="replace") or process.poll() is not None, timeout, text)
    except AssertionError:
        return False
    return text in log.read_text(errors="replace")


def stop_group(process: subprocess.Popen[bytes]) -> None:
    """
    Stop the process group we created for C{process} (its leader), and wait.
    Signals go only while the leader is not yet reaped, so the group's number
    cannot have been reused by someone else's process.
    """
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)


def test_socket_activation_end_to_end(tmp_path: Path) -> None:
    """
    Under systemd-socket-activate (the same LISTEN_FDS/LISTEN_FDNAMES hand-over
    as filecache.socket), nothing runs until the first connection; then twistd
    starts with `--port systemd:domain=INET:index=0` and answers LIST and GET
    on the inherited socket; stopping the process group we created leaves no
    process behind.
    """
    activate = system_tool("systemd-socket-activate")
    folder = tmp_path / "shared"
    folder.mkdir()
    content = b"Hello from filecache.\n"
    (folder / "hello.txt").write_bytes(content)
    log = tmp_path / "activate.log"

    for _attempt in range(5):
        port = free_port()
        with log.open("wb") as out:
            process = subprocess.Popen(
                [
                    activate,
                    "-l",
                    f"127.0.0.1:{port}",
                    "--fdname=filecache",
                    tool("twistd"),
                    "--nodaemon",
                    "--pidfile=",
                    "filecache",
                    "--port",
                    "systemd:domain=INET:index=0",
                    "--dir",
                    str(folder),
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, to stop it whole
            )
        if log_shows(log, f"Listening on 127.0.0.1:{port}", process):
            break
        stop_group(process)  # the port was taken meanwhile: try another
    else:
        pytest.fail("systemd-socket-activate did not listen:\n" + log.read_text(errors="replace"))

    try:
        assert "Execing" not in log.read_text(), "started before the first connection"
        client = RawClient(port)
        try:
            status, rows = client.rows(b"LIST")
            mtime = int((folder / "hello.txt").stat().st_mtime)
            assert (status, rows) == (
                b"OK\r\n",
                [b"%d %d - hello.txt\r\n" % (len(content), mtime)],
            )

            status, body, end = client.get(b"hello.txt")
            assert re.fullmatch(rb"OK 22 [0-9a-f]+(-[0-9a-f]+)*\r\n", status), status
            assert body == content
            assert end == b"END " + hashlib.sha256(content).hexdigest().encode() + b"\r\n"
        finally:
            client.close()
        text = log.read_text(errors="replace")
        assert "filecache serving" in text and "systemd:domain=INET:index=0" in text
    finally:
        stop_group(process)

    # SIGTERM is a request to drain and stop: the daemon exits 0.
    assert process.returncode == 0, log.read_text(errors="replace")
    with pytest.raises(ProcessLookupError):
        os.killpg(process.pid, 0)
