"""
An HTTP folder listing's body: one folder level as an HTML page or a JSON
array, streamed a bounded step at a time as fast as the client takes it.
"""

from __future__ import annotations

import html
import json
import os
import time
from collections.abc import Callable

from filecache.daemon.diskwork import BlockingRunner
from filecache.daemon.folders import FolderEntry, OpenedFolder
from filecache.daemon.listing import SteppedBody
from filecache.daemon.walk import MAX_WALK_ENTRIES
from filecache.wire import printable, quote_path

CONTENT_TYPES = {"html": "text/html; charset=utf-8", "json": "application/json"}
"""The forms of a folder page, and the C{Content-Type} of each."""

LAST_CHUNK = b"0\r\n\r\n"
"""What ends a chunked body (no trailers)."""

PAGE_STEP = 256
"""Entries one step states and renders: about 28 KiB of HTML, as much as a
LIST step's rows.  Well under L{filecache.daemon.listing.KERNEL_QUEUE}, so a
client who reads finds the kernel's queue short enough for the next step at
once (at 1,024, about 110 KiB, every step waited for the queue to be looked
at again: a listing of 100,000 files took twice as long), and the transient
buffers of a step, which the allocator keeps, stay small."""

_STYLE = (
    "body{font-family:sans-serif;margin:1.5em}"
    "table{border-collapse:collapse}"
    "th,td{padding:.15em .8em;text-align:left;white-space:nowrap}"
    "th{border-bottom:1px solid #999}"
    "td.size{text-align:right}"
    "tbody tr:nth-child(even){background:#f2f2f2}"
    ".error{color:#b00;font-weight:bold}"
)


def human_size(size: int) -> str:
    """C{1536} -> C{"1.5 KiB"}: bytes below 1 KiB, then KiB, MiB, GiB, one decimal."""
    if size < 1024:
        return f"{size} B"
    value = float(size)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        # 1,048,575 bytes is 1.0 MiB, not 1024.0 KiB.
        if round(value, 1) < 1024 or unit == "GiB":
            break
    return f"{value:.1f} {unit}"


def when(mtime_ns: int) -> str:
    """A modification time as C{YYYY-MM-DD HH:MM}, UTC (C{?} if out of range)."""
    try:
        return time.strftime("%Y-%m-%d %H:%M", time.gmtime(mtime_ns // 1_000_000_000))
    except (OverflowError, OSError, ValueError):
        return "?"


_JSON_FOLDER = '%s{"path": %s, "type": "folder", "mtime": %d}'
_JSON_FILE = '%s{"path": %s, "size": %d, "mtime": %d, "cached": %s, "type": "file"}'


def _shown(text: str) -> str:
    # Control characters made visible first, then the markup escaped.
    return html.escape(printable(text), quote=True)


def chunk(data: bytes) -> bytes:
    """C{data} (not empty) as one HTTP/1.1 chunk."""
    return b"%x\r\n%b\r\n" % (len(data), data)


class FolderPage(SteppedBody[tuple[int, bytes] | None]):
    """
    The body of a folder listing: C{form} C{"html"} (a page a person can use
    with no script: parent link, a link per entry, human sizes, times in
    UTC) or C{"json"} (an array of one object per entry).  Subfolders come
    first, then files, each sorted by the UTF-8 bytes of its name; only what
    may be shared is listed (L{OpenedFolder}).

    The first steps read the names (to sort them, bounded by
    C{max_entries}), or find them read: every page of one unchanged folder
    shares one compact copy of its names (L{OpenedFolder}), which goes when
    the last of them ends.  Each later step states and renders up to
    L{PAGE_STEP} entries, so an unread page holds one step of rows, whatever
    the folder's size (see L{SteppedBody}).  The folder's descriptor is closed
    when the page ends, is stopped or is discarded.

    With C{chunked}, every write is one HTTP/1.1 chunk and the end is the
    last (zero) chunk; without, the bytes go out raw and the adapter closes
    the connection at the end.  If reading fails partway, an HTML page ends
    with a visible C{listing stopped: ...} line, JSON with nothing more, and
    the last chunk is not written: the L{ListResult}'s C{error} says why and
    the adapter closes the connection, so a client sees a truncated body.
    The result's C{sent} counts every byte written, chunk framing included;
    its C{rows} counts the entries listed.

    @param folder: the open folder, now owned by the page.
    @param path: the folder's path inside the shared folder (C{""}: the
        root; else C{"a/b"}), as shown and as the JSON paths start.
    @param marked: whether a file (UTF-8 path, stat) is in the cache now;
        called in a disk thread.
    @raise ValueError: if C{form} is not one of L{CONTENT_TYPES}.
    """

    def __init__(
        self,
        folder: OpenedFolder,
        path: str,
        form: str,
        *,
        chunked: bool,
        run_blocking: BlockingRunner,
        marked: Callable[[bytes, os.stat_result], bool],
        max_entries: int = MAX_WALK_ENTRIES,
    ) -> None:
        if form not in CONTENT_TYPES:
            raise ValueError(f"no folder page in the form {form!r}")
        super().__init__(run_blocking)
        self._folder = folder
        self._path = path
        self._html = form == "html"
        self._chunked = chunked
        self._marked = marked
        self._max_entries = max_entries
        self._prefix = path + "/" if path else ""
        self._names_read = False
        self._head_written = False
        self._any = False

    @property
    def content_type(self) -> str:
        """The page's C{Content-Type}."""
        return CONTENT_TYPES["html" if self._html else "json"]

    # In a disk thread

    def _produce(self) -> tuple[int, bytes] | None:
        if not self._names_read:
            self._names_read = self._folder.read_names(self._max_entries)
            return (0, b"")
        entries = self._folder.next_entries(PAGE_STEP)
        if entries is None:
            return None
        render = self._html_row if self._html else self._json_entry
        return (len(entries), b"".join([render(entry) for entry in entries]))

    def _html_row(self, entry: FolderEntry) -> bytes:
        name = entry.name
        st = entry.stat
        if entry.folder:
            href = quote_path(name) + b"/"
            shown = _shown(name + "/")
            size = "-"
        else:
            href = quote_path(name)
            shown = _shown(name)
            size = human_size(st.st_size)
        return b'<tr><td><a href="%b">%b</a></td><td class="size">%b</td><td>%b</td></tr>\n' % (
            href,
            shown.encode("utf-8"),
            size.encode("ascii"),
            when(st.st_mtime_ns).encode("ascii"),
        )

    def _json_entry(self, entry: FolderEntry) -> bytes:
        # The bytes json.dumps(fields, ensure_ascii=True) gives for the dict
        # of these fields in this order (test_pages checks), in a third of
        # its time: only the path needs the encoder.
        path = self._prefix + entry.name
        st = entry.stat
        mtime = st.st_mtime_ns // 1_000_000_000
        separator = ",\n" if self._any else "\n"
        self._any = True
        if entry.folder:
            text = _JSON_FOLDER % (separator, json.dumps(path + "/"), mtime)
        else:
            cached = "true" if self._marked(path.encode("utf-8"), st) else "false"
            text = _JSON_FILE % (separator, json.dumps(path), st.st_size, mtime, cached)
        return text.encode("ascii")

    # On the reactor thread

    def _head(self) -> bytes:
        if self._head_written:
            return b""
        self._head_written = True
        if not self._html:
            return b"["
        title = _shown(f"Index of /{self._prefix}")
        parent = (
            '<tr><td><a href="../">../</a></td><td class="size"></td><td></td></tr>\n'
            if self._path
            else ""
        )
        return (
            "<!DOCTYPE html>\n"
            '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{title}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
            f"<h1>{title}</h1>\n<table>\n"
            "<thead><tr><th>Name</th><th>Size</th><th>Modified (UTC)</th></tr></thead>\n"
            f"<tbody>\n{parent}"
        ).encode()

    def _frame(self, data: bytes) -> bytes:
        return chunk(data) if self._chunked and data else data

    def _took(self, result: tuple[int, bytes] | None) -> None:
        if result is None:
            if self._html:
                tail = b"</tbody>\n</table>\n</body>\n</html>\n"
            else:
                tail = b"\n]\n" if self._any else b"]\n"
            self._write(self._frame(self._head() + tail))
            self._finish(LAST_CHUNK if self._chunked else b"", None)
            return
        count, data = result
        self._rows += count
        data = self._head() + data
        if data:
            self._write(self._frame(data))

    def _finish_error(self, text: str) -> None:
        if self._html:
            line = f'</tbody>\n</table>\n<p class="error">listing stopped: {_shown(text)}</p>\n'
            self._finish(self._frame(self._head() + line.encode("utf-8")), text)
        else:
            self._finish(b"", text)

    def _release(self) -> None:
        self._folder.close()
