"""
The HTTP side (docs/http.md) against a real twistd, driven by real clients:
curl, wget, Python's http.client and urllib, aria2c and headless Chromium,
each through an H11Tap so that h11 parses what they received, each checking
what it fetched against the file's SHA-256; and by httpkit's raw client for
listings, redirects, conditions, connections, STATS and the access log.
"""

from __future__ import annotations

import email.utils
import html.parser
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from conftest import Daemon, DaemonFactory, RawClient, stats, wait_for
from httpkit import (
    H11Tap,
    HttpConnection,
    MiB,
    assert_same_file,
    fetch,
    files_under,
    http_date,
    repr_digest,
    sha256_bytes,
    sha256_file,
    url_path,
    write_pattern,
)

pytestmark = pytest.mark.system


def needs(command: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(shutil.which(command) is None, reason=f"{command} is not installed")


def run(*args: str | Path, cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    """Run a real client; capture its output (never raises on its exit status)."""
    return subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        capture_output=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def curl(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    return run("curl", "-sS", "--max-time", "30", *args, cwd=cwd)


def parse_head(text: str) -> tuple[int, dict[str, list[str]]]:
    """The last response head of a C{curl -D}/C{-I} dump: status and headers (names lower case)."""
    blocks = [b for b in re.split(r"\r?\n\r?\n", text.strip()) if b.startswith("HTTP/")]
    assert blocks, f"no response head in {text!r}"
    lines = blocks[-1].splitlines()
    status = int(lines[0].split()[1])
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    return status, headers


def one(headers: dict[str, list[str]], name: str) -> str:
    values = headers.get(name, [])
    assert len(values) == 1, f"{name}: {values} in {headers}"
    return values[0]


STRONG_ETAG = re.compile(r'"[\x21\x23-\x7e\x80-\xff]+"')


def access_lines(daemon: Daemon) -> list[str]:
    return [line for line in daemon.log_text().splitlines() if " HTTP/1." in line]


def wait_for_access_line(daemon: Daemon, pattern: str) -> str:
    """The access-log line matching C{pattern} (a regex), waiting for the log to be written."""
    regex = re.compile(pattern)
    found: list[str] = []

    def seen() -> bool:
        found[:] = [line for line in access_lines(daemon) if regex.search(line)]
        return bool(found)

    try:
        wait_for(seen, 5, f"an access line matching {pattern!r}")
    except AssertionError:
        raise AssertionError(
            f"no access line matches {pattern!r}; HTTP lines: {access_lines(daemon)[-20:]}"
        ) from None
    return found[0]


# curl


@needs("curl")
def test_curl_get_and_head_describe_the_file(
    shared: Path, tmp_path: Path, daemon_factory: DaemonFactory
) -> None:
    """
    curl GETs a text file and a 3 MiB binary file byte for byte; `curl -I`
    shows Content-Length, Content-Type from the name, Last-Modified (the
    mtime), a strong ETag of its own per file, Accept-Ranges: bytes, a Date,
    and, once the file is cached, Repr-Digest with its SHA-256 in base64.
    A HEAD carries the same head as the GET and no body.
    """
    hello = shared / "hello.txt"
    hello.write_bytes(b"hello\n")
    data = write_pattern(shared / "data.bin", 3 * MiB + 5)
    daemon = daemon_factory(shared)
    etags = set()
    with H11Tap(daemon.port) as tap:
        for path, kind in ((hello, "text/plain"), (data, "application/octet-stream")):
            out = tmp_path / ("got-" + path.name)
            result = curl("-o", out, tap.url("/" + path.name))
            assert result.returncode == 0, result.stderr
            assert_same_file(out, path)
            result = curl("-I", tap.url("/" + path.name))
            assert result.returncode == 0, result.stderr
            status, headers = parse_head(result.stdout.decode("latin-1"))
            assert status == 200
            assert one(headers, "content-length") == str(path.stat().st_size)
            assert one(headers, "content-type").split(";")[0] == kind
            assert one(headers, "last-modified") == http_date(path.stat().st_mtime)
            etag = one(headers, "etag")
            assert STRONG_ETAG.fullmatch(etag), f"not a strong ETag: {etag!r}"
            etags.add(etag)
            assert one(headers, "accept-ranges") == "bytes"
            assert one(headers, "repr-digest") == repr_digest(path)
            date = email.utils.parsedate_to_datetime(one(headers, "date"))
            assert abs(date.timestamp() - time.time()) < 60
    assert len(etags) == 2
    with HttpConnection(daemon.port) as conn:
        got = conn.get("/data.bin")
        head = conn.head("/data.bin")
        conn.assert_open()
    assert sha256_bytes(got.body) == sha256_file(data)
    assert head.body == b""
    assert [h for h in head.headers if h[0] != "date"] == [h for h in got.headers if h[0] != "date"]


@needs("curl")
def test_curl_ranges_of_cached_and_uncached_files(
    shared: Path, tmp_path: Path, daemon_factory: DaemonFactory
) -> None:
    """
    `curl -r` and Range headers on a cached 40 KiB file and an uncached
    1 MiB file (--cache-size 256K): one range is 206 with Content-Range and
    exactly those bytes (a last position past the end is cut); two ranges,
    a malformed range and another unit give 200 and the whole file; a
    range past the end or `-0` is 416 with Content-Range: bytes */size.
    """
    small = write_pattern(shared / "small.bin", 40 * 1024 + 3, seed=1)
    large = write_pattern(shared / "large.bin", MiB + 17, seed=2)
    daemon = daemon_factory(shared, "--cache-size", "256K")
    with H11Tap(daemon.port) as tap:
        for path in (small, large):
            data = path.read_bytes()
            size = len(data)
            # A whole GET first: the small file is then in the cache.
            assert sha256_bytes(fetch(daemon.port, "/" + path.name).body) == sha256_bytes(data)
            cases: list[tuple[list[str], int, bytes, str | None]] = [
                (["-r", "0-99"], 206, data[:100], f"bytes 0-99/{size}"),
                (["-r", "1000-"], 206, data[1000:], f"bytes 1000-{size - 1}/{size}"),
                (["-r", "-500"], 206, data[-500:], f"bytes {size - 500}-{size - 1}/{size}"),
                (["-r", "100-99999999"], 206, data[100:], f"bytes 100-{size - 1}/{size}"),
                (["-r", f"{size - 1}-{size - 1}"], 206, data[-1:], f"bytes {size - 1}-{size - 1}/{size}"),
                (["-r", "0-1,5-6"], 200, data, None),
                (["-H", "Range: bytes=abc"], 200, data, None),
                (["-H", "Range: items=0-5"], 200, data, None),
                (["-r", f"{size}-"], 416, b"", f"bytes */{size}"),
                (["-H", "Range: bytes=-0"], 416, b"", f"bytes */{size}"),
            ]
            for args, status, body, content_range in cases:
                out, dump = tmp_path / "range.out", tmp_path / "range.head"
                result = curl(*args, "-D", dump, "-o", out, tap.url("/" + path.name))
                assert result.returncode == 0, result.stderr
                got_status, headers = parse_head(dump.read_text("latin-1"))
                what = f"{path.name} {args}"
                assert got_status == status, what
                if content_range is None:
                    assert "content-range" not in headers, what
                else:
                    assert one(headers, "content-range") == content_range, what
                if status != 416:
                    assert out.read_bytes() == body, what
                    assert one(headers, "content-length") == str(len(body)), what


@needs("curl")
def test_curl_resumes_a_truncated_download(
    shared: Path, tmp_path: Path, daemon_factory: DaemonFactory
) -> None:
    """
    `curl -C -` on a file cut at 1,234,567 bytes asks for the rest and gets
    a 206 from that offset; the result is the whole file.
    """
    path = write_pattern(shared / "resume.bin", 5 * MiB, seed=3)
    daemon = daemon_factory(shared)
    out = tmp_path / "resume.bin"
    out.write_bytes(path.read_bytes()[:1_234_567])
    with H11Tap(daemon.port) as tap:
        result = curl("-C", "-", "-o", out, tap.url("/resume.bin"))
        assert result.returncode == 0, result.stderr
        tap.settle()
    assert_same_file(out, path)
    [exchange] = tap.exchanges
    assert (exchange.status, exchange.header("content-range")) == (206, f"bytes 1234567-{5 * MiB - 1}/{5 * MiB}")
    assert exchange.body_bytes == 5 * MiB - 1_234_567
    wait_for_access_line(daemon, rf"HTTP/1\.1 GET /resume\.bin 206 {5 * MiB - 1_234_567} ")


@needs("curl")
def test_curl_fails_on_a_missing_file(shared: Path, tmp_path: Path, daemon_factory: DaemonFactory) -> None:
    """
    A missing file is 404: `curl -f` exits 22, plain curl reports the 404,
    and the body is one short line of text/plain; charset=utf-8.
    """
    (shared / "present.txt").write_bytes(b"here\n")
    daemon = daemon_factory(shared)
    with H11Tap(daemon.port) as tap:
        result = curl("-f", "-o", tmp_path / "missing.txt", tap.url("/missing.txt"))
        assert result.returncode == 22, (result.returncode, result.stderr)
        result = curl("-o", os.devnull, "-w", "%{http_code}", tap.url("/missing.txt"))
        assert result.stdout == b"404"
    response = fetch(daemon.port, "/missing.txt")
    assert response.status == 404
    assert response["content-type"] == "text/plain; charset=utf-8"
    assert len(response.body) < 200 and response.body.count(b"\n") <= 1


# wget


@needs("wget")
def test_wget_continues_a_truncated_download(
    shared: Path, tmp_path: Path, daemon_factory: DaemonFactory
) -> None:
    """`wget -c` beside a file cut at 777,777 bytes fetches the rest (206) and ends with the whole file."""
    path = write_pattern(shared / "cont.bin", 3 * MiB + 1, seed=4)
    daemon = daemon_factory(shared)
    work = tmp_path / "wget"
    work.mkdir()
    (work / "cont.bin").write_bytes(path.read_bytes()[:777_777])
    with H11Tap(daemon.port) as tap:
        result = run("wget", "-c", "-q", "--tries=1", tap.url("/cont.bin"), cwd=work)
        assert result.returncode == 0, result.stderr
        tap.settle()
    assert_same_file(work / "cont.bin", path)
    assert [(e.method, e.status) for e in tap.exchanges] == [("GET", 206)]
    assert sorted(p.name for p in work.iterdir()) == ["cont.bin"]


# Names a listing must escape and encode.  wget decodes a literal %XX in a
# name when it makes the local file name (its own habit, not the server's),
# so the mirror test leaves those to the browser test.
MIRROR_NAMES = [
    "a b.txt",
    "ünïcødé ☃.txt",
    "ā.txt",
    "100%.txt",
    "hash#tag.txt",
    "amp&er.txt",
    "what?.txt",
    "semi;colon.txt",
    "plus+.txt",
    "quote'.txt",
    'dq".txt',
    "sub dir/deep file.txt",
    "sub dir/ünï dir/x?y#z.txt",
    "empty.txt",
]


@needs("wget")
def test_wget_mirrors_a_subfolder_through_the_listing(
    shared: Path, tmp_path: Path, daemon_factory: DaemonFactory
) -> None:
    """
    `wget -r -np` of /pub/ follows the HTML listings: the mirrored tree
    holds exactly pub's shared files (odd names included, dotfiles and
    .git/ left out) with the same bytes, nothing from outside pub, and wget
    writes nothing outside its mirror folder.
    """
    pub = shared / "pub"
    for n, name in enumerate(MIRROR_NAMES):
        path = pub / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"" if name == "empty.txt" else f"{n}: {name}\n".encode() * (n + 1))
    write_pattern(pub / "sub dir" / "big.bin", 2 * MiB, seed=5)
    (pub / ".hidden").write_bytes(b"hidden\n")
    (pub / ".git").mkdir()
    (pub / ".git" / "config").write_bytes(b"[core]\n")
    (pub / "sub dir" / ".secret").write_bytes(b"secret\n")
    (shared / "top.txt").write_bytes(b"top\n")
    (shared / "other").mkdir()
    (shared / "other" / "x.txt").write_bytes(b"x\n")
    daemon = daemon_factory(shared)
    work = tmp_path / "wget"
    work.mkdir()
    with H11Tap(daemon.port) as tap:
        result = run(
            "wget", "-r", "-np", "-nH", "-q", "--tries=1", "-e", "robots=off",
            "--restrict-file-names=nocontrol", "-P", "mirror", tap.url("/pub/"),
            cwd=work, timeout=60,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in work.iterdir()) == ["mirror"]
    assert sorted(p.name for p in (work / "mirror").iterdir()) == ["pub"]
    # Beside the daemon's own files (its log and what twistd printed).
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("daemon-")) == ["shared", "wget"]
    assert {(e.method, e.status) for e in tap.exchanges} == {("GET", 200)}, [
        (e.target, e.status) for e in tap.exchanges if e.status != 200
    ]
    mirrored = {
        path: digest
        for path, digest in files_under(work / "mirror" / "pub").items()
        if path.rpartition("/")[2] != "index.html"
    }
    assert mirrored == files_under(pub)
    hidden = [p for p in (work / "mirror").rglob(".*")]
    assert hidden == []
    fetched = {urllib.parse.unquote(e.target) for e in tap.exchanges}
    assert not any(t.startswith(("/top", "/other")) or "/." in t for t in fetched), fetched


# Python's own clients


def test_http_client_keeps_one_connection_alive(shared: Path, daemon_factory: DaemonFactory) -> None:
    """
    Python's http.client sends GET, HEAD, a GET of a missing file and a
    range on one kept-alive connection: every answer is right and the
    relay saw one connection only.
    """
    files = {
        "one.txt": b"one\n" * 100,
        "two.bin": write_pattern(shared / "two.bin", 300_000, seed=6).read_bytes(),
    }
    (shared / "one.txt").write_bytes(files["one.txt"])
    daemon = daemon_factory(shared)
    with H11Tap(daemon.port) as tap:
        conn = http.client.HTTPConnection("127.0.0.1", tap.port, timeout=10)
        try:
            sockets = set()
            for _round in range(2):
                for name, data in files.items():
                    conn.request("GET", "/" + name)
                    response = conn.getresponse()
                    assert (response.status, sha256_bytes(response.read())) == (200, sha256_bytes(data))
                    sockets.add(id(conn.sock))
                conn.request("HEAD", "/two.bin")
                response = conn.getresponse()
                assert response.status == 200 and response.read() == b""
                assert response.getheader("Content-Length") == str(len(files["two.bin"]))
                conn.request("GET", "/nope.txt")
                response = conn.getresponse()
                assert response.status == 404
                response.read()
                conn.request("GET", "/two.bin", headers={"Range": "bytes=10-19"})
                response = conn.getresponse()
                assert (response.status, response.read()) == (206, files["two.bin"][10:20])
                sockets.add(id(conn.sock))
        finally:
            conn.close()
        tap.settle()
    assert len(sockets) == 1
    assert tap.connections == 1
    assert len(tap.exchanges) == 2 * 5


def test_urllib_fetches_a_file_and_raises_404(shared: Path, daemon_factory: DaemonFactory) -> None:
    """urllib.request.urlopen reads a file with an odd name whole; a missing file raises HTTPError 404."""
    path = write_pattern(shared / "ünï code & more.bin", 200_000, seed=7)
    daemon = daemon_factory(shared)
    with H11Tap(daemon.port) as tap:
        with urllib.request.urlopen(tap.url(url_path(path.name)), timeout=10) as response:
            assert response.status == 200
            assert sha256_bytes(response.read()) == sha256_file(path)
        with pytest.raises(urllib.error.HTTPError) as raised:
            urllib.request.urlopen(tap.url("/missing.bin"), timeout=10)
        assert raised.value.code == 404
        raised.value.close()


# aria2


@needs("aria2c")
def test_aria2c_fetches_a_large_uncached_file_over_four_range_connections(
    shared: Path, tmp_path: Path, daemon_factory: DaemonFactory
) -> None:
    """
    `aria2c -x 4 -s 4` of a 200 MiB file the cache cannot hold
    (--cache-size 1M): aria2 opens four connections, each fetching ranges
    (206), and the file it writes has the right SHA-256.
    """
    size = 200 * MiB
    path = write_pattern(shared / "big.bin", size, seed=8)
    daemon = daemon_factory(shared, "--cache-size", "1M")
    out = tmp_path / "aria2"
    started = time.monotonic()
    with H11Tap(daemon.port) as tap:
        result = run(
            "aria2c", "-x", "4", "-s", "4", "-k", "1M", "--min-split-size=1M", "--file-allocation=none",
            "--allow-overwrite=true", "--auto-file-renaming=false", "--max-tries=1", "--retry-wait=0",
            "--console-log-level=warn", "--summary-interval=0", "--download-result=hide",
            "-d", out, "-o", "big.bin", tap.url("/big.bin"),
            timeout=60,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        tap.settle()
    took = time.monotonic() - started
    assert_same_file(out / "big.bin", path)
    ranges = [e for e in tap.exchanges if e.status == 206]
    seen = [(e.connection, e.status, e.header("content-range"), e.body_bytes) for e in tap.exchanges]
    print(f"\naria2c: {tap.connections} connections, {len(ranges)} ranges, {took:.1f} s for 200 MiB: {seen}")
    # aria2 asks for the whole file on its first connection and for
    # ranges on the others, leaving each when its segment is done.
    assert tap.connections >= 4, seen
    assert len({e.connection for e in ranges}) >= 3, seen
    assert all(e.status in (200, 206) for e in tap.exchanges), seen
    assert sum(e.body_bytes for e in tap.exchanges) >= size, seen
    wait_for_access_line(daemon, r"HTTP/1\.1 GET /big\.bin 206 \d+ ")


# Chromium

# Names that HTML must escape, URLs must encode, or both.
ODD_NAMES = [
    "<b>bold.txt",
    "<img src=x onerror=alert(1)>.txt",
    "a&amp;b.txt",
    'say "hi".txt',
    "it's.txt",
    "sp ace.txt",
    "ünïcødé ☃.txt",
    "100%.txt",
    "%41%2e.txt",
    "hash#.txt",
    "q?x=1.txt",
    "amp&.txt",
]


class _Links(html.parser.HTMLParser):
    """The <a> elements of a page (href and text) and every tag name it contains."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.links: list[tuple[str, str]] = []
        self.tags: set[str] = set()
        self._href: str | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        if tag == "a":
            self._href = dict(attrs).get("href") or ""
            self._text = []

    def handle_data(self, data: str) -> None:
        if self._href is not None:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "a" and self._href is not None:
            self.links.append((self._href, "".join(self._text).strip()))
            self._href = None


def chromium(url: str, profile: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return run(
        "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", *args, url,
        timeout=60,
    )  # fmt: skip


@needs("chromium")
def test_chromium_renders_a_listing_of_odd_names(
    shared: Path, tmp_path: Path, daemon_factory: DaemonFactory
) -> None:
    """
    Headless Chromium loads the listing of a folder of names full of HTML
    and URL syntax: in the DOM every name is a link whose text is the name
    itself (escaped, so no <b> or <img> element appears), every href
    resolves to that file, whose bytes a GET of the href returns; a
    screenshot of the page is kept at /tmp/filecache-listing.png.
    """
    odd = shared / "odd"
    odd.mkdir()
    contents = {}
    for n, name in enumerate(ODD_NAMES):
        contents[name] = f"file {n}: {name}\n".encode()
        (odd / name).write_bytes(contents[name])
    (odd / "<sub> & dir").mkdir()
    (odd / "<sub> & dir" / "inner.txt").write_bytes(b"inner\n")
    (odd / ".hidden").write_bytes(b"hidden\n")
    daemon = daemon_factory(shared)
    with H11Tap(daemon.port) as tap:
        page = tap.url("/odd/")
        result = chromium(page, tmp_path / "profile-dom", "--dump-dom")
        assert result.returncode == 0, result.stderr[-2000:]
        dom = result.stdout.decode("utf-8")
        png = tmp_path / "listing.png"
        result = chromium(page, tmp_path / "profile-shot", f"--screenshot={png}", "--window-size=1000,700")
        assert result.returncode == 0, result.stderr[-2000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shutil.copyfile(png, "/tmp/filecache-listing.png")
    print(f"\nlisting screenshot: {png} (copy: /tmp/filecache-listing.png)")
    parser = _Links()
    parser.feed(dom)
    assert not parser.tags & {"b", "img", "script"}, parser.tags
    assert ".hidden" not in dom
    by_text = {text: href for href, text in parser.links}
    for name in [*ODD_NAMES, "<sub> & dir/"]:
        assert name in by_text or name.rstrip("/") in by_text, f"no link named {name!r} in {parser.links}"
    page_url = f"http://127.0.0.1:{daemon.port}/odd/"
    with HttpConnection(daemon.port) as conn:
        for name in ODD_NAMES:
            target = urllib.parse.urljoin(page_url, by_text[name])
            parts = urllib.parse.urlsplit(target)
            assert (parts.query, parts.fragment) == ("", ""), f"{name!r}: href {by_text[name]!r}"
            assert urllib.parse.unquote(parts.path) == "/odd/" + name
            response = conn.get(parts.path)
            assert (response.status, response.body) == (200, contents[name]), name
        folder = by_text.get("<sub> & dir/") or by_text["<sub> & dir"]
        response = conn.get(urllib.parse.urlsplit(urllib.parse.urljoin(page_url, folder)).path)
        assert response.status == 200 and b"inner.txt" in response.body


# Listings, redirects, conditions


def test_json_listing_matches_the_folder(shared: Path, daemon_factory: DaemonFactory) -> None:
    """
    `?format=json` and `Accept: application/json` give the same JSON
    array: one object per shared file of that level (path from the shared
    folder, size, mtime in seconds, cached) and a "folder" entry with a
    trailing slash per subfolder; dotfiles, FIFOs and .git/ are left out.
    A GET marks a file cached; the HTML form is text/html, chunked in 1.1.
    """
    (shared / "a.txt").write_bytes(b"a" * 10)
    write_pattern(shared / "b.bin", 5000, seed=9)
    (shared / "sub").mkdir()
    (shared / "sub" / "c d.txt").write_bytes(b"cd\n")
    (shared / ".hidden").write_bytes(b"h")
    (shared / ".git").mkdir()
    (shared / ".git" / "config").write_bytes(b"[core]\n")
    os.mkfifo(shared / "fifo")
    daemon = daemon_factory(shared)

    def expected(cached: set[str]) -> list[dict[str, object]]:
        rows: list[dict[str, object]] = [{"path": "sub/", "type": "folder"}]
        for name in ("a.txt", "b.bin"):
            st = (shared / name).stat()
            rows.append({"path": name, "size": st.st_size, "mtime": int(st.st_mtime), "cached": name in cached})
        return rows

    def entries(response_body: bytes) -> list[dict[str, object]]:
        rows = json.loads(response_body)
        assert isinstance(rows, list)
        picked = []
        for row in rows:
            if row.get("type") == "folder":
                picked.append({"path": row["path"], "type": "folder"})
            else:
                assert row.get("type", "file") == "file", row
                picked.append({k: row[k] for k in ("path", "size", "mtime", "cached")})
        return sorted(picked, key=lambda r: (r.get("type") != "folder", str(r["path"])))

    with HttpConnection(daemon.port) as conn:
        by_query = conn.get("/?format=json")
        by_accept = conn.get("/", [("Accept", "application/json")])
        for response in (by_query, by_accept):
            assert response.status == 200
            assert response["content-type"].split(";")[0] == "application/json"
            assert entries(response.body) == expected(set())
        assert conn.get("/a.txt").status == 200
        assert entries(conn.get("/?format=json").body) == expected({"a.txt"})
        sub = conn.get("/sub/?format=json")
        assert entries(sub.body) == [
            {"path": "sub/c d.txt", "size": 3, "mtime": int((shared / "sub/c d.txt").stat().st_mtime), "cached": False}
        ]
        page = conn.get("/")
        assert page["content-type"] == "text/html; charset=utf-8"
        assert page["transfer-encoding"] == "chunked"
        assert b"a.txt" in page.body and b".hidden" not in page.body and b"fifo" not in page.body
        conn.assert_open()


@needs("curl")
def test_a_folder_without_its_slash_redirects(shared: Path, daemon_factory: DaemonFactory) -> None:
    """/pub and /a b (a folder) are 301 to /pub/ and /a%20b/; curl -L follows to the listing."""
    (shared / "pub").mkdir()
    (shared / "pub" / "f.txt").write_bytes(b"f\n")
    (shared / "a b").mkdir()
    daemon = daemon_factory(shared)
    base = f"http://127.0.0.1:{daemon.port}"
    with HttpConnection(daemon.port) as conn:
        for target, slashed in (("/pub", "/pub/"), ("/a%20b", "/a%20b/")):
            response = conn.get(target)
            assert response.status == 301, response
            assert urllib.parse.urljoin(base + target, response["location"]) == base + slashed
        conn.assert_open()
    with H11Tap(daemon.port) as tap:
        result = curl("-L", "-w", "\n%{http_code} %{num_redirects}", tap.url("/pub?format=json"))
        assert result.returncode == 0, result.stderr
    body, _, codes = result.stdout.rpartition(b"\n")
    assert codes == b"200 1"
    assert b"f.txt" in body


@needs("curl")
def test_conditional_requests(shared: Path, tmp_path: Path, daemon_factory: DaemonFactory) -> None:
    """
    curl with If-None-Match of the ETag gets 304; the raw client checks the
    RFC 9110 order (If-Match, If-Unmodified-Since, If-None-Match,
    If-Modified-Since, If-Range) and that a 304 has ETag, Last-Modified and
    Date and no body.  A file rewritten with its mtime put back gets a new
    ETag, and the old one is answered 200 with the new bytes.
    """
    path = shared / "cond.txt"
    path.write_bytes(b"version one\n")
    daemon = daemon_factory(shared)
    first = fetch(daemon.port, "/cond.txt")
    etag, modified = first["etag"], first["last-modified"]
    earlier = http_date(path.stat().st_mtime - 3600)
    with H11Tap(daemon.port) as tap:
        result = curl("-o", os.devnull, "-D", "-", "-H", f"If-None-Match: {etag}", tap.url("/cond.txt"))
        status, headers = parse_head(result.stdout.decode("latin-1"))
        assert status == 304
        assert one(headers, "etag") == etag
        result = curl("-o", os.devnull, "-w", "%{http_code}", "-H", 'If-None-Match: "nope"', tap.url("/cond.txt"))
        assert result.stdout == b"200"
    cases: list[tuple[list[tuple[str, str]], int]] = [
        ([("If-None-Match", etag)], 304),
        ([("If-None-Match", "*")], 304),
        ([("If-None-Match", f'"x", W/{etag}')], 304),
        ([("If-None-Match", '"x"')], 200),
        ([("If-Modified-Since", modified)], 304),
        ([("If-Modified-Since", earlier)], 200),
        ([("If-Modified-Since", "yesterday")], 200),
        ([("If-None-Match", '"x"'), ("If-Modified-Since", modified)], 200),
        ([("If-Match", '"x"')], 412),
        ([("If-Match", f'"x", {etag}')], 200),
        ([("If-Match", "*")], 200),
        ([("If-Match", f"W/{etag}")], 412),
        ([("If-Unmodified-Since", earlier)], 412),
        ([("If-Unmodified-Since", modified)], 200),
        ([("If-Unmodified-Since", "not a date")], 200),
        ([("If-Match", '"x"'), ("If-None-Match", etag)], 412),
        ([("If-Match", etag), ("If-Unmodified-Since", earlier)], 200),
        ([("Range", "bytes=0-6"), ("If-Range", etag)], 206),
        ([("Range", "bytes=0-6"), ("If-Range", '"x"')], 200),
        ([("Range", "bytes=0-6"), ("If-Range", modified)], 206),
        ([("Range", "bytes=0-6"), ("If-Range", earlier)], 200),
        ([("Range", "bytes=0-6"), ("If-None-Match", etag)], 304),
    ]
    with HttpConnection(daemon.port) as conn:
        for headers_sent, expected_status in cases:
            response = conn.get("/cond.txt", headers_sent)
            assert response.status == expected_status, (headers_sent, response)
            if expected_status == 304:
                assert response.body == b""
                assert (response["etag"], response["last-modified"]) == (etag, modified)
                assert response["date"]
            elif expected_status == 200:
                assert response.body == b"version one\n"
            elif expected_status == 206:
                assert response.body == b"version"
        st = path.stat()
        path.write_bytes(b"version two\n")
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert path.stat().st_mtime_ns == st.st_mtime_ns
        response = conn.get("/cond.txt", [("If-None-Match", etag)])
        assert (response.status, response.body) == (200, b"version two\n")
        assert response["etag"] != etag
        assert response["last-modified"] == modified
        again = conn.get("/cond.txt", [("If-None-Match", response["etag"])])
        assert again.status == 304
        conn.assert_open()


# Connections


def test_native_and_http_connections_on_one_daemon(shared: Path, daemon_factory: DaemonFactory) -> None:
    """
    A native `GET a 0` on one connection and `GET /a HTTP/1.1` on another,
    against the same daemon, get the same bytes; each connection keeps the
    protocol its first line chose (an HTTP line on the native one is a
    native error; a native line on the HTTP one is a 400 and a close).
    """
    data = b"the same bytes\n"
    (shared / "a").write_bytes(data)
    daemon = daemon_factory(shared)
    native = RawClient(daemon.port)
    try:
        with HttpConnection(daemon.port) as conn:
            status, body, end = native.get(b"a", 0)
            assert status.startswith(b"OK 15 ") and body == data
            assert end == b"END " + sha256_bytes(data).encode() + b"\r\n"
            response = conn.get("/a")
            assert (response.status, response.body) == (200, data)
            native.send(b"GET /a HTTP/1.1\r\n")
            assert native.line().startswith(b"ERR bad-request")
            status, body, _ = native.get(b"a")
            assert body == data
            conn.send(b"GET a 0\r\n\r\n")
            conn.expect("GET")
            assert conn.read_response().status == 400
            conn.assert_closed()
    finally:
        native.close()


def test_keep_alive_and_close(shared: Path, daemon_factory: DaemonFactory) -> None:
    """
    HTTP/1.0 with `Connection: keep-alive` is kept open and says so;
    HTTP/1.0 without it is closed after the answer; HTTP/1.1 is kept open
    by default, and `Connection: close` is answered with it, then closed.
    """
    (shared / "k.txt").write_bytes(b"kept\n")
    daemon = daemon_factory(shared)
    with HttpConnection(daemon.port) as conn:
        for _ in range(3):
            conn.send(b"GET /k.txt HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            response = conn.read_response()
            assert (response.status, response.body) == (200, b"kept\n")
            assert "keep-alive" in response.connection_tokens()
            assert response.http_version == "HTTP/1.1"
        conn.assert_open()
    with HttpConnection(daemon.port) as conn:
        conn.send(b"GET /k.txt HTTP/1.0\r\n\r\n")
        response = conn.read_response()
        assert (response.status, response.body) == (200, b"kept\n")
        conn.assert_closed()
    with HttpConnection(daemon.port) as conn:
        for _ in range(3):
            response = conn.get("/k.txt")
            assert response.status == 200 and "close" not in response.connection_tokens()
        response = conn.get("/k.txt", [("Connection", "close")])
        assert (response.status, response.body) == (200, b"kept\n")
        assert "close" in response.connection_tokens()
        conn.assert_closed()
    with HttpConnection(daemon.port) as conn:
        conn.send(b"GET /?format=json HTTP/1.0\r\n\r\n")
        response = conn.read_response()
        assert response.status == 200 and json.loads(response.body)
        conn.assert_closed()


def test_pipelined_requests_are_answered_in_order(shared: Path, daemon_factory: DaemonFactory) -> None:
    """
    Eight requests sent in one write (GET, HEAD, a 404, a range, a 301, a
    chunked listing, a 304, a large file) come back in order, each right,
    and the connection stays open.
    """
    (shared / "a.txt").write_bytes(b"alpha\n")
    big = write_pattern(shared / "big.bin", 2 * MiB, seed=10)
    (shared / "sub").mkdir()
    daemon = daemon_factory(shared)
    etag = fetch(daemon.port, "/a.txt")["etag"]
    with HttpConnection(daemon.port) as conn:
        responses = conn.pipeline(
            [
                ("GET", "/a.txt", ()),
                ("HEAD", "/big.bin", ()),
                ("GET", "/nope", ()),
                ("GET", "/big.bin", [("Range", "bytes=100-199")]),
                ("GET", "/sub", ()),
                ("GET", "/?format=json", ()),
                ("GET", "/a.txt", [("If-None-Match", etag)]),
                ("GET", "/big.bin", ()),
            ]
        )
        assert [r.status for r in responses] == [200, 200, 404, 206, 301, 200, 304, 200]
        assert responses[0].body == b"alpha\n"
        assert (responses[1].body, responses[1]["content-length"]) == (b"", str(2 * MiB))
        assert responses[3].body == big.read_bytes()[100:200]
        assert {row["path"] for row in json.loads(responses[5].body)} == {"a.txt", "big.bin", "sub/"}
        assert sha256_bytes(responses[7].body) == sha256_file(big)
        conn.assert_open()


def test_stats_count_http_requests(shared: Path, daemon_factory: DaemonFactory) -> None:
    """
    Five HTTP requests (three GETs of one file, a HEAD, a 404) move
    STATS: http_requests by five, requests by at least five, bytes_sent
    by the three bodies at least, one miss and two hits.
    """
    data = b"x" * 4000
    (shared / "s.bin").write_bytes(data)
    daemon = daemon_factory(shared)
    before = stats(daemon.port)
    with HttpConnection(daemon.port) as conn:
        for _ in range(3):
            assert conn.get("/s.bin").body == data
        assert conn.head("/s.bin").status == 200
        assert conn.get("/missing").status == 404
    after = stats(daemon.port)
    assert "http_requests" in after, after
    delta = {key: after[key] - before.get(key, 0) for key in after}
    assert delta["http_requests"] == 5, delta
    assert 5 <= delta["requests"] <= 6, delta
    assert 3 * len(data) <= delta["bytes_sent"] <= 3 * len(data) + 1000, delta
    assert delta["misses"] >= 1 and delta["hits"] >= 2, delta


def test_access_log_lines(shared: Path, daemon_factory: DaemonFactory) -> None:
    """
    Each answer is one access-log line `<peer> HTTP/1.1 <method> <path>
    <status> <body bytes> <seconds> <hit|miss|->`: a GET counts its body,
    a HEAD and a 304 count none, a range counts its part, a 404 its short
    text body (the body bytes "that actually went out").
    """
    (shared / "sub").mkdir()
    (shared / "sub" / "log.txt").write_bytes(b"L" * 1234)
    daemon = daemon_factory(shared)
    with HttpConnection(daemon.port) as conn:
        etag = conn.get("/sub/log.txt")["etag"]
        conn.head("/sub/log.txt")
        conn.get("/sub/log.txt", [("Range", "bytes=0-9")])
        conn.get("/sub/log.txt", [("If-None-Match", etag)])
        missing = conn.get("/sub/nothing.txt")
    peer = r"127\.0\.0\.1:\d+ "
    wait_for_access_line(daemon, peer + r"HTTP/1\.1 GET /sub/log\.txt 200 1234 [0-9.]+ (miss|hit)$")
    wait_for_access_line(daemon, peer + r"HTTP/1\.1 HEAD /sub/log\.txt 200 0 [0-9.]+ (miss|hit|-)$")
    wait_for_access_line(daemon, peer + r"HTTP/1\.1 GET /sub/log\.txt 206 10 [0-9.]+ (miss|hit|-)$")
    wait_for_access_line(daemon, peer + r"HTTP/1\.1 GET /sub/log\.txt 304 0 [0-9.]+ (miss|hit|-)$")
    wait_for_access_line(daemon, peer + r"HTTP/1\.1 GET /sub/nothing\.txt 404 " + str(len(missing.body)) + r" [0-9.]+ (miss|hit|-)$")


def test_sigterm_ends_an_answer_in_flight_with_close(shared: Path, daemon_factory: DaemonFactory) -> None:
    """
    On SIGTERM an answer in flight (64 MiB the client has not started to
    read) finishes whole, then its connection closes; an idle kept-alive
    connection is closed; the daemon exits 0.
    """
    big = write_pattern(shared / "big.bin", 64 << 20, seed=12)
    daemon = daemon_factory(shared, "--drain-timeout", "20")
    idle = HttpConnection(daemon.port)
    busy = HttpConnection(daemon.port, timeout=30)
    try:
        assert idle.get("/nope").status == 404
        busy.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        busy.request("GET", "/big.bin")
        time.sleep(0.3)
        daemon.process.send_signal(signal.SIGTERM)
        response = busy.read_response()
        assert response.status == 200
        assert len(response.body) == 64 << 20 and response.body == big.read_bytes()
        busy.assert_closed()
        idle.assert_closed()
    finally:
        idle.close()
        busy.close()
    assert daemon.process.wait(20) == 0
    daemon.stopped = True
