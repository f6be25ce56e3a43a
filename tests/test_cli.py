"""
The command line: argument forms, human sizes, and the progress bar, which
shows on a terminal (a real pseudo-terminal here) and nowhere else.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import Daemon, run_client, tool

from filecache.cli import Invocation, UsageError, build_parser, human_size


def parse(*argv: str) -> Invocation:
    return Invocation(build_parser().parse_intermixed_args(list(argv)))


def test_human_sizes() -> None:
    """Sizes print in bytes below 1 KiB and in binary units with one decimal above."""
    assert human_size(0) == "0 B"
    assert human_size(1023) == "1023 B"
    assert human_size(1536) == "1.5 KiB"
    assert human_size(64 * 1024 * 1024) == "64.0 MiB"
    assert human_size(3 * 1024**4) == "3.0 TiB"


def test_command_forms() -> None:
    """list/get/stats are commands; anything else is the seed form NAME [DIR]; options go anywhere."""
    inv = parse("h", "5000", "get", "a", "b/c", "-o", "out", "--quiet")
    assert (inv.command, inv.names, inv.folder, inv.quiet) == ("get", ["a", "b/c"], "out", True)
    inv = parse("h", "5000", "file.txt", "dest")
    assert (inv.command, inv.names, inv.folder) == ("get", ["file.txt"], "dest")
    inv = parse("h", "5000", "--cached", "list", "--json")
    assert (inv.command, inv.cached, inv.json) == ("list", True, True)
    assert parse("h", "5000", "stats").command == "stats"
    assert parse("h", "5000", "get", "x").retries == 3
    assert parse("h", "5000", "get", "x", "--timeout", "0").timeout is None
    assert parse("h", "5000", "list", "--cafile", "ca.pem").tls is True


@pytest.mark.parametrize(
    "argv, message",
    [
        (("h", "port", "list"), "port must be a number"),
        (("h", "70000", "list"), "port out of range"),
        (("h", "1", "get"), "get needs at least one NAME"),
        (("h", "1", "stats", "x"), "stats takes no names"),
        (("h", "1", "a", "b", "c"), "expected NAME [DIR]"),
        (("h", "1", "a", "b", "-o", "c"), "give DIR or -o DIR, not both"),
        (("h", "1", "get", "a", "--retries", "-1"), "--retries must not be negative"),
        (("h", "1", "list", "--insecure", "--cafile", "x"), "not both"),
    ],
)
def test_usage_errors(argv: tuple[str, ...], message: str) -> None:
    """Command lines that cannot work are refused with a message saying why."""
    with pytest.raises(UsageError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse(*argv)


def test_progress_bar_on_a_terminal(shared: Path, daemon: Daemon, tmp_path: Path) -> None:
    """On a terminal, each download shows a tqdm bar on stderr (name, percentage, size, rate); --quiet hides it."""
    if shutil.which("script") is None:
        pytest.fail("`script` (util-linux) is needed to give the client a terminal")
    (shared / "bar.bin").write_bytes(b"x" * 300_000)
    out = tmp_path / "out"
    command = " ".join(
        shlex.quote(word)
        for word in [tool("filecache-client"), "127.0.0.1", str(daemon.port), "get", "bar.bin", "-o", str(out)]
    )
    typescript = tmp_path / "typescript"
    result = subprocess.run(
        ["script", "-qec", f"stty cols 100 rows 20; {command}", str(typescript)],
        check=False, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    screen = typescript.read_text(errors="replace").replace("\r", "\n")
    assert "bar.bin: 100%|" in screen
    assert "293k/293k" in screen
    assert (out / "bar.bin").read_bytes() == b"x" * 300_000
    quiet = subprocess.run(
        ["script", "-qec", f"stty cols 100 rows 20; {command} --force --quiet", str(typescript)],
        check=False, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
    )
    assert quiet.returncode == 0
    assert "%|" not in typescript.read_text(errors="replace")


def test_no_progress_bar_off_a_terminal_or_quiet(shared: Path, daemon: Daemon, tmp_path: Path) -> None:
    """Without a terminal (or with --quiet) stderr stays empty on success; stdout names the file."""
    (shared / "bar.bin").write_bytes(b"x" * 300_000)
    result = run_client("127.0.0.1", str(daemon.port), "get", "bar.bin", "-o", str(tmp_path / "out"))
    assert result.returncode == 0
    assert result.stderr == ""
    assert result.stdout == f"{tmp_path / 'out' / 'bar.bin'}\n"
