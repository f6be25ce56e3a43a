"""
Resuming downloads: a lost connection is retried and resumes from the
partial file (.NAME.filecache-part) with GET <path> <offset> when the
version still matches; a re-run after the client itself was killed resumes
the same way; the whole file's SHA-256 is checked before the rename.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from conftest import Daemon, DaemonFactory, RawClient, run_client, stats, tool, wait_for

MiB = 1024 * 1024


def part(out: Path, name: str) -> Path:
    """Where the client keeps a partial download of C{name}."""
    return out / f".{name}.filecache-part"


def sidecar(out: Path, name: str) -> Path:
    return out / f".{name}.filecache-part.json"


def start_download(port: int, name: str, out: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [tool("filecache-client"), "127.0.0.1", str(port), "get", name, "-o", str(out), "--quiet", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def stop_when_part_has(process: subprocess.Popen[str], part: Path, size: int) -> int:
    """SIGSTOP the client once C{part} holds C{size} bytes; return its size then."""
    wait_for(lambda: part.exists() and part.stat().st_size >= size, 30, f"{part} to reach {size}")
    process.send_signal(signal.SIGSTOP)
    # A signal is delivered a little later: wait until the kernel shows it stopped.
    wait_for(lambda: process_state(process.pid) == "T", 10, "the client to stop")
    return part.stat().st_size


def process_state(pid: int) -> str:
    """The state letter of process C{pid} in /proc (T: stopped)."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]


def test_lost_connection_resumes_from_the_part(
    shared: Path, daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """The server dies mid-file and comes back: the client retries, resumes at its offset, and the file is whole."""
    data = os.urandom(100 * MiB)
    (shared / "big.bin").write_bytes(data)
    first = daemon_factory(shared)
    out = tmp_path / "out"
    process = start_download(first.port, "big.bin", out, "--retries", "5")
    stop_when_part_has(process, part(out, "big.bin"), 20 * MiB)
    first.stop(signal.SIGKILL)
    second = daemon_factory(shared, port=f"tcp:{first.port}:interface=127.0.0.1")
    process.send_signal(signal.SIGCONT)
    _stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert (out / "big.bin").read_bytes() == data
    assert sorted(p.name for p in out.iterdir()) == ["big.bin"]
    assert "connection lost after" in stderr and "retrying in" in stderr
    # The second server sent only the rest, not the whole file again.
    sent = stats(second.port)["bytes_sent"]
    assert 0 < sent <= len(data) - 20 * MiB
    assert "GET big.bin " in second.log_text()  # the request carried an offset
    assert "HASH big.bin" in second.log_text()


def test_rerun_after_the_client_was_killed_resumes(shared: Path, daemon: Daemon, tmp_path: Path) -> None:
    """Kill the client mid-file, run the same get again: it resumes from the .part and verifies the whole file."""
    data = os.urandom(100 * MiB)
    (shared / "big.bin").write_bytes(data)
    out = tmp_path / "out"
    process = start_download(daemon.port, "big.bin", out)
    have = stop_when_part_has(process, part(out, "big.bin"), 30 * MiB)
    process.kill()
    process.wait(10)
    meta = json.loads(sidecar(out, "big.bin").read_text())
    assert meta["path"] == "big.bin" and meta["size"] == len(data)
    before = stats(daemon.port)["bytes_sent"]
    result = run_client("127.0.0.1", str(daemon.port), "get", "big.bin", "-o", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    assert (out / "big.bin").read_bytes() == data
    assert sorted(p.name for p in out.iterdir()) == ["big.bin"]
    resumed = stats(daemon.port)["bytes_sent"] - before
    assert resumed <= len(data) - have + 16 * MiB  # only the rest (the .part may trail the socket)
    assert resumed < len(data)


def leave_part(daemon: Daemon, out: Path, name: str, content: bytes) -> None:
    """Leave C{content} as the partial file of C{name} with its sidecar, as a killed client would."""
    client = RawClient(daemon.port)
    client.send(b"HASH " + name.encode() + b"\r\n")
    size, version, _ = client.line().split()[1:]
    client.close()
    out.mkdir(exist_ok=True)
    part(out, name).write_bytes(content)
    sidecar(out, name).write_text(
        json.dumps({"path": name, "version": version.decode(), "size": int(size)})
    )


def test_changed_file_starts_over(shared: Path, daemon: Daemon, tmp_path: Path) -> None:
    """A .part of an older version is not resumed: the new version is fetched whole."""
    old = os.urandom(8 * MiB)
    (shared / "f.bin").write_bytes(old)
    out = tmp_path / "out"
    leave_part(daemon, out, "f.bin", old[: 2 * MiB])
    new = os.urandom(8 * MiB)
    (shared / "f.bin").write_bytes(new)
    os.utime(shared / "f.bin", ns=(time.time_ns(), time.time_ns() + 5_000_000_000))
    result = run_client("127.0.0.1", str(daemon.port), "get", "f.bin", "-o", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    assert (out / "f.bin").read_bytes() == new
    assert sorted(p.name for p in out.iterdir()) == ["f.bin"]


def test_corrupt_part_is_caught_by_the_whole_file_digest(shared: Path, daemon: Daemon, tmp_path: Path) -> None:
    """A .part whose bytes were damaged fails the whole-file SHA-256 and is fetched again from the start."""
    data = os.urandom(8 * MiB)
    (shared / "f.bin").write_bytes(data)
    out = tmp_path / "out"
    leave_part(daemon, out, "f.bin", b"\0" * 1000 + data[1000 : 2 * MiB])
    result = run_client("127.0.0.1", str(daemon.port), "get", "f.bin", "-o", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    assert (out / "f.bin").read_bytes() == data
    assert "HASH f.bin" in daemon.log_text()
    assert f"GET f.bin {2 * MiB} OK" in daemon.log_text()


def test_corrupt_part_without_retries_fails_cleanly(shared: Path, daemon: Daemon, tmp_path: Path) -> None:
    """With --retries 0 a damaged .part is an integrity failure: exit 4, no final file, the .part removed."""
    data = os.urandom(4 * MiB)
    (shared / "f.bin").write_bytes(data)
    out = tmp_path / "out"
    leave_part(daemon, out, "f.bin", b"\0" * 1000 + data[1000 : 1 * MiB])
    result = run_client("127.0.0.1", str(daemon.port), "get", "f.bin", "-o", str(out), "--retries", "0")
    assert result.returncode == 4
    assert "integrity check failed" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == []


def test_files_under_the_old_part_names_are_neither_resumed_nor_touched(
    shared: Path, daemon: Daemon, tmp_path: Path
) -> None:
    """
    NAME.part and NAME.part.json, the names clients before issue 8 used,
    are the user's files now: a get fetches the whole file afresh (no HASH,
    no offset) and leaves both exactly as they were.
    """
    data = os.urandom(4 * MiB)
    (shared / "f.bin").write_bytes(data)
    out = tmp_path / "out"
    leave_part(daemon, out, "f.bin", data[: 2 * MiB])
    part(out, "f.bin").rename(out / "f.bin.part")
    sidecar(out, "f.bin").rename(out / "f.bin.part.json")
    old_meta = (out / "f.bin.part.json").read_bytes()
    before = stats(daemon.port)["bytes_sent"]
    result = run_client("127.0.0.1", str(daemon.port), "get", "f.bin", "-o", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    assert (out / "f.bin").read_bytes() == data
    assert stats(daemon.port)["bytes_sent"] - before == len(data)
    assert f"GET f.bin {2 * MiB}" not in daemon.log_text()
    assert (out / "f.bin.part").read_bytes() == data[: 2 * MiB]
    assert (out / "f.bin.part.json").read_bytes() == old_meta
    assert sorted(p.name for p in out.iterdir()) == ["f.bin", "f.bin.part", "f.bin.part.json"]


def test_hash_verb(shared: Path, daemon: Daemon) -> None:
    """HASH <path>: OK <size> <version> <sha256> of the whole file, without sending it."""
    import hashlib

    data = os.urandom(3 * MiB)
    (shared / "h.bin").write_bytes(data)
    client = RawClient(daemon.port)
    client.send(b"HASH h.bin\r\n")
    size, version, digest = client.line().split()[1:]
    assert int(size) == len(data)
    assert digest.decode() == hashlib.sha256(data).hexdigest()
    status = client.get(b"h.bin")[0]
    assert status.split()[2] == version
    client.send(b"HASH nope\r\n")
    assert client.line() == b"ERR not-found no such file\r\n"
