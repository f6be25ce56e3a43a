"""
The real daemon under twistd, on a loopback port, driven by the real
filecache-client and by raw sockets.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import (
    Daemon,
    DaemonFactory,
    RawClient,
    free_port,
    open_fds,
    run_client,
    tool,
    wait_for,
)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# Starting the daemon


def test_missing_dir_is_one_line_error_and_status_1(tmp_path: Path) -> None:
    """--dir that does not exist: exit status 1, one line on stderr, no traceback."""
    result = subprocess.run(
        [tool("twistd"), "-n", "--pidfile=", "filecache", "--dir", str(tmp_path / "nope")],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"filecache: --dir {tmp_path / 'nope'}: not an existing directory"
    ]
    assert "Traceback" not in result.stdout + result.stderr


def test_dir_is_required(tmp_path: Path) -> None:
    """No --dir at all: exit status 1 and a one-line error."""
    result = subprocess.run(
        [tool("twistd"), "-n", "--pidfile=", "filecache"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == "filecache: --dir is required: the folder to share"


def test_help_documents_every_option() -> None:
    """twistd filecache --help names every option of the daemon."""
    result = subprocess.run(
        [tool("twistd"), "filecache", "--help"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0
    for option in ("--port", "--dir", "--cache-size", "--no-access-log"):
        assert option in result.stdout


def test_bare_port_number_means_tcp(shared: Path, daemon_factory: DaemonFactory) -> None:
    """--port with a bare number listens on TCP (current Twisted refuses it unconverted)."""
    port = free_port()
    write(shared, "a.txt", b"abc")
    daemon = daemon_factory(shared, port=str(port))
    assert daemon.port == port
    client = RawClient(port)
    assert client.get(b"a.txt")[1] == b"abc"
    client.close()


def test_twist_runs_the_plugin_too(shared: Path, tmp_path: Path) -> None:
    """`twist filecache ...` serves like twistd does."""
    write(shared, "a.txt", b"via twist")
    port = free_port()
    process = subprocess.Popen(
        [tool("twist"), "filecache", "--port", f"tcp:{port}:interface=127.0.0.1", "--dir", str(shared)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                client = RawClient(port)
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, "twist did not start listening"
                time.sleep(0.05)
        assert client.get(b"a.txt")[1] == b"via twist"
        client.close()
    finally:
        process.terminate()
        process.wait(15)


def test_unix_socket_endpoint(shared: Path, tmp_path: Path, daemon_factory: DaemonFactory) -> None:
    """--port unix:PATH serves over a UNIX socket, streamed bodies included."""
    data = os.urandom(3 * 1024 * 1024)
    write(shared, "big.bin", data)
    sock_path = tmp_path / "fc.sock"
    log = tmp_path / "unix.log"
    process = subprocess.Popen(
        [tool("twistd"), "-n", "--pidfile=", f"--logfile={log}", "filecache",
         "--port", f"unix:{sock_path}", "--dir", str(shared)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while not sock_path.exists():
            assert time.monotonic() < deadline, log.read_text() if log.exists() else "no log"
            time.sleep(0.05)
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(sock_path))
        s.sendall(b"GET big.bin\r\n")
        buf = b""
        while not buf.endswith(b"\r\n") or buf.count(b"END ") == 0:
            chunk = s.recv(1 << 20)
            assert chunk
            buf += chunk
        head, _, rest = buf.partition(b"\r\n")
        assert head.startswith(b"OK %d " % len(data))
        assert rest[: len(data)] == data
        assert rest[len(data):] == b"END " + sha(data).encode() + b"\r\n"
        s.close()
    finally:
        process.terminate()
        process.wait(15)


# The client against the daemon


def test_client_lists_the_folder(shared: Path, daemon: Daemon) -> None:
    """`list` prints every shared file with a human size, cached marker and name."""
    write(shared, "hello.txt", b"hello\n")
    write(shared, "sub/dir/deep.bin", b"x" * 3000)
    write(shared, ".hidden", b"secret")
    result = run_client("127.0.0.1", str(daemon.port), "list")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["SIZE", "C", "NAME"]
    assert lines[1].split() == ["6", "B", "-", "hello.txt"]
    assert lines[2].split() == ["2.9", "KiB", "-", "sub/dir/deep.bin"]
    assert lines[3].startswith("2 files")
    assert ".hidden" not in result.stdout


def test_client_list_json_and_cached(shared: Path, daemon: Daemon, tmp_path: Path) -> None:
    """`list --json` is machine-readable; `--cached` shows only the cache, after a get."""
    write(shared, "a.txt", b"aaa")
    write(shared, "b.txt", b"bbbb")
    result = run_client("127.0.0.1", str(daemon.port), "list", "--json")
    listed = json.loads(result.stdout)
    assert [(e["path"], e["size"], e["cached"]) for e in listed] == [
        ("a.txt", 3, False),
        ("b.txt", 4, False),
    ]
    assert run_client("127.0.0.1", str(daemon.port), "get", "b.txt", "-o", str(tmp_path / "out")).returncode == 0
    cached = json.loads(run_client("127.0.0.1", str(daemon.port), "list", "--cached", "--json").stdout)
    assert [(e["path"], e["cached"]) for e in cached] == [("b.txt", True)]


def test_client_downloads_identical_bytes(shared: Path, daemon: Daemon, tmp_path: Path) -> None:
    """get saves byte-identical files, sub-paths kept, small and large (streamed) alike."""
    small = os.urandom(1000)
    large = os.urandom(5 * 1024 * 1024 + 17)
    write(shared, "small.bin", small)
    write(shared, "nested/dir/large.bin", large)
    out = tmp_path / "out"
    result = run_client("127.0.0.1", str(daemon.port), "get", "small.bin", "nested/dir/large.bin", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert (out / "small.bin").read_bytes() == small
    assert (out / "nested/dir/large.bin").read_bytes() == large
    assert result.stdout.splitlines() == [str(out / "small.bin"), str(out / "nested/dir/large.bin")]
    assert not [p for p in out.rglob("*") if "filecache-part" in p.name]


def test_seed_form_downloads_one_file(shared: Path, daemon: Daemon, tmp_path: Path) -> None:
    """`filecache-client HOST PORT NAME DIR` downloads NAME into DIR."""
    write(shared, "one.txt", b"one")
    out = tmp_path / "seed"
    out.mkdir()
    result = run_client("127.0.0.1", str(daemon.port), "one.txt", str(out))
    assert result.returncode == 0, result.stderr
    assert (out / "one.txt").read_bytes() == b"one"


def test_file_named_like_a_command_via_get(shared: Path, daemon: Daemon, tmp_path: Path) -> None:
    """A file called `list` is fetched with `get list`."""
    write(shared, "list", b"not a command")
    result = run_client("127.0.0.1", str(daemon.port), "get", "list", "-o", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "list").read_bytes() == b"not a command"


@pytest.mark.parametrize(
    "name",
    ["with space.txt", "accentué.txt", "percent%41.txt", "new\nline.txt", "plus+and&amp.txt", "日本語/ファイル.txt"],
)
def test_odd_names_round_trip(shared: Path, daemon: Daemon, tmp_path: Path, name: str) -> None:
    """Names with spaces, accents, %, a newline or CJK are listed and fetched intact."""
    data = name.encode() * 3
    write(shared, name, data)
    listed = json.loads(run_client("127.0.0.1", str(daemon.port), "list", "--json").stdout)
    assert [e["path"] for e in listed] == [name]
    out = tmp_path / "out"
    result = run_client("127.0.0.1", str(daemon.port), "get", name, "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert (out / name).read_bytes() == data


def test_missing_file_exit_1_clear_message(shared: Path, daemon: Daemon, tmp_path: Path) -> None:
    """A file that is not there: exit 1, one clear line, nothing written."""
    result = run_client("127.0.0.1", str(daemon.port), "get", "nope.txt", "-o", str(tmp_path / "out"))
    assert result.returncode == 1
    assert result.stderr.strip() == "filecache-client: nope.txt: not found on the server"
    assert not (tmp_path / "out" / "nope.txt").exists()
    assert not (tmp_path / "out" / ".nope.txt.filecache-part").exists()


def test_existing_destination_not_overwritten_without_force(shared: Path, daemon: Daemon, tmp_path: Path) -> None:
    """An existing file is kept (exit 5) unless --force is given."""
    write(shared, "f.txt", b"new")
    (tmp_path / "f.txt").write_bytes(b"old")
    result = run_client("127.0.0.1", str(daemon.port), "get", "f.txt", "-o", str(tmp_path))
    assert result.returncode == 5
    assert "exists" in result.stderr
    assert (tmp_path / "f.txt").read_bytes() == b"old"
    result = run_client("127.0.0.1", str(daemon.port), "get", "f.txt", "-o", str(tmp_path), "--force")
    assert result.returncode == 0
    assert (tmp_path / "f.txt").read_bytes() == b"new"


def test_cannot_connect_exit_3(tmp_path: Path) -> None:
    """Nothing listening: exit 3 and a one-line message."""
    port = free_port()
    result = run_client("127.0.0.1", str(port), "list")
    assert result.returncode == 3
    assert result.stderr.startswith("filecache-client: cannot connect")
    assert "Traceback" not in result.stderr


def test_usage_errors_exit_2() -> None:
    """Bad command lines exit 2 without contacting anyone."""
    assert run_client("127.0.0.1", "notaport", "list").returncode == 2
    assert run_client("127.0.0.1", "5000", "get").returncode == 2
    assert run_client("127.0.0.1", "5000", "stats", "extra").returncode == 2
    assert run_client("127.0.0.1").returncode == 2


def test_stats_command(shared: Path, daemon: Daemon, tmp_path: Path) -> None:
    """`stats` prints the server's figures; a repeated get (of a file removed since) is a hit."""
    write(shared, "s.txt", b"stats")
    for _ in range(2):
        (tmp_path / "s.txt").unlink(missing_ok=True)
        run_client("127.0.0.1", str(daemon.port), "get", "s.txt", "-o", str(tmp_path))
    result = run_client("127.0.0.1", str(daemon.port), "stats", "--json")
    stats = json.loads(result.stdout)
    assert stats["hits"] == 1
    assert stats["misses"] == 1
    assert stats["cache_files"] == 1
    assert stats["cache_bytes"] == 5
    assert stats["cache_capacity"] == 64 * 1024 * 1024
    assert stats["bytes_sent"] == 10
    text = run_client("127.0.0.1", str(daemon.port), "stats").stdout
    # Aligned in two columns (the width follows the longest key).
    assert ["cache_capacity", "67108864"] in [line.split() for line in text.splitlines()]
    assert len({line.index(line.split()[1]) for line in text.splitlines()}) == 1


# Raw protocol against the daemon


def test_get_status_body_and_digest(shared: Path, daemon: Daemon, raw: RawClient) -> None:
    """GET: OK <size> <version>, exactly the bytes, END <sha256>; with an offset too."""
    data = os.urandom(200_000)
    write(shared, "f.bin", data)
    status, body, end = raw.get(b"f.bin")
    assert status.startswith(b"OK 200000 ") and status.endswith(b"\r\n")
    assert body == data
    assert end == b"END " + sha(data).encode() + b"\r\n"
    status, body, end = raw.get(b"f.bin", 150_000)
    assert status.split()[1] == b"50000"
    assert body == data[150_000:]
    assert end == b"END " + sha(data[150_000:]).encode() + b"\r\n"
    assert raw.get(b"f.bin", 200_001)[0].startswith(b"ERR bad-request ")


def test_pipelined_requests_answered_in_order(shared: Path, daemon: Daemon, raw: RawClient) -> None:
    """Many requests in one write get their replies in order, streamed ones included."""
    files = {f"p{i}.bin": os.urandom(100 + i * 40_000) for i in range(6)}
    for name, data in files.items():
        write(shared, name, data)
    request = b"".join(b"GET " + name.encode() + b"\r\n" for name in files) + b"NOPE\r\nSTATS\r\n"
    raw.send(request)
    for name, data in files.items():
        _status, body, end = raw.read_get()
        assert body == data, name
        assert end == b"END " + sha(data).encode() + b"\r\n"
    assert raw.line().startswith(b"ERR bad-request")
    assert raw.line().startswith(b"OK ")


def test_fifty_clients_at_once(shared: Path, daemon: Daemon) -> None:
    """50 concurrent clients each get byte-identical files."""
    data = {f"c{i}.bin": os.urandom(300_000 + i) for i in range(5)}
    for name, content in data.items():
        write(shared, name, content)
    errors: list[str] = []

    def worker(n: int) -> None:
        try:
            client = RawClient(daemon.port)
            for name, content in data.items():
                _, body, end = client.get(name.encode())
                if body != content or end != b"END " + sha(content).encode() + b"\r\n":
                    errors.append(f"{n} {name}")
            client.close()
        except Exception as e:  # noqa: BLE001  # pragma: no cover - reported below
            errors.append(f"{n}: {e!r}")

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    stats = dict(row.decode().split() for row in RawClient(daemon.port).rows(b"STATS")[1])
    assert int(stats["connections_total"]) >= 51


def test_client_disconnecting_mid_transfer(shared: Path, daemon: Daemon) -> None:
    """A client leaving mid-body harms no one: no fd leak, no traceback, others served."""
    data = os.urandom(20 * 1024 * 1024)
    write(shared, "big.bin", data)
    before = open_fds(daemon.pid)
    for _ in range(5):
        s = socket.create_connection(("127.0.0.1", daemon.port))
        s.sendall(b"GET big.bin\r\n")
        s.recv(65536)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()
    client = RawClient(daemon.port)
    _, body, _end = client.get(b"big.bin")
    assert body == data
    client.close()
    wait_for(lambda: open_fds(daemon.pid) == before, 10, f"the daemon to be back to {before} descriptors")
    assert "Traceback" not in daemon.log_text()


def test_file_changed_on_disk_is_served_fresh(shared: Path, daemon: Daemon, raw: RawClient) -> None:
    """After a cached file changes, GET serves the new bytes with a new version."""
    path = write(shared, "c.txt", b"version one")
    first = raw.get(b"c.txt")
    assert raw.get(b"c.txt")[1] == b"version one"
    path.write_bytes(b"version two!")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10_000_000))
    second = raw.get(b"c.txt")
    assert second[1] == b"version two!"
    assert first[0].split()[2] != second[0].split()[2]
    path.unlink()
    assert raw.get(b"c.txt")[0].startswith(b"ERR not-found")
    assert raw.rows(b"LIST CACHED") == (b"OK\r\n", [])


HOSTILE = [
    # (request path, expected status line)
    (b"../outside.txt", b"ERR not-found no such file\r\n"),
    (b"%2e%2e/outside.txt", b"ERR not-found no such file\r\n"),
    (b"%2E%2E%2Foutside.txt", b"ERR not-found no such file\r\n"),
    (b"sub%2f..%2f..%2foutside.txt", b"ERR not-found no such file\r\n"),
    (b"/etc/passwd", b"ERR not-found no such file\r\n"),
    (b"%2fetc%2fpasswd", b"ERR not-found no such file\r\n"),
    (b"sub/../../outside.txt", b"ERR not-found no such file\r\n"),
    (b"..%5coutside.txt", b"ERR not-found no such file\r\n"),
    (b"sub\\..\\..\\outside.txt", b"ERR not-found no such file\r\n"),
    (b"ok.txt%00", b"ERR not-found no such file\r\n"),
    (b"ok.txt%00.png", b"ERR not-found no such file\r\n"),
    (b".secret", b"ERR not-found no such file\r\n"),
    (b"./ok.txt", b"ERR not-found no such file\r\n"),
    (b"sub/./ok.txt", b"ERR not-found no such file\r\n"),
    (b".git/config", b"ERR not-found no such file\r\n"),
    (b"sub//ok.txt", b"ERR not-found no such file\r\n"),
    (b"link-out", b"ERR not-found no such file\r\n"),
    (b"link-out-dir/passwd", b"ERR not-found no such file\r\n"),
    (b"link-to-dot", b"ERR not-found no such file\r\n"),
    (b"loop-a", b"ERR not-found no such file\r\n"),
    (b"loop-self/x", b"ERR not-found no such file\r\n"),
    (b"sub", b"ERR not-found no such file\r\n"),
    (b"fifo", b"ERR not-found no such file\r\n"),
    (b"null-device", b"ERR not-found no such file\r\n"),
    (b"link-dev-null", b"ERR not-found no such file\r\n"),
    (b"a/" * 2000 + b"b", b"ERR not-found no such file\r\n"),
    # Overlong and invalid UTF-8 cannot name any file: refused as malformed.
    (b"%C0%AE%C0%AE/outside.txt", b"ERR bad-request path is not UTF-8\r\n"),
    (b"%FF%FE", b"ERR bad-request path is not UTF-8\r\n"),
    (b"%zz", b"ERR bad-request malformed percent escape\r\n"),
]


def test_hostile_paths(shared: Path, daemon: Daemon, raw: RawClient) -> None:
    """Every path that leaves the folder or names a non-file is refused, with no hint, and the connection goes on."""
    # Right beside the shared folder, where ../outside.txt would lead.
    outside = shared.parent / "outside.txt"
    outside.write_bytes(b"outside")
    write(shared, ".secret", b"s")
    write(shared, ".git/config", b"[core]")
    write(shared, "ok.txt", b"ok")
    (shared / "link-out").symlink_to(outside)
    (shared / "link-out-dir").symlink_to("/etc")
    (shared / "link-to-dot").symlink_to(shared / ".secret")
    (shared / "loop-a").symlink_to("loop-b")
    (shared / "loop-b").symlink_to("loop-a")
    (shared / "loop-self").symlink_to("loop-self")
    (shared / "link-dev-null").symlink_to("/dev/null")
    (shared / "sub").mkdir()
    os.mkfifo(shared / "fifo")
    os.mknod(shared / "null-device", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    for path, expected in HOSTILE:
        assert raw.get(path)[0] == expected, path
    assert raw.get(b"ok.txt")[1] == b"ok"
    mtime = int((shared / "ok.txt").stat().st_mtime)
    assert raw.rows(b"LIST")[1] == [b"2 %d C ok.txt\r\n" % mtime]


def test_path_of_ten_thousand_components(daemon: Daemon, raw: RawClient) -> None:
    """A path of 10,000 components does not fit a request line: ERR too-long and closed."""
    raw.send(b"GET " + b"a/" * 10_000 + b"b\r\n")
    assert raw.line().startswith(b"ERR too-long ")
    assert raw.closed_by_peer()


def test_too_long_line_closes(daemon: Daemon, raw: RawClient) -> None:
    """A request line over 4096 bytes gets ERR too-long and the connection is closed."""
    raw.send(b"GET " + b"a" * 5000 + b"\r\n")
    assert raw.line().startswith(b"ERR too-long ")
    assert raw.closed_by_peer()


def test_quit_closes(daemon: Daemon, raw: RawClient) -> None:
    """QUIT: the server closes the connection."""
    raw.send(b"QUIT\r\n")
    assert raw.closed_by_peer()
    assert raw.buffer == b""


def test_access_log_lines_and_switch(shared: Path, daemon_factory: DaemonFactory) -> None:
    """One access line per reply with peer, request, status, bytes, time, cache; --no-access-log silences them."""
    write(shared, "a.txt", b"12345")
    daemon = daemon_factory(shared)
    client = RawClient(daemon.port)
    client.get(b"a.txt")
    client.get(b"a.txt")
    client.get(b"missing")
    client.close()
    # Once it has exited, every line it would write is in its log.
    assert daemon.stop() == 0
    lines = [line for line in daemon.log_text().splitlines() if "FileCacheProtocol" in line]
    assert len(lines) == 3
    assert " 127.0.0.1:" in lines[0] and " GET a.txt OK 5 " in lines[0]
    assert lines[0].endswith(" miss") and lines[1].endswith(" hit")
    assert " GET missing ERR not-found 0 " in lines[2]
    quiet = daemon_factory(shared, "--no-access-log")
    client = RawClient(quiet.port)
    client.get(b"a.txt")
    client.close()
    assert quiet.stop() == 0
    assert "FileCacheProtocol" not in quiet.log_text()
    assert "filecache serving" in quiet.log_text()


def test_daemon_never_writes_to_the_folder(shared: Path, daemon: Daemon, tmp_path: Path) -> None:
    """A busy session (lists, gets, hashes, misses, a cut transfer) leaves the shared folder exactly as it was."""
    write(shared, "a.txt", b"a" * 10)
    write(shared, "sub/b.bin", os.urandom(3 * 1024 * 1024))

    def snapshot() -> list[tuple[str, int, int, int]]:
        found = []
        for dirpath, dirnames, filenames in os.walk(shared):
            for name in sorted(dirnames + filenames):
                st = os.lstat(os.path.join(dirpath, name))
                found.append((os.path.join(dirpath, name), st.st_size, st.st_mtime_ns, st.st_mode))
        found.append((str(shared), 0, os.lstat(shared).st_mtime_ns, os.lstat(shared).st_mode))
        return sorted(found)

    before = snapshot()
    client = RawClient(daemon.port)
    client.rows(b"LIST")
    client.get(b"a.txt")
    client.get(b"sub/b.bin")
    client.get(b"sub/b.bin", 1000)
    client.send(b"HASH sub/b.bin\r\n")
    client.line()
    client.get(b"nope")
    client.close()
    cut = socket.create_connection(("127.0.0.1", daemon.port))
    cut.sendall(b"GET sub/b.bin\r\n")
    cut.recv(1000)
    cut.close()
    result = run_client("127.0.0.1", str(daemon.port), "get", "a.txt", "sub/b.bin", "-o", str(tmp_path / "out"))
    assert result.returncode == 0
    # Stopped, it has done all it will do (its shutdown too).
    assert daemon.stop() == 0
    assert snapshot() == before
