"""
The local side of a mirror, in memory and in a temporary folder: whether a
file is up to date, the digests remembered in the state file and when they
stop holding, what --delete finds and removes, a small body written in one
step, and -o -'s sink.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed

from filecache.client.errors import LocalError, VersionChanged
from filecache.client.localdigests import STATE_NAME, LocalDigests
from filecache.client.partfile import PartFile
from filecache.client.progress import Progress
from filecache.client.pruning import Extra, find_extras, remove_extras
from filecache.client.readers import FileHash
from filecache.client.selection import Wanted
from filecache.client.tostdout import StdoutSink
from filecache.client.uptodate import Local, compare

VERSION = "2a-64-18ea3fdc92c71808"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def result(d: Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


class CountingHashes:
    """A RunBlocking that runs at once and counts the files it was asked to hash."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, work: Any) -> Deferred[Any]:
        self.calls += 1
        return succeed(work())


def test_a_digest_is_read_once_then_remembered_across_runs(tmp_path: Path) -> None:
    """
    The first look reads the file; saved and loaded again (the next run),
    the same digest comes from the state file without reading the file.
    """
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * 300_000)  # over INLINE_BYTES: hashed by the runner
    runner = CountingHashes()
    digests = LocalDigests(str(tmp_path), runner)
    assert result(digests.digest("big.bin", str(big), os.lstat(big))) == sha(b"x" * 300_000)
    assert runner.calls == 1
    digests.save()
    state = json.loads((tmp_path / STATE_NAME).read_text())
    assert list(state["files"]) == ["big.bin"]

    again = LocalDigests(str(tmp_path), runner)
    again.load()
    assert result(again.digest("big.bin", str(big), os.lstat(big))) == sha(b"x" * 300_000)
    assert runner.calls == 1


def test_a_remembered_digest_stops_holding_when_the_file_is_written(tmp_path: Path) -> None:
    """
    Rewritten with the same size and its mtime put back (as cp -p would),
    the file's change time has moved: the digest is read again, and is the new one.
    """
    f = tmp_path / "f.bin"
    f.write_bytes(b"a" * 100)
    digests = LocalDigests(str(tmp_path))
    assert result(digests.digest("f.bin", str(f), os.lstat(f))) == sha(b"a" * 100)
    before = os.lstat(f)
    f.write_bytes(b"b" * 100)
    os.utime(f, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.lstat(f).st_mtime_ns == before.st_mtime_ns
    assert result(digests.digest("f.bin", str(f), os.lstat(f))) == sha(b"b" * 100)


@pytest.mark.parametrize("content", [b"my own notes\n", b"{\"format\": \"something else\"}"])
def test_a_state_file_that_is_not_ours_is_neither_read_nor_replaced(tmp_path: Path, content: bytes) -> None:
    """A file of the user's under the state file's name is left as it is, and trusted for nothing."""
    (tmp_path / STATE_NAME).write_bytes(content)
    f = tmp_path / "f.bin"
    f.write_bytes(b"a")
    digests = LocalDigests(str(tmp_path))
    digests.load()
    digests.remember("f.bin", str(f), sha(b"a"))
    digests.save()
    assert (tmp_path / STATE_NAME).read_bytes() == content


def test_a_state_file_that_appeared_meanwhile_is_not_replaced(tmp_path: Path) -> None:
    """None at load time, one of the user's at save time: it is kept."""
    digests = LocalDigests(str(tmp_path))
    digests.load()
    f = tmp_path / "f.bin"
    f.write_bytes(b"a")
    digests.remember("f.bin", str(f), sha(b"a"))
    (tmp_path / STATE_NAME).write_bytes(b"mine")
    digests.save()
    assert (tmp_path / STATE_NAME).read_bytes() == b"mine"


def server(data: bytes) -> Any:
    """A server_hash for compare(), answering for C{data} and counting its calls."""
    calls: list[int] = []

    async def ask() -> FileHash:
        calls.append(1)
        return FileHash(len(data), VERSION, sha(data))

    ask.calls = calls  # type: ignore[attr-defined]
    return ask


def test_compare_absent_same_and_different(tmp_path: Path) -> None:
    """
    No file: ABSENT, the server not asked.  Same bytes: SAME.  Another
    size per the listing: different without asking; without --force that
    is a LocalError saying so, with --force DIFFERENT.
    """
    digests = LocalDigests(str(tmp_path))
    final = tmp_path / "f.bin"
    ask = server(b"data")
    assert result(Deferred.fromCoroutine(compare(str(final), "f.bin", 4, ask, digests, False))) == (Local.ABSENT, None)
    final.write_bytes(b"data")
    assert result(Deferred.fromCoroutine(compare(str(final), "f.bin", 4, ask, digests, False)))[0] is Local.SAME
    assert len(ask.calls) == 1
    final.write_bytes(b"other!")
    with pytest.raises(LocalError, match="differs from the server's file"):
        result(Deferred.fromCoroutine(compare(str(final), "f.bin", 4, ask, digests, False)))
    assert len(ask.calls) == 1  # the listing's size already said so
    verdict, st = result(Deferred.fromCoroutine(compare(str(final), "f.bin", 4, ask, digests, True)))
    assert verdict is Local.DIFFERENT and st.st_size == 6


def test_compare_same_size_other_bytes_and_what_is_not_a_file(tmp_path: Path) -> None:
    """Same size, other bytes: the digests decide.  A folder is refused; a symlink only --force replaces."""
    digests = LocalDigests(str(tmp_path))
    final = tmp_path / "f.bin"
    final.write_bytes(b"dbta")
    with pytest.raises(LocalError, match="differs"):
        result(Deferred.fromCoroutine(compare(str(final), "f.bin", None, server(b"data"), digests, False)))
    final.unlink()
    final.mkdir()
    with pytest.raises(LocalError, match="is a folder"):
        result(Deferred.fromCoroutine(compare(str(final), "f.bin", 4, server(b"data"), digests, True)))
    link = tmp_path / "l.bin"
    link.symlink_to("elsewhere")
    with pytest.raises(LocalError, match="not a regular file"):
        result(Deferred.fromCoroutine(compare(str(link), "l.bin", 4, server(b"data"), digests, False)))
    assert result(Deferred.fromCoroutine(compare(str(link), "l.bin", 4, server(b"data"), digests, True)))[0] is Local.DIFFERENT


def test_a_file_this_client_saved_and_nobody_changed_is_outdated_not_different(tmp_path: Path) -> None:
    """
    Saved by the client (remembered as such) and untouched since, while
    the server's file changed: OUTDATED, replaced without --force.  Once
    someone writes to it, it is theirs: a LocalError without --force.
    """
    final = tmp_path / "f.bin"
    final.write_bytes(b"old!")
    digests = LocalDigests(str(tmp_path))
    digests.remember("f.bin", str(final), sha(b"old!"))
    verdict, st = result(Deferred.fromCoroutine(compare(str(final), "f.bin", 4, server(b"new!"), digests, False)))
    assert verdict is Local.OUTDATED and st.st_size == 4
    final.write_bytes(b"mine")
    with pytest.raises(LocalError, match="differs"):
        result(Deferred.fromCoroutine(compare(str(final), "f.bin", 4, server(b"new!"), digests, False)))


def make(root: Path, *paths: str) -> None:
    for rel in paths:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")


def test_delete_finds_only_what_the_names_cover_and_the_server_lacks(tmp_path: Path) -> None:
    """
    docs/ covers docs/**, logs/*.txt only .txt files directly in logs/;
    what the server still has, dot-names, and anything outside stay.
    """
    make(
        tmp_path,
        "docs/keep.txt", "docs/gone.txt", "docs/sub/gone.bin", "docs/.hidden",
        ".docs.filecache-part", "docsx/gone.txt", "logs/a.txt", "logs/a.log", "logs/old/b.txt", "top.txt",
    )
    wanted = [Wanted("docs/"), Wanted("logs/*.txt")]
    extras = find_extras(str(tmp_path), wanted, {"docs/keep.txt"})
    assert [e.rel for e in extras] == ["docs/gone.txt", "docs/sub/gone.bin", "logs/a.txt"]


def test_delete_never_follows_a_symlink(tmp_path: Path) -> None:
    """
    A symlinked folder under a mirrored folder is not walked into (its
    target's files are safe); a symlink itself is an entry, removed as a
    link, its target untouched.
    """
    outside = tmp_path / "outside"
    make(outside, "precious.txt")
    dest = tmp_path / "dest"
    (dest / "docs").mkdir(parents=True)
    (dest / "docs" / "linked").symlink_to(outside)
    extras = find_extras(str(dest), [Wanted("docs/")], set())
    assert [e.rel for e in extras] == ["docs/linked"]
    removed, problems = remove_extras(str(dest), extras)
    assert [e.rel for e in removed] == ["docs/linked"] and problems == []
    assert (outside / "precious.txt").exists()


def test_removing_extras_takes_away_the_folders_it_emptied_only(tmp_path: Path) -> None:
    """After removing docs/sub/deep/x, the emptied folders go; docs, which holds a file, stays."""
    make(tmp_path, "docs/sub/deep/x", "docs/keep")
    (tmp_path / "docs" / "untouched").mkdir()
    removed, _ = remove_extras(str(tmp_path), [Extra("docs/sub/deep/x")])
    assert [e.rel for e in removed] == ["docs/sub/deep/x"]
    assert not (tmp_path / "docs" / "sub").exists()
    assert (tmp_path / "docs" / "keep").exists() and (tmp_path / "docs" / "untouched").is_dir()


def receiving(path: str, name: str) -> PartFile:
    """A partial file claimed and begun for a 4-byte body of VERSION, from its start."""
    sink = PartFile(path, name, Progress())
    sink.claim()
    sink.prepare(0, None)
    sink.begin(4, VERSION)
    return sink


def test_a_small_body_is_written_in_one_step_without_a_sidecar(tmp_path: Path) -> None:
    """
    A body under SMALL_BODY: nothing on disk until commit, then the file
    under its final name and nothing else; cut short (keep), what came is
    kept as a resumable partial file with its sidecar.
    """
    final = tmp_path / "f.bin"
    sink = receiving(str(final), "f.bin")
    sink.write(b"da")
    assert os.listdir(tmp_path) == []
    sink.write(b"ta")
    sink.commit()
    assert os.listdir(tmp_path) == ["f.bin"] and final.read_bytes() == b"data"

    cut = receiving(str(tmp_path / "g.bin"), "g.bin")
    cut.write(b"da")
    cut.keep()
    assert sorted(os.listdir(tmp_path)) == [".g.bin.filecache-part", ".g.bin.filecache-part.json", "f.bin"]
    again = PartFile(str(tmp_path / "g.bin"), "g.bin", Progress())
    again.claim()
    info = again.resumable()
    assert info is not None and info.version == VERSION and again.have() == 2


def test_a_partial_file_someone_puts_there_during_a_small_download_is_left_alone(tmp_path: Path) -> None:
    """
    claim found the names free; a file put under the partial file's name
    while the body came is someone else's: commit fails, and neither that
    file nor a sidecar put beside it is truncated or removed.
    """
    final = tmp_path / "f.bin"
    sink = receiving(str(final), "f.bin")
    sink.write(b"data")
    part, meta = tmp_path / ".f.bin.filecache-part", tmp_path / ".f.bin.filecache-part.json"
    part.write_bytes(b"theirs")
    meta.write_bytes(b"theirs too")
    with pytest.raises(LocalError, match="not left by filecache-client"):
        sink.commit()
    assert part.read_bytes() == b"theirs" and meta.read_bytes() == b"theirs too"
    assert not final.exists()


def test_the_stdout_sink_hashes_across_a_resume_and_refuses_another_version() -> None:
    """StdoutSink writes as bytes come, hashes all it wrote, and a second part of another version is refused."""
    stream = io.BytesIO()
    sink = StdoutSink(stream, "f.bin", Progress())
    sink.begin(4, VERSION)
    sink.write(b"da")
    sink.begin(2, VERSION)
    sink.write(b"ta")
    assert stream.getvalue() == b"data" and sink.hasher.hexdigest() == sha(b"data")
    with pytest.raises(VersionChanged):
        sink.begin(2, "ff-1")
