"""
Tests for L{filecache.daemon.pages.FolderPage} and the folder opening under
it (L{SharedFolder.open_folder}, L{SharedFolder.is_folder}): what a folder
page lists and in which order, how it is escaped and framed, how it ends
when reading fails, and that it streams under backpressure.  In memory.
"""

from __future__ import annotations

import errno
import json
import os
import re
import time
import tracemalloc
import weakref
from collections.abc import Callable, Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, TypeVar

import h11
import pytest
from conftest import QueuedSteps, make_empty_files, ram_folder
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from filecache.daemon.diskwork import BlockingRunner, run_now
from filecache.daemon.folder import NotShared, SharedFolder
from filecache.daemon.foldernames import NAMES_STEP, SETTLE_NS, FolderNames, FolderNamesStore
from filecache.daemon.folders import FolderEntry, OpenedFolder
from filecache.daemon.listing import KERNEL_QUEUE, ListResult
from filecache.daemon.pages import LAST_CHUNK, FolderPage, human_size, when
from filecache.daemon.transfer import TransferFailed
from filecache.daemon.walk import WALK_STEP, open_folder_fd
from filecache.wire import printable, unquote_path

T = TypeVar("T")

Marked = Callable[[bytes, os.stat_result], bool]


def never(path: bytes, st: os.stat_result) -> bool:
    return False


class Recorder(StringTransport):
    """A StringTransport that keeps every write apart."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)


class SlowReader(StringTransport):
    """A consumer that pauses its producer once more than C{limit} bytes wait unread."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.reader_paused = False
        self.most_held = 0

    def write(self, data: bytes) -> None:
        super().write(data)
        held = len(self.value())
        self.most_held = max(self.most_held, held)
        if held > self.limit and not self.reader_paused:
            self.reader_paused = True
            assert self.producer is not None
            self.producer.pauseProducing()

    def take(self) -> bytes:
        """Read everything waiting, and let the producer go on."""
        data: bytes = self.value()
        self.clear()
        if self.reader_paused:
            self.reader_paused = False
            assert self.producer is not None
            self.producer.resumeProducing()
        return data


def page(
    folder: SharedFolder,
    path: str = "",
    form: str = "json",
    *,
    chunked: bool = False,
    marked: Marked = never,
    run_blocking: BlockingRunner = run_now,
    max_entries: int = 1_000_000,
) -> FolderPage:
    return FolderPage(
        folder.open_folder(path),
        path,
        form,
        chunked=chunked,
        run_blocking=run_blocking,
        marked=marked,
        max_entries=max_entries,
    )


def body_of(body: FolderPage, consumer: StringTransport | None = None) -> tuple[bytes, ListResult]:
    """Send C{body} with disk steps run in place; its bytes and its result."""
    consumer = consumer if consumer is not None else StringTransport()
    results: list[ListResult] = []
    body.send(consumer).addCallback(results.append)
    assert results, "the page did not finish"
    assert consumer.producer is None
    return consumer.value(), results[0]


def listed(folder: SharedFolder, path: str = "", **kw: Any) -> list[dict[str, Any]]:
    data, result = body_of(page(folder, path, "json", **kw))
    assert result.error is None
    entries: list[dict[str, Any]] = json.loads(data)
    assert result.rows == len(entries)
    return entries


class PageParser(HTMLParser):
    """The links (href, text), the cells of each table row, the title and h1."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.links: list[tuple[str, str]] = []
        self.rows: list[list[str]] = []
        self.texts: dict[str, str] = {}
        self._href: str | None = None
        self._text: list[str] = []
        self._tag = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._tag = tag
        if tag == "a":
            self._href = dict(attrs)["href"]
            self._text = []
        elif tag == "tr":
            self.rows.append([])
        elif tag == "td":
            self.rows[-1].append("")

    def handle_data(self, data: str) -> None:
        if self._href is not None:
            self._text.append(data)
        if self._tag in ("title", "h1", "p"):
            self.texts[self._tag] = self.texts.get(self._tag, "") + data
        if self._tag in ("td", "a") and self.rows and self.rows[-1]:
            self.rows[-1][-1] += data

    def handle_endtag(self, tag: str) -> None:
        self._tag = ""
        if tag == "a" and self._href is not None:
            self.links.append((self._href, "".join(self._text)))
            self._href = None


def parsed(data: bytes) -> PageParser:
    parser = PageParser()
    parser.feed(data.decode("utf-8"))
    parser.close()
    return parser


def dechunked(data: bytes) -> tuple[bytes, bool]:
    """A chunked body decoded by h11 (strict): its bytes, and whether it ended properly."""
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    client.send(h11.EndOfMessage())
    client.receive_data(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + data)
    out = b""
    ended = False
    while True:
        event = client.next_event()
        if event is h11.NEED_DATA or event is h11.PAUSED:
            break
        if isinstance(event, h11.Data):
            out += event.data
        elif isinstance(event, h11.EndOfMessage):
            ended = True
    return out, ended


def one_chunk(write: bytes) -> bytes:
    """The data of C{write}, which must be exactly one chunk (our own strict reading)."""
    size, rest = write.split(b"\r\n", 1)
    assert re.fullmatch(rb"[0-9a-f]+", size), write[:20]
    n = int(size, 16)
    assert len(rest) == n + 2 and rest.endswith(b"\r\n"), (n, len(rest))
    return rest[:n]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# What is listed, and in which order


def test_folders_first_then_files_each_sorted_by_utf8_bytes(tmp_path: Path) -> None:
    """Subfolders come first, then files, each sorted by the UTF-8 bytes of the name."""
    for name in ["b.txt", "a.txt", "B.txt", "é.txt", "z.txt", "_x", "Ω"]:
        (tmp_path / name).write_bytes(b"")
    for name in ["zdir", "Adir", "mdir", "édir"]:
        (tmp_path / name).mkdir()
    paths = [e["path"] for e in listed(SharedFolder(str(tmp_path)))]
    assert paths == ["Adir/", "mdir/", "zdir/", "édir/", "B.txt", "_x", "a.txt", "b.txt", "z.txt", "é.txt", "Ω"]
    links = [href for href, _ in parsed(body_of(page(SharedFolder(str(tmp_path)), form="html"))[0]).links]
    assert [unquote_path(h.encode()) for h in links] == paths


def make_zoo(tmp_path: Path) -> Path:
    """A shared folder holding one of everything that must and must not be listed."""
    share = tmp_path / "share"
    share.mkdir()
    (tmp_path / "outside.txt").write_bytes(b"secret")
    (tmp_path / "outside").mkdir()
    (share / "visible.txt").write_bytes(b"hello")
    (share / ".hidden").write_bytes(b"x")
    (share / ".git").mkdir()
    (share / ".git" / "config").write_bytes(b"x")
    (share / "sub").mkdir()
    (share / "sub" / "in-sub.txt").write_bytes(b"abc")
    (share / "back\\slash").write_bytes(b"x")
    os.close(os.open(bytes(share) + b"/bad-\xff-utf8", os.O_CREAT | os.O_WRONLY, 0o644))
    os.mkdir(bytes(share) + b"/bad-\xfe-dir")
    os.mkfifo(share / "fifo")
    os.symlink("visible.txt", share / "inside-link")
    os.symlink("sub/in-sub.txt", share / "link-into-sub")
    os.symlink("sub", share / "linked-folder")
    os.symlink(str(tmp_path / "outside"), share / "outside-folder")
    os.symlink("../outside.txt", share / "escape")
    os.symlink(".hidden", share / "to-hidden")
    os.symlink(".git/config", share / "into-dotfolder")
    os.symlink("missing", share / "dangling")
    os.symlink("fifo", share / "to-fifo")
    return share


def test_only_real_folders_and_shared_files_are_listed(tmp_path: Path) -> None:
    """
    Dotfiles, dot-folders, folder symlinks, symlinks out of the folder or
    through a dot component, dangling ones, FIFOs, backslashes and names
    that are not UTF-8 are left out; a symlink to a shared file is listed
    with its target's size.
    """
    share = make_zoo(tmp_path)
    entries = listed(SharedFolder(str(share)))
    assert [e["path"] for e in entries] == ["sub/", "inside-link", "link-into-sub", "visible.txt"]
    assert entries[1]["size"] == 5 and entries[2]["size"] == 3


def test_the_files_listed_are_the_files_list_shows_at_that_level(tmp_path: Path) -> None:
    """A folder page accepts exactly the files the LIST walk accepts (top level of the zoo)."""
    share = make_zoo(tmp_path)
    folder = SharedFolder(str(share))
    walk = folder.walk()
    walked: list[bytes] = []
    while (rows := walk.next_rows(lambda path, st: path)) is not None:
        walked.extend(rows)
    walk.close()
    files = [e["path"] for e in listed(folder) if e["type"] == "file"]
    assert files == sorted(p.decode() for p in walked if b"/" not in p)


def test_json_entries_carry_the_list_fields_and_paths_from_the_shared_folder(tmp_path: Path) -> None:
    """
    JSON: files have path (relative to the shared folder), size, mtime (Unix
    seconds), cached (from marked, asked with the whole path) and type;
    folders a path ending in / , type folder and mtime.
    """
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    f = tmp_path / "a" / "b" / "x.txt"
    f.write_bytes(b"12345")
    os.utime(f, ns=(0, 1_700_000_000_900_000_000))
    os.utime(tmp_path / "a" / "b" / "c", (0, 1_600_000_000))
    asked: list[bytes] = []

    def marked(path: bytes, st: os.stat_result) -> bool:
        asked.append(path)
        return st.st_size == 5

    entries = listed(SharedFolder(str(tmp_path)), "a/b", marked=marked)
    assert entries == [
        {"path": "a/b/c/", "type": "folder", "mtime": 1_600_000_000},
        {"path": "a/b/x.txt", "size": 5, "mtime": 1_700_000_000, "cached": True, "type": "file"},
    ]
    assert asked == [b"a/b/x.txt"]


def test_an_empty_folder_is_an_empty_array_and_an_empty_table(tmp_path: Path) -> None:
    """An empty folder: [] in JSON, a page with no entry in HTML."""
    folder = SharedFolder(str(tmp_path))
    assert listed(folder) == []
    data, result = body_of(page(folder, form="html"))
    assert result.rows == 0 and parsed(data).links == []


def test_an_entry_gone_between_its_name_and_its_stat_is_left_out(tmp_path: Path) -> None:
    """A file removed, or a folder swapped for a symlink, after the names were read is left out."""
    (tmp_path / "gone.txt").write_bytes(b"")
    (tmp_path / "kept.txt").write_bytes(b"")
    (tmp_path / "d").mkdir()
    steps = QueuedSteps()
    body = page(SharedFolder(str(tmp_path)), run_blocking=steps)
    consumer = StringTransport()
    body.send(consumer)
    steps.run_one()  # the names
    (tmp_path / "gone.txt").unlink()
    (tmp_path / "d").rmdir()
    os.symlink("kept.txt", tmp_path / "d")
    steps.run_all()
    assert [e["path"] for e in json.loads(consumer.value())] == ["kept.txt"]


# HTML


def test_html_page_has_doctype_charset_title_parent_link_and_columns(tmp_path: Path) -> None:
    """
    A sub-folder's page: doctype, charset, "Index of /a/b/" as title and h1,
    Name / Size / Modified columns, "../" first, folders with a trailing /.
    No script.
    """
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    (tmp_path / "a" / "b" / "f.bin").write_bytes(b"x" * 1536)
    os.utime(tmp_path / "a" / "b" / "f.bin", (0, 86400 + 3600 + 120 + 59))
    data, result = body_of(page(SharedFolder(str(tmp_path)), "a/b", "html"))
    text = data.decode("utf-8")
    assert text.startswith("<!DOCTYPE html>\n") and text.endswith("</html>\n")
    assert '<meta charset="utf-8">' in text and "<script" not in text
    for header in ("<th>Name</th>", "<th>Size</th>", "<th>Modified (UTC)</th>"):
        assert header in text
    p = parsed(data)
    assert p.texts["title"] == p.texts["h1"] == "Index of /a/b/"
    assert p.links == [("../", "../"), ("c/", "c/"), ("f.bin", "f.bin")]
    assert p.rows[-1] == ["f.bin", "1.5 KiB", "1970-01-02 01:02"]
    assert p.rows[-2][0:2] == ["c/", "-"]
    assert result.rows == 2


def test_the_root_page_has_no_parent_link(tmp_path: Path) -> None:
    """At the root: title "Index of /", no "../"."""
    (tmp_path / "f").write_bytes(b"")
    p = parsed(body_of(page(SharedFolder(str(tmp_path)), form="html"))[0])
    assert p.texts["title"] == "Index of /"
    assert p.links == [("f", "f")]


ODD_NAMES = [
    "a<b>.txt", "b&c.txt", 'q"uote.txt', "it's.txt", "with space.txt", "new\nline.txt",
    "tab\t.txt", "esc\x1b[2J.txt", "é-ü-ω-😀.txt", "100%.txt", "%41.txt", "a:b.txt",
    "?q=1#frag", "<img src=x onerror=alert(1)>",
]


def test_odd_names_are_escaped_for_html_and_percent_encoded_in_links(tmp_path: Path) -> None:
    """
    Each odd name (markup, quotes, spaces, control characters, unicode, %)
    is shown as printable() of it, HTML-escaped, and linked by its
    percent-encoding: the link decodes back to the name, and holds nothing
    but unreserved characters and escapes.
    """
    for name in ODD_NAMES:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "<d&>").mkdir()
    data, _ = body_of(page(SharedFolder(str(tmp_path)), form="html"))
    text = data.decode("utf-8")
    assert "<img" not in text and "\x1b" not in text and "<b>" not in text
    links = dict(parsed(data).links)
    assert len(links) == len(ODD_NAMES) + 1
    for name in [*ODD_NAMES, "<d&>/"]:
        href = next(h for h, shown in links.items() if shown == printable(name))
        assert re.fullmatch(r"[A-Za-z0-9._~%/-]+", href), href
        assert unquote_path(href.encode()) == name
    assert links["new%0Aline.txt"] == "new\\x0aline.txt"
    assert links["100%25.txt"] == "100%.txt"
    title = parsed(body_of(page(SharedFolder(str(tmp_path)), "<d&>", "html"))[0]).texts["title"]
    assert title == "Index of /<d&>/"


def test_odd_names_in_json_are_plain_ascii_and_decode_back(tmp_path: Path) -> None:
    """JSON is plain ASCII (\\u escapes) and each path decodes to the name."""
    for name in ODD_NAMES:
        (tmp_path / name).write_bytes(b"")
    data, _ = body_of(page(SharedFolder(str(tmp_path))))
    assert data.isascii()
    assert sorted(e["path"] for e in json.loads(data)) == sorted(ODD_NAMES)


def test_json_entries_are_the_bytes_json_dumps_gives(tmp_path: Path) -> None:
    """
    Each JSON entry is exactly json.dumps (ASCII) of its fields in the
    documented order: odd names, a folder, cached and not, a time before
    1970.
    """
    for name in ODD_NAMES:
        (tmp_path / name).write_bytes(b"abc")
    (tmp_path / "<d&>").mkdir()
    os.utime(tmp_path / "b&c.txt", ns=(0, -5_500_000_000))
    data, _ = body_of(page(SharedFolder(str(tmp_path)), marked=lambda path, st: b"%" in path))
    order = {"folder": ("path", "type", "mtime"), "file": ("path", "size", "mtime", "cached", "type")}
    expected = []
    for entry in json.loads(data):
        assert tuple(entry) == order[entry["type"]]
        expected.append(json.dumps(entry, ensure_ascii=True).encode("ascii"))
    assert data == b"[\n" + b",\n".join(expected) + b"\n]\n"
    assert b'"cached": true' in data and b'"cached": false' in data and b'"mtime": -6' in data


def test_human_sizes_and_times() -> None:
    """Sizes in B below 1 KiB, then one decimal in KiB, MiB, GiB; times as YYYY-MM-DD HH:MM UTC."""
    assert [human_size(n) for n in (0, 1023, 1024, 1536, 1_048_575, 5 << 20, 3 << 30, 5 << 40)] == [
        "0 B", "1023 B", "1.0 KiB", "1.5 KiB", "1.0 MiB", "5.0 MiB", "3.0 GiB", "5120.0 GiB",
    ]
    assert when(0) == "1970-01-01 00:00"
    assert when(1_700_000_000 * 10**9) == "2023-11-14 22:13"
    assert when(10**30) == "?"


def test_an_unknown_form_is_refused(tmp_path: Path) -> None:
    """Only html and json pages exist; each says its Content-Type."""
    folder = SharedFolder(str(tmp_path))
    with pytest.raises(ValueError):
        page(folder, form="xml")
    assert page(folder, form="html").content_type == "text/html; charset=utf-8"
    assert page(folder, form="json").content_type == "application/json"


# Framing


@pytest.mark.parametrize("form", ["html", "json"])
def test_chunked_every_write_is_one_chunk_and_the_body_decodes_exactly(tmp_path: Path, form: str) -> None:
    """
    chunked: every write is exactly one chunk, the last one is 0 CRLF CRLF,
    h11 decodes the body to the unchunked page and sees its end; sent counts
    the framing too.
    """
    for n in range(2500):
        (tmp_path / f"f{n:04d}").write_bytes(b"")
    folder = SharedFolder(str(tmp_path))
    raw, _ = body_of(page(folder, form=form))
    recorder = Recorder()
    data, result = body_of(page(folder, form=form, chunked=True), recorder)
    assert recorder.writes[-1] == LAST_CHUNK
    assert b"".join(one_chunk(w) for w in recorder.writes[:-1]) == raw
    assert len(recorder.writes) >= 4  # head, three steps of rows, the end
    assert dechunked(data) == (raw, True)
    assert result.sent == len(data) and result.rows == 2500


def test_unchunked_the_bytes_go_out_raw(tmp_path: Path) -> None:
    """HTTP/1.0: no framing at all; sent is the page's length."""
    (tmp_path / "f").write_bytes(b"")
    data, result = body_of(page(SharedFolder(str(tmp_path)), form="html"))
    assert data.startswith(b"<!DOCTYPE html>") and data.endswith(b"</html>\n")
    assert result.sent == len(data)


# When reading fails


def test_too_many_entries_ends_an_html_page_with_a_line_and_no_last_chunk(tmp_path: Path) -> None:
    """
    Past the entry limit: the page ends with a visible "listing stopped"
    line in a chunk of its own (after the head), the last chunk is not
    written, and the result carries the error.
    """
    for n in range(5):
        (tmp_path / f"f{n}").write_bytes(b"")
    recorder = Recorder()
    data, result = body_of(page(SharedFolder(str(tmp_path)), form="html", chunked=True, max_entries=3), recorder)
    assert result.error == "more than 3 entries" and result.rows == 0
    assert LAST_CHUNK not in recorder.writes
    decoded, ended = dechunked(data)
    assert not ended
    assert parsed(decoded).texts["p"] == "listing stopped: more than 3 entries"
    assert result.sent == len(data)


class FailingFolder(OpenedFolder):
    """An open folder whose second step of entries fails, as a disk that fails partway."""

    calls = 0

    def next_entries(self, step: int = WALK_STEP) -> list[FolderEntry] | None:
        self.calls += 1
        if self.calls > 1:
            raise OSError(errno.EIO, "Input/output error")
        return super().next_entries(2)


def failing_page(tmp_path: Path, form: str) -> FolderPage:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    return FolderPage(FailingFolder("", fd, lambda real: True, True), "", form, chunked=True, run_blocking=run_now, marked=never)


@pytest.mark.parametrize("form", ["html", "json"])
def test_a_read_failing_partway_leaves_out_the_last_chunk(tmp_path: Path, form: str) -> None:
    """
    A step failing after rows went out: HTML ends with the error line, JSON
    with nothing more (not parseable: truncated); no last chunk either way,
    and the descriptor is closed.
    """
    for n in range(5):
        (tmp_path / f"f{n}").write_bytes(b"")
    fds = open_fds()
    body = failing_page(tmp_path, form)
    recorder = Recorder()
    data, result = body_of(body, recorder)
    assert open_fds() == fds
    assert result.error == "cannot list the shared folder" and result.rows == 2
    assert LAST_CHUNK not in recorder.writes
    decoded, ended = dechunked(data)
    assert not ended
    if form == "html":
        p = parsed(decoded)
        assert [h for h, _ in p.links] == ["f0", "f1"]
        assert p.texts["p"] == "listing stopped: cannot list the shared folder"
    else:
        assert decoded.startswith(b"[\n{") and decoded.endswith(b"}")
        with pytest.raises(json.JSONDecodeError):
            json.loads(decoded)


# Backpressure and lifetime


@pytest.fixture(scope="module")
def big_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A folder of 100,000 empty files, made once for the module (in tmpfs when there is one: 10x faster)."""
    with ram_folder(tmp_path_factory) as root:
        make_empty_files(root, (f"f{n:06d}" for n in range(100_000)))
        yield root


def test_a_client_that_does_not_read_holds_one_step_not_the_page(big_folder: Path) -> None:
    """
    100,000 files to a consumer that pauses the page past 64 KiB unread: no
    step runs while it is paused, what waits unread never passes the limit
    by more than one step, and once read to the end the page is whole.
    """
    steps = QueuedSteps()
    reader = SlowReader(64 * 1024)
    body = page(SharedFolder(str(big_folder)), form="html", chunked=True, run_blocking=steps)
    results: list[ListResult] = []
    body.send(reader).addCallback(results.append)
    taken: list[bytes] = []
    pauses = 0
    while not results:
        assert len(steps.queue) == 1  # one step at a time
        steps.run_one()
        if reader.reader_paused:
            pauses += 1
            assert steps.queue == []  # paused: no next step asked for
            steps.run_all()
            assert steps.queue == [] and reader.reader_paused
            taken.append(reader.take())
    taken.append(reader.take())
    assert pauses > 50
    # One step of PAGE_STEP rows is about 28 KiB of HTML.
    assert reader.most_held < 64 * 1024 + 200 * 1024
    decoded, ended = dechunked(b"".join(taken))
    assert ended and results[0].rows == 100_000
    hrefs = re.findall(rb'<a href="([^"]*)">', decoded)
    assert hrefs == [b"f%06d" % n for n in range(100_000)]


def test_no_step_while_the_kernel_queue_is_full(big_folder: Path) -> None:
    """While more than KERNEL_QUEUE bytes wait in the kernel, no step is asked; it looks again later."""
    steps = QueuedSteps()
    clock = Clock()
    unsent = [0]
    body = page(SharedFolder(str(big_folder)), run_blocking=steps)
    consumer = StringTransport()
    results: list[ListResult] = []
    body.send(consumer, unsent=lambda: unsent[0], call_later=clock.callLater).addCallback(results.append)
    unsent[0] = KERNEL_QUEUE + 1
    steps.run_one()
    assert steps.queue == []
    clock.advance(10)
    assert steps.queue == []
    unsent[0] = 0
    clock.advance(10)
    assert len(steps.queue) == 1 and not results
    body.discard()


def test_stopped_midway_fails_with_transfer_failed_and_closes_the_folder(tmp_path: Path) -> None:
    """A page whose connection is lost fails with TransferFailed, runs no further step, closes its fd."""
    for n in range(3000):
        (tmp_path / f"f{n}").write_bytes(b"")
    folder = SharedFolder(str(tmp_path))
    fds = open_fds()
    steps = QueuedSteps()
    body = page(folder, form="html", run_blocking=steps)
    failures: list[Failure] = []
    body.send(StringTransport()).addErrback(failures.append)
    steps.run_one()
    steps.run_one()
    assert open_fds() > fds
    body.stopProducing()
    ran = steps.ran
    steps.run_all()
    assert steps.ran == ran
    assert failures and failures[0].check(TransferFailed)
    assert open_fds() == fds


def test_discard_and_the_end_close_the_descriptor(tmp_path: Path) -> None:
    """A page discarded unsent closes its folder's descriptor; so does a page sent to its end."""
    (tmp_path / "f").write_bytes(b"")
    folder = SharedFolder(str(tmp_path))
    fds = open_fds()
    body = page(folder)
    assert open_fds() == fds + 1
    body.discard()
    body.discard()
    assert open_fds() == fds
    body_of(page(folder))
    assert open_fds() == fds


# The names: one compact snapshot per version of a folder, shared


def settled_store() -> FolderNamesStore:
    """A store of its own whose clock says every folder changed long ago."""
    return FolderNamesStore(now_ns=lambda: time.time_ns() + 10 * 10**9)


def opened(root: Path, store: FolderNamesStore) -> OpenedFolder:
    """The folder C{root}, open for a page, its names shared through C{store}."""
    return OpenedFolder("", open_folder_fd(str(root), ()), lambda real: True, True, store=store)


def json_page(folder: OpenedFolder, run_blocking: BlockingRunner = run_now, max_entries: int = 1_000_000) -> FolderPage:
    return FolderPage(
        folder, "", "json", chunked=False, run_blocking=run_blocking, marked=never, max_entries=max_entries
    )


def paths_of(body: FolderPage) -> list[str]:
    data, result = body_of(body)
    assert result.error is None
    return [e["path"] for e in json.loads(data)]


def read_names(folder: OpenedFolder) -> FolderNames:
    """Read C{folder}'s names to their end; the names."""
    while not folder.read_names():
        pass
    assert folder.names is not None
    return folder.names


def make_files(root: Path, names: list[str]) -> None:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in names:
            os.close(os.open(name, os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
    finally:
        os.close(fd)


def test_pages_of_an_unchanged_folder_share_one_snapshot_read_once(tmp_path: Path) -> None:
    """
    Two pages of one folder, the second opened while the first is still
    reading the names (more than one step of them): the second joins that
    reading, both end with the very same names object, and both list every
    entry in order.
    """
    names = [f"f{n:05d}" for n in range(NAMES_STEP + 500)]
    make_files(tmp_path, names)
    (tmp_path / "sub").mkdir()
    store = settled_store()
    steps = QueuedSteps()
    first, second = opened(tmp_path, store), opened(tmp_path, store)
    one, two = json_page(first, steps), json_page(second, steps)
    consumers = [StringTransport(), StringTransport()]
    one.send(consumers[0])
    steps.run_one()  # the first step of names, by the first page
    assert first.names is None
    two.send(consumers[1])
    steps.run_all()
    assert first.names is None and second.names is None  # both pages have ended
    expected = ["sub/", *names]
    for consumer in consumers:
        assert [e["path"] for e in json.loads(consumer.value())] == expected
    # Once more, holding the names while both are alive.
    first, second = opened(tmp_path, store), opened(tmp_path, store)
    read_names(first)
    assert second.read_names()  # already read: no step of its own
    assert first.names is second.names
    assert len(store) == 1
    first.close()
    second.close()


def test_a_folder_changed_between_two_pages_gets_a_new_snapshot(tmp_path: Path) -> None:
    """
    A file added after a first page has read the names: a second page gets
    a snapshot of its own, with the new file; the first keeps its own.
    Through the process's own store and clock.
    """
    make_files(tmp_path, ["a", "c"])
    time.sleep(2 * SETTLE_NS / 1e9)
    folder = SharedFolder(str(tmp_path))
    first = folder.open_folder("")
    names = read_names(first)
    make_files(tmp_path, ["b"])
    second = folder.open_folder("")
    assert paths_of(json_page(second)) == ["a", "b", "c"]
    third = folder.open_folder("")
    assert read_names(third) is not names
    assert names.names(0, len(names)) == ["a", "c"]
    assert paths_of(json_page(first)) == ["a", "c"]
    third.close()


def test_a_folder_changed_just_now_is_not_shared(tmp_path: Path) -> None:
    """
    A folder whose times are within SETTLE_NS of now could change again
    without its times changing: each page reads the names for itself.
    Seconds later they are shared.
    """
    make_files(tmp_path, ["a"])
    st = os.stat(tmp_path)
    changed = max(st.st_mtime_ns, st.st_ctime_ns)
    now = [changed + SETTLE_NS // 2]
    store = FolderNamesStore(now_ns=lambda: now[0])
    first, second = opened(tmp_path, store), opened(tmp_path, store)
    assert read_names(first) is not read_names(second) and len(store) == 0
    now[0] = changed + 3 * 10**9  # past the settling time of any file system
    third, fourth = opened(tmp_path, store), opened(tmp_path, store)
    assert read_names(third) is read_names(fourth) and len(store) == 1
    for each in (first, second, third, fourth):
        each.close()


def test_the_snapshot_goes_when_the_last_page_ends(tmp_path: Path) -> None:
    """
    The names live while a page holds them: one page sent to its end and
    another discarded before its end, the snapshot object is gone (no
    garbage collection needed), the store holds nothing and every
    descriptor is closed.
    """
    make_files(tmp_path, [f"f{n}" for n in range(3 * WALK_STEP)])
    store = settled_store()
    fds = open_fds()
    first, second = opened(tmp_path, store), opened(tmp_path, store)
    one = json_page(first)
    steps = QueuedSteps()
    two = json_page(second, steps)
    two.send(StringTransport())
    while second.names is None:
        steps.run_one()
    steps.run_one()  # a step of entries: the page is midway
    names = weakref.ref(second.names)
    assert len(paths_of(one)) == 3 * WALK_STEP
    assert names() is not None and len(store) == 1
    two.discard()
    assert names() is None
    assert len(store) == 0
    assert open_fds() == fds


def test_a_reading_left_unfinished_by_all_its_pages_closes_and_is_not_joined(tmp_path: Path) -> None:
    """
    Every page of a reading still under way goes: its directory stream is
    closed, and a later page starts a reading of its own that lists it all.
    """
    make_files(tmp_path, [f"f{n:05d}" for n in range(NAMES_STEP + 10)])
    store = settled_store()
    fds = open_fds()
    first = opened(tmp_path, store)
    assert not first.read_names()  # one step: the stream is open
    assert open_fds() == fds + 2
    first.close()
    assert open_fds() == fds and len(store) == 0
    assert len(paths_of(json_page(opened(tmp_path, store)))) == NAMES_STEP + 10


def test_each_page_keeps_its_own_entry_limit_on_shared_names(tmp_path: Path) -> None:
    """
    Pages sharing the names still have their own bounds: one allowing 3
    entries of a folder of 5 ends with "more than 3 entries", before and
    after another page has read them all, which lists the 5.
    """
    make_files(tmp_path, [f"f{n}" for n in range(5)])
    store = settled_store()
    small, large = opened(tmp_path, store), opened(tmp_path, store)
    assert body_of(json_page(small, max_entries=3))[1].error == "more than 3 entries"
    assert paths_of(json_page(large)) == [f"f{n}" for n in range(5)]
    held = opened(tmp_path, store)
    read_names(held)
    after = opened(tmp_path, store)
    assert body_of(json_page(after, max_entries=3))[1].error == "more than 3 entries"
    held.close()


def test_compact_names_round_trip_odd_names() -> None:
    """
    The packed form gives back every name as it was (unicode, spaces,
    %, &, <, quotes, control characters), subfolders first, each part
    sorted by UTF-8 bytes, and any slice of them; an empty folder too.
    """
    folders = ["<d&>", "z dir", "é", "A"]
    files = [*ODD_NAMES, "Ω", "\u00a0nbsp", "a", "B"]
    names = FolderNames.of(folders, files, seen=42)
    utf8 = lambda some: sorted(some, key=lambda n: n.encode("utf-8"))  # noqa: E731
    assert names.names(0, len(names)) == utf8(folders) + utf8(files)
    assert names.folders == 4 and names.seen == 42
    everything = names.names(0, len(names))
    for start in range(len(names)):
        for end in range(start, len(names) + 1):
            assert names.names(start, end) == everything[start:end]
    empty = FolderNames.of([], [])
    assert len(empty) == 0 and empty.names(0, 0) == [] and empty.folders == 0


def test_the_names_of_100000_files_take_about_12_bytes_each(big_folder: Path) -> None:
    """
    The names of 100,000 files (7 bytes each): what stays allocated is one
    byte more each and a 4-byte offset, not a string object each (about 56
    bytes more); while they are read, no more than about twice that.
    """
    store = settled_store()
    tracemalloc.start()
    try:
        folder = opened(big_folder, store)
        read_names(folder)
        held, peak = tracemalloc.get_traced_memory()
        folder.close()
        left, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held / 100_000 < 13, f"{held / 100_000:.1f} bytes per name"
    assert peak / 100_000 < 24, f"{peak / 100_000:.1f} bytes per name at the peak"
    assert left < 16 * 1024


# Opening a folder: confined like the LIST walk


def test_open_folder_and_is_folder_accept_real_shared_folders(tmp_path: Path) -> None:
    """The root (""), a folder and a nested folder open; each opening holds one descriptor."""
    (tmp_path / "a" / "b").mkdir(parents=True)
    folder = SharedFolder(str(tmp_path))
    fds = open_fds()
    for path in ("", "a", "a/b"):
        assert folder.is_folder(path)
        opened = folder.open_folder(path)
        assert opened.path == path and open_fds() == fds + 1
        opened.close()
        opened.close()
        assert open_fds() == fds


def test_open_folder_refuses_whatever_is_not_a_shared_folder(tmp_path: Path) -> None:
    """
    Symlinked folders (even pointing inside), a symlink on the way, ../,
    dot-folders, files, FIFOs, missing names and malformed paths are
    NotShared, and is_folder says no; no descriptor is left open.
    """
    share = tmp_path / "share"
    (share / "a" / "b").mkdir(parents=True)
    (share / ".git" / "objects").mkdir(parents=True)
    (share / "a" / ".hidden").mkdir()
    (share / "file.txt").write_bytes(b"")
    os.mkfifo(share / "fifo")
    (tmp_path / "outside").mkdir()
    os.symlink("a", share / "link-a")
    os.symlink(str(tmp_path / "outside"), share / "out")
    folder = SharedFolder(str(share))
    fds = open_fds()
    refused = [
        "link-a", "link-a/b", "out", "..", "../outside", "a/..", "a/../a", "./a", ".git",
        ".git/objects", "a/.hidden", "file.txt", "file.txt/x", "fifo", "missing", "a/missing",
        "a/", "/a", "/", "a//b", "a\\b", "a\x00", "/etc",
    ]
    for path in refused:
        assert not folder.is_folder(path), path
        with pytest.raises(NotShared):
            folder.open_folder(path)
    assert open_fds() == fds
