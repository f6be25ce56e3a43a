"""
Mirroring against the real daemon (twistd, loopback): folders, -r and each
glob form, NAMEs matching nothing, a re-run that sends no body byte,
--force, --delete, --dry-run, -j 4 through a daemon that dies and comes
back, -o -, and a mistyped command.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import time
from pathlib import Path

from conftest import Daemon, DaemonFactory, run_client, stats, tool, wait_for

MiB = 1024 * 1024
PROG = "filecache-client: "
STATE = ".filecache-client-state.json"

TREE = {
    "docs/a.txt": b"a" * 10,
    "docs/b.txt": b"b" * 20,
    "docs/sub/c.txt": b"c" * 30,
    "docsx/d.txt": b"d" * 40,
    "logs/1.txt": b"1" * 50,
    "logs/2.log": b"2" * 60,
    "logs/old/3.txt": b"3" * 70,
    "top.bin": bytes(range(256)) * 400,  # over 64 KiB: written through a partial file
}


def share(folder: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)


def files_under(root: Path) -> dict[str, bytes]:
    """Every regular file under C{root} but dot-names, by relative path."""
    found: dict[str, bytes] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith("."):
                path = Path(dirpath, name)
                found[str(path.relative_to(root))] = path.read_bytes()
    return found


def client(daemon: Daemon, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return run_client("127.0.0.1", str(daemon.port), *args, timeout=timeout)


SUMMARY = re.compile(
    PROG + r"(?P<files>[\d,]+) files: (?P<fetched>[\d,]+) fetched, (?P<skipped>[\d,]+) skipped, "
    r"(?P<failed>[\d,]+) failed, .* in [\d.]+ s(, (?P<deleted>\d+) deleted)?"
)


def summary(result: subprocess.CompletedProcess[str]) -> dict[str, int]:
    """The figures of the summary line, which must be the last line on stderr."""
    match = SUMMARY.fullmatch(result.stderr.splitlines()[-1])
    assert match, result.stderr
    return {k: int(v.replace(",", "")) for k, v in match.groupdict().items() if v is not None}


def test_folders_and_r_keep_the_tree(shared: Path, daemon: Daemon, tmp_path: Path) -> None:
    """
    `get docs/`, `get -r docs` and `get docs` (a folder, not a file) fetch
    the files under docs/, sub-folders kept under -o DIR, and not docsx/;
    stdout names each file saved, stderr ends with the summary.
    """
    share(shared, TREE)
    want = {k: v for k, v in TREE.items() if k.startswith("docs/")}
    for n, args in enumerate((["docs/"], ["-r", "docs"], ["docs"])):
        out = tmp_path / f"out{n}"
        result = client(daemon, "get", *args, "-o", str(out))
        assert result.returncode == 0, result.stderr
        assert files_under(out) == want
        assert sorted(result.stdout.splitlines()) == sorted(str(out / rel) for rel in want)
        assert summary(result) == {"files": 3, "fetched": 3, "skipped": 0, "failed": 0}
        assert len(result.stderr.splitlines()) == 1  # off a terminal: no bars, the summary alone


def test_each_glob_form_and_list_with_the_same_patterns(shared: Path, daemon: Daemon, tmp_path: Path) -> None:
    """
    'logs/*.txt' stays in logs/, '**/*.txt' goes down every folder, '?' is
    one character, '[...]' a class; `list` with a pattern shows what `get`
    would fetch.
    """
    share(shared, TREE)
    cases = {
        "logs/*.txt": ["logs/1.txt"],
        "**/*.txt": ["docs/a.txt", "docs/b.txt", "docs/sub/c.txt", "docsx/d.txt", "logs/1.txt", "logs/old/3.txt"],
        "docs/?.txt": ["docs/a.txt", "docs/b.txt"],
        "docs/[b-z].txt": ["docs/b.txt"],
    }
    for n, (pattern, expected) in enumerate(cases.items()):
        out = tmp_path / f"out{n}"
        result = client(daemon, "get", pattern, "-o", str(out))
        assert result.returncode == 0, (pattern, result.stderr)
        assert sorted(files_under(out)) == expected, pattern
    listed = client(daemon, "list", "logs/*.txt", "docs/")
    assert listed.returncode == 0, listed.stderr
    names = [line.split()[-1] for line in listed.stdout.splitlines()[1:-1]]
    assert names == ["docs/a.txt", "docs/b.txt", "docs/sub/c.txt", "logs/1.txt"]


def test_a_name_that_matches_nothing_is_exit_1_and_leaves_nothing(
    shared: Path, daemon: Daemon, tmp_path: Path
) -> None:
    """
    A pattern, a folder and a plain name that match nothing: each named on
    stderr, exit 1, and no folder made for them; the other NAME is fetched.
    """
    share(shared, TREE)
    out = tmp_path / "out"
    result = client(daemon, "get", "nope/*.txt", "docs/a.txt", "-o", str(out))
    assert result.returncode == 1
    assert result.stderr.splitlines()[0] == PROG + "nope/*.txt: matches nothing on the server"
    assert files_under(out) == {"docs/a.txt": TREE["docs/a.txt"]}
    empty = tmp_path / "empty"
    for name in ("gone/", "missing.txt"):
        result = client(daemon, "get", name, "-o", str(empty))
        assert result.returncode == 1, result.stderr
        assert name.rstrip("/") in result.stderr and "Traceback" not in result.stderr
        assert not empty.exists()
    listed = client(daemon, "list", "nope/*")
    assert listed.returncode == 1
    assert listed.stderr == PROG + "nope/*: matches nothing on the server\n"


def test_a_rerun_sends_no_body_byte_and_exits_0(shared: Path, daemon: Daemon, tmp_path: Path) -> None:
    """
    After a mirror, the same get again: every file skipped as up to date,
    the daemon's bytes_sent unchanged, exit 0.  Without the state file the
    local digests are computed, with the same outcome.
    """
    share(shared, TREE)
    out = tmp_path / "out"
    first = client(daemon, "get", "**", "-o", str(out))
    assert first.returncode == 0, first.stderr
    assert files_under(out) == TREE
    assert (out / STATE).is_file()
    sent = stats(daemon.port)["bytes_sent"]
    assert sent == sum(len(v) for v in TREE.values())
    for _ in range(2):
        again = client(daemon, "get", "**", "-o", str(out))
        assert again.returncode == 0, again.stderr
        assert summary(again) == {"files": len(TREE), "fetched": 0, "skipped": len(TREE), "failed": 0}
        assert stats(daemon.port)["bytes_sent"] == sent
        (out / STATE).unlink()
    assert files_under(out) == TREE


def test_force_delete_and_dry_run(shared: Path, daemon: Daemon, tmp_path: Path) -> None:
    """
    A local file that differs: exit 5 and untouched, unless --force.
    --delete removes, under what the NAMEs cover, the files the server no
    longer has, and nothing else; --dry-run says what would change and
    changes nothing.
    """
    share(shared, TREE)
    out = tmp_path / "out"
    assert client(daemon, "get", "docs/", "logs/*.txt", "-o", str(out)).returncode == 0
    (out / "docs" / "a.txt").write_bytes(b"mine")
    differs = client(daemon, "get", "docs/", "-o", str(out))
    assert differs.returncode == 5
    assert f"{out / 'docs' / 'a.txt'} exists and differs from the server's file (use --force to overwrite)" in differs.stderr
    assert (out / "docs" / "a.txt").read_bytes() == b"mine"

    share(out, {"docs/old/gone.txt": b"x", "docs/.mine": b"x", "logs/gone.txt": b"x", "logs/keep.log": b"x", "other.txt": b"x"})
    dry = client(daemon, "get", "docs/", "logs/*.txt", "-o", str(out), "--force", "--delete", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert sorted(dry.stdout.splitlines()) == [
        f"would delete {out / 'docs' / 'old' / 'gone.txt'}",
        f"would delete {out / 'logs' / 'gone.txt'}",
        f"would replace {out / 'docs' / 'a.txt'} (10 bytes)",
    ]
    assert (out / "docs" / "a.txt").read_bytes() == b"mine" and (out / "logs" / "gone.txt").exists()

    forced = client(daemon, "get", "docs/", "logs/*.txt", "-o", str(out), "--force", "--delete")
    assert forced.returncode == 0, forced.stderr
    assert summary(forced)["deleted"] == 2
    assert (out / "docs" / "a.txt").read_bytes() == TREE["docs/a.txt"]
    assert not (out / "docs" / "old").exists()  # emptied by --delete, so removed
    for kept in ("docs/.mine", "logs/keep.log", "other.txt"):
        assert (out / kept).exists(), kept


def test_a_file_changed_on_the_server_is_updated_and_a_local_edit_is_not(
    shared: Path, daemon: Daemon, tmp_path: Path
) -> None:
    """
    After a mirror, the server's docs/a.txt and docs/b.txt change, and the
    user edits the local docs/b.txt: the re-run replaces a.txt (the client
    saved it and nobody touched it), refuses b.txt (exit 5), and with
    --force replaces it too.
    """
    share(shared, TREE)
    out = tmp_path / "out"
    assert client(daemon, "get", "docs/", "-o", str(out)).returncode == 0
    share(shared, {"docs/a.txt": b"new a", "docs/b.txt": b"new b"})
    (out / "docs" / "b.txt").write_bytes(b"my edit")
    again = client(daemon, "get", "docs/", "-o", str(out))
    assert again.returncode == 5
    assert (out / "docs" / "a.txt").read_bytes() == b"new a"
    assert (out / "docs" / "b.txt").read_bytes() == b"my edit"
    assert summary(again) == {"files": 3, "fetched": 1, "skipped": 1, "failed": 1}
    forced = client(daemon, "get", "docs/", "-o", str(out), "--force")
    assert forced.returncode == 0, forced.stderr
    assert (out / "docs" / "b.txt").read_bytes() == b"new b"


def test_four_connections_survive_the_daemon_dying_mid_mirror(
    shared: Path, daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """
    -j 4 over four large files and 200 small ones: the daemon is killed
    mid-run and comes back half a second later on the same port; the
    client retries, resumes the partial files, and the mirror finishes
    identical to the share, exit 0.
    """
    files = {f"big/{n}.bin": os.urandom(24 * MiB) for n in range(4)}
    files.update({f"small/{n:03d}.txt": os.urandom(100 + n) for n in range(200)})
    share(shared, files)
    first = daemon_factory(shared)
    out = tmp_path / "out"
    process = subprocess.Popen(
        [tool("filecache-client"), "127.0.0.1", str(first.port), "get", "big/", "small/", "-o", str(out),
         "-j", "4", "--retries", "10"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    parts = [out / "big" / f".{n}.bin.filecache-part" for n in range(4)]
    wait_for(lambda: any(p.exists() and p.stat().st_size >= 2 * MiB for p in parts), 30, "a partial file")
    process.send_signal(signal.SIGSTOP)
    first.stop(signal.SIGKILL)
    process.send_signal(signal.SIGCONT)
    time.sleep(0.5)  # the client finds no one there, and retries
    second = daemon_factory(shared, port=f"tcp:{first.port}:interface=127.0.0.1")
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert files_under(out) == files
    assert "retrying in" in stderr
    assert re.search(r"GET big/\d\.bin \d+ OK", second.log_text()), "no partial file was resumed"
    assert summary(subprocess.CompletedProcess([], 0, stdout, stderr))["fetched"] == len(files)


def test_o_dash_writes_one_file_to_stdout_and_nothing_else(shared: Path, daemon: Daemon, tmp_path: Path) -> None:
    """
    `-o -`: the file's bytes on stdout, no partial file anywhere; a pattern
    matching one file works, one matching several is a usage error (exit 2).
    """
    share(shared, TREE)
    for name in ("top.bin", "*.bin"):
        result = subprocess.run(
            [tool("filecache-client"), "127.0.0.1", str(daemon.port), "get", name, "-o", "-"],
            cwd=tmp_path, capture_output=True, timeout=60, check=False, stdin=subprocess.DEVNULL,
        )
        assert result.returncode == 0, result.stderr
        assert hashlib.sha256(result.stdout).hexdigest() == hashlib.sha256(TREE["top.bin"]).hexdigest()
        assert result.stderr == b""
        assert os.listdir(tmp_path) == []
    several = client(daemon, "get", "docs/*", "-o", "-")
    assert several.returncode == 2
    assert several.stderr == PROG + "-o - writes one file, and docs/* matches 2\n"


def test_a_mistyped_command_is_named(shared: Path, daemon: Daemon, tmp_path: Path) -> None:
    """`lst` is neither a command nor a shared file: exit 1 and 'did you mean "list"?'."""
    result = run_client("127.0.0.1", str(daemon.port), "lst", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr == PROG + 'lst: not found on the server; did you mean "list"?\n'
    assert os.listdir(tmp_path) == []
