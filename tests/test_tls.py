"""
TLS end to end: the daemon on an ssl: endpoint, the client with --tls, a
throwaway CA made at run time.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from conftest import Daemon, DaemonFactory, make_tls_files, run_client


def start_tls_daemon(shared: Path, tmp_path: Path, daemon_factory: DaemonFactory) -> tuple[Daemon, Path]:
    tls = make_tls_files(tmp_path)
    port = f"ssl:0:interface=127.0.0.1:privateKey={tls.key}:certKey={tls.cert}"
    return daemon_factory(shared, port=port), tls.ca


def test_verified_tls_download(shared: Path, tmp_path: Path, daemon_factory: DaemonFactory) -> None:
    """--tls --cafile: listing and a large (streamed) download over a verified connection."""
    data = os.urandom(3 * 1024 * 1024 + 5)
    (shared / "big.bin").write_bytes(data)
    (shared / "small.txt").write_bytes(b"small")
    daemon, ca = start_tls_daemon(shared, tmp_path, daemon_factory)
    out = tmp_path / "out"
    port = str(daemon.port)
    listing = run_client("localhost", port, "list", "--tls", "--cafile", str(ca))
    assert listing.returncode == 0, listing.stderr
    assert "big.bin" in listing.stdout
    for _ in range(2):  # a miss read through FileSender, then a cache hit
        result = run_client("localhost", port, "get", "big.bin", "small.txt", "-o", str(out), "--force", "--tls", "--cafile", str(ca))
        assert result.returncode == 0, result.stderr
        assert hashlib.sha256((out / "big.bin").read_bytes()).digest() == hashlib.sha256(data).digest()
        assert (out / "small.txt").read_bytes() == b"small"


def test_wrong_host_certificate_is_refused(shared: Path, tmp_path: Path, daemon_factory: DaemonFactory) -> None:
    """A certificate for another name is refused: exit 3, a clear line, no file."""
    (shared / "a.txt").write_bytes(b"secret")
    daemon, ca = start_tls_daemon(shared, tmp_path, daemon_factory)
    out = tmp_path / "out"
    result = run_client("127.0.0.1", str(daemon.port), "get", "a.txt", "-o", str(out), "--tls", "--cafile", str(ca))
    assert result.returncode == 3
    assert "TLS handshake failed" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (out / "a.txt").exists()


def test_untrusted_ca_is_refused(shared: Path, tmp_path: Path, daemon_factory: DaemonFactory) -> None:
    """Without --cafile the throwaway CA is not trusted: exit 3."""
    (shared / "a.txt").write_bytes(b"x")
    daemon, _ = start_tls_daemon(shared, tmp_path, daemon_factory)
    result = run_client("localhost", str(daemon.port), "list", "--tls")
    assert result.returncode == 3
    assert "TLS handshake failed" in result.stderr


def test_insecure_skips_verification_with_a_warning(shared: Path, tmp_path: Path, daemon_factory: DaemonFactory) -> None:
    """--insecure connects to a wrong-host certificate, and says so."""
    (shared / "a.txt").write_bytes(b"unchecked")
    daemon, _ = start_tls_daemon(shared, tmp_path, daemon_factory)
    out = tmp_path / "out"
    result = run_client("127.0.0.1", str(daemon.port), "get", "a.txt", "-o", str(out), "--insecure")
    assert result.returncode == 0, result.stderr
    assert "warning: --insecure" in result.stderr
    assert (out / "a.txt").read_bytes() == b"unchecked"
